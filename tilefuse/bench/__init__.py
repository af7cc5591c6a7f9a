"""Benchmark harness: ``tilefuse bench kernels|models`` and ``tilefuse compare`` (docs/bench.md).

Modules: :mod:`~tilefuse.bench.case` (the ``BenchCase`` each ``kernels_<family>`` module returns),
:mod:`~tilefuse.bench.kernels` / :mod:`~tilefuse.bench.models` (the two runs),
:mod:`~tilefuse.bench.timing`, :mod:`~tilefuse.bench.report` (versioned JSON + Markdown),
:mod:`~tilefuse.bench.targets` (``targets.toml``: the cheat-sheet targets and the GPU peak table),
:mod:`~tilefuse.bench.compare`, :mod:`~tilefuse.bench.plots` and :mod:`~tilefuse.bench.cli`.
Nothing is imported eagerly: ``import tilefuse`` does not pay for matplotlib or the model zoo.
"""

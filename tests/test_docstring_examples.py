"""The ``>>>`` examples in the docstrings of the public ``tilefuse.ops``, ``tilefuse.nn``,
``tilefuse.patch`` and ``tilefuse.optim`` names run as written (in the CI lane: the Triton
interpreter). Each example imports what it uses; ``# doctest: +SKIP`` examples stay skipped."""
from __future__ import annotations

import doctest
import importlib
import inspect

import pytest
import torch

PUBLIC_MODULES = ("tilefuse.ops", "tilefuse.nn", "tilefuse.patch", "tilefuse.optim")


def _public_objects(modname):
    """(qualified name, object) for the module itself and each public class or function it
    exposes (re-exports included: ``tilefuse.ops`` only re-exports ``tilefuse.fused``)."""
    mod = importlib.import_module(modname)  # tilefuse.patch: the module, not the function
    yield modname, mod
    names = getattr(mod, "__all__", None) or sorted(n for n in vars(mod) if not n.startswith("_"))
    for name in names:
        obj = getattr(mod, name)
        if (inspect.isclass(obj) or inspect.isroutine(obj)) and \
                str(getattr(obj, "__module__", "")).startswith("tilefuse"):
            yield f"{modname}.{name}", obj


class _Finder(doctest.DocTestFinder):
    def _from_module(self, module, obj):
        """Recurse only into members defined in tilefuse (not into e.g. a class attribute that
        names a torch class)."""
        defined_in = inspect.getmodule(obj)
        return defined_in is None or defined_in.__name__.startswith("tilefuse")


def _collect():
    """One doctest per docstring with examples, each object once (first public name wins)."""
    tests, seen = [], set()
    for modname in PUBLIC_MODULES:
        for qualname, obj in _public_objects(modname):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            # a module: its own docstring only; a class: its methods' docstrings too.
            # module=False: no module globals leak in, each example imports what it uses
            finder = _Finder(recurse=not inspect.ismodule(obj))
            tests += finder.find(obj, qualname, module=False, globs={"__name__": "__doctest__"})
    return sorted(tests, key=lambda t: t.name)


TESTS = _collect()


def test_public_docstrings_have_examples():
    assert len(TESTS) >= 20, [t.name for t in TESTS]  # the ops and nn modules alone have ~25


@pytest.mark.parametrize("test", TESTS, ids=[t.name for t in TESTS])
def test_docstring_example(test):
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = []
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)

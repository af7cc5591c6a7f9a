"""Test lanes.

* CPU (CI): ``TRITON_INTERPRET=1`` is set before tilefuse is imported, so every Triton kernel runs
  in the Triton interpreter. Shapes stay small (<= 256 per dim).
* CUDA: tests marked ``@pytest.mark.cuda`` run only where a GPU is present.
"""
import os

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# never tune inside a test's forward (up to seconds per new shape on a GPU); tests of the tuner set
# TILEFUSE_AUTOTUNE themselves
os.environ.setdefault("TILEFUSE_AUTOTUNE", "0")


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="K/N",
                     help="run only the K-th (0-based) of N shards: test files are dealt round "
                          "robin in path order (bench/gpu_check.sh runs 3 shards side by side)")


def _apply_shard(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    try:
        k, n = (int(v) for v in spec.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"--shard must be K/N with 0 <= K < N, got {spec!r}") from None
    files = sorted({str(item.path) for item in items})
    mine = {f for i, f in enumerate(files) if i % n == k}
    keep = [item for item in items if str(item.path) in mine]
    config.hook.pytest_deselected(items=[item for item in items if str(item.path) not in mine])
    items[:] = keep


def pytest_collection_modifyitems(config, items):
    _apply_shard(config, items)
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_launch_caches():
    """Launchers cache launch parameters per signature; tests that monkeypatch a heuristic (e.g.
    the GPU tile choice in the interpreter) must not see another test's cached choice."""
    from tilefuse.kernels import clear_launch_caches

    clear_launch_caches()
    yield
    clear_launch_caches()


@pytest.fixture
def device():
    """'cuda' on a GPU machine, else 'cpu' (Triton interpreter lane)."""
    return "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An isolated autotune user DB and shipped-tables dir, TILEFUSE_AUTOTUNE unset, and a clean
    in-process cache before and after (the autotune tests)."""
    from tilefuse.autotune import chain, db as dbmod

    monkeypatch.setenv("TILEFUSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(chain, "TABLES_DIR", tmp_path / "tables")
    monkeypatch.delenv("TILEFUSE_AUTOTUNE", raising=False)
    monkeypatch.setattr(dbmod, "_warned", set())
    chain.reset()
    yield tmp_path
    chain.reset()

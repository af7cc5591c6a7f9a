"""A C++ autograd node with a Python backward (``tilefuse/csrc/graph_node.cpp``): how a planned
eager call records its gradient for about 0.6 us of host time instead of a Python
``torch.autograd.Function``'s 3 us (docs/host_path.md).

The extension is compiled once per torch version, Python and source (about 10 s) by
``tilefuse build-ext`` (``make demo`` and ``make test`` run it) into the cache directory
(``$TILEFUSE_CACHE_DIR`` or ``~/.cache/tilefuse``), never on the request path. Where it was not
built, or cannot be (no C++ compiler, a torch whose C++ API changed), :func:`attach_fn` is None
and the ops record their gradient through ``autograd.Function`` as before: same results, more
host time. ``TILEFUSE_GRAPH_NODE=0`` turns it off.

``attach(out, fn, state, inputs, saved) -> out``: ``out`` (a new tensor that does not require
grad) gets a node with gradient edges to ``inputs`` (tensors or None), the tensors ``saved``
held as torch's own nodes hold them (in-place modification checks, saved-tensor hooks, release
after a backward without ``retain_graph``), and the backward ``fn(state, saved, needs,
grad_out) -> grads`` (one per input; ``needs``: which of them the engine wants). Undefined
incoming gradients are zeros, as an ``autograd.Function``'s are.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

SOURCE = Path(__file__).with_name("csrc") / "graph_node.cpp"
_MODULE = "_graph_node"  # the extension's PyInit name
_ENV_OFF = "TILEFUSE_GRAPH_NODE"

_STATE: dict = {}  # "attach": the loaded attach (None: unavailable), "error": why
_OFF = [False]  # set_enabled(False)


def ext_path() -> Path:
    """Where the extension for this torch, Python and source lives: ``ext/`` in the tuning
    DB's cache directory."""
    from tilefuse.autotune.chain import cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    tag = f"torch{torch.__version__.replace('+', '_')}-{sys.implementation.cache_tag}-{digest}"
    return cache_dir() / "ext" / f"{_MODULE}-{tag}{sysconfig.get_config_var('EXT_SUFFIX')}"


#: the C++ standards tried in turn: torch's own extensions build with C++20 since 2.12 (2.14's
#: headers need it), torch 2.11's with C++17
STANDARDS = ("c++20", "c++17")


def _compile_command(src: Path, dst: Path, std: str = STANDARDS[0]) -> list:
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = os.environ.get("CXX", "c++")
    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    cmd = shlex.split(cxx) + ["-O2", f"-std={std}", "-shared", "-fPIC", "-w",
                              f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                              f"-I{sysconfig.get_paths()['include']}"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [str(src), "-o", str(dst)]
    for lib in library_paths():
        cmd += [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    cmd += ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    return cmd


def build(force: bool = False, verbose: bool = False) -> Path:
    """Compile the extension for this torch into :func:`ext_path` (a no-op when it is there);
    return its path. Raises ``RuntimeError`` with the compiler's output when it fails."""
    from filelock import FileLock

    dst = ext_path()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst) + ".lock"):
        if dst.exists() and not force:
            return dst
        with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
            out = Path(tmp) / dst.name
            errors = []
            for std in STANDARDS:
                cmd = _compile_command(SOURCE, out, std)
                if verbose:
                    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                except OSError as e:  # no compiler
                    raise RuntimeError(f"cannot run the C++ compiler {cmd[0]!r}: {e}") from e
                if proc.returncode == 0:
                    break
                errors.append(f"-std={std}:\n{proc.stderr[-3000:]}")
            else:
                raise RuntimeError(f"compiling {SOURCE.name} failed\n" + "\n".join(errors))
            _load_file(out)  # it must import before it is published
            os.replace(out, dst)
    _STATE.clear()
    return dst


def _load_file(path: Path):
    spec = importlib.util.spec_from_file_location(_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attach_fn() -> Optional[Callable]:
    """The extension's ``attach``, or None where it is turned off, not built or does not load
    (:func:`why_unavailable` says which). Loaded once per process; never compiles."""
    if "attach" not in _STATE:
        attach, error = None, None
        if _OFF[0] or os.environ.get(_ENV_OFF, "1") == "0":
            error = "turned off" + ("" if _OFF[0] else f" ({_ENV_OFF}=0)")
        else:
            try:
                path = ext_path()
                if not path.exists():
                    error = f"not built (run `tilefuse build-ext`; it goes to {path})"
                else:
                    attach = _load_file(path).attach
            except Exception as e:  # a stale or broken build: the Python path still works
                error = f"{type(e).__name__}: {e}"
        _STATE["attach"], _STATE["error"] = attach, error
    return _STATE["attach"]


def why_unavailable() -> Optional[str]:
    """None when :func:`attach_fn` has the extension, else the reason."""
    attach_fn()
    return _STATE["error"]


def set_enabled(enabled: bool) -> None:
    """Turn the extension off (or back on) in this process (``TILEFUSE_GRAPH_NODE=0`` still
    wins): the plans made so far are dropped, later ones record gradients through
    ``autograd.Function`` (tests compare the two)."""
    from tilefuse.kernels import clear_launch_caches  # (the plan caches are launch caches)

    _OFF[0] = not enabled
    _STATE.clear()
    clear_launch_caches()

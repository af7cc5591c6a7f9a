"""The ``tilefuse`` command line: ``info`` here; ``autotune``, ``bench`` and ``compare`` are
registered by their packages (each module in ``_SUBCOMMAND_MODULES`` defines
``register(subparsers)`` adding parsers whose ``func(args) -> int`` runs the command)."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

DESCRIPTION = ("tilefuse: fused Triton kernels for PyTorch. Commands: info (versions, device, "
               "backend per op), build-ext (compile the C++ autograd node), autotune (tune this GPU once, manage the tuning database), "
               "bench kernels|models (benchmarks), compare (regression gate between two bench "
               "reports).")

_SUBCOMMAND_MODULES = (
    "tilefuse.autotune.cli",
    "tilefuse.bench.cli",
)



def _info(args) -> int:
    from tilefuse import _backend

    info = _backend.describe()
    rows = [
        ("tilefuse", __import__("tilefuse").__version__),
        ("python", info["python"]),
        ("torch", info["torch"]),
        ("triton", info["triton"] or "not installed"),
        ("platform", info["platform"]),
        ("device", info["device"] + (f" (sm {info['capability']})" if info["capability"] else "")),
        ("TRITON_INTERPRET", "1" if info["interpreter"] else "0"),
        ("TILEFUSE_BACKEND", info["forced_backend"]),
        ("autotune cache", _cache_path()),
        ("autograd node", _node_status()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print()
    print("backend per op:")
    for dev in devices:
        try:
            backend = _backend.backend_for_device(dev)
            how = {"triton": "Triton kernel" + (" (interpreter)" if dev == "cpu" else " (compiled)"),
                   "torch": "torch reference path"}[backend]
        except _backend.BackendError as e:
            how = f"error: {e}"
        print(f"  {dev:<5} all ops ({', '.join(list_ops())}): {how}")
        print(f"  {dev:<5} GEMM path (matmul, linear, int8_matmul): {_gemm_path(dev)}")
    return 0


def _build_ext(args) -> int:
    from tilefuse import _graph_node

    try:
        path = _graph_node.build(force=args.force, verbose=args.verbose)
    except (RuntimeError, OSError) as e:  # no compiler, a failed build, an unwritable cache
        print(f"tilefuse build-ext: {e}", file=sys.stderr)
        print("tilefuse build-ext: ops record gradients through torch.autograd.Function instead "
              "(same results, about 3 us more host time per call with grad)", file=sys.stderr)
        return 1
    print(f"tilefuse build-ext: {path}")
    return 0


def _gemm_path(dev: str) -> str:
    try:
        from tilefuse.kernels.gemm_common import describe_path
    except ImportError:  # no triton: the torch reference path
        return "torch reference path"
    return describe_path(dev)


def _node_status() -> str:
    from tilefuse import _graph_node

    why = _graph_node.why_unavailable()
    return "C++ (tilefuse/csrc/graph_node.cpp)" if why is None else f"autograd.Function ({why})"


def list_ops() -> list:
    import tilefuse.ops as ops

    return sorted(n for n in dir(ops) if not n.startswith("_") and callable(getattr(ops, n)))


def _cache_path() -> str:
    try:
        from tilefuse.autotune import cache_path
    except ImportError:
        import os

        return os.environ.get("TILEFUSE_CACHE_DIR", "~/.cache/tilefuse")
    return str(cache_path())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilefuse", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, backend per op, autotune cache location")
    p.set_defaults(func=_info)
    p = sub.add_parser("build-ext", help="compile the C++ autograd node for this torch (about "
                       "10 s, once; make demo/test run it)")
    p.add_argument("--force", action="store_true", help="rebuild even when it is built")
    p.add_argument("--verbose", action="store_true", help="print the compiler command")
    p.set_defaults(func=_build_ext)
    for name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        mod.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warning: <message>`` on stderr: no file:line prefix, no echoed source line."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr if file is None else file, flush=True)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning  # restored when the command returns
        return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

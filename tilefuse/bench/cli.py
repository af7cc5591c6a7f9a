"""``tilefuse bench kernels|models`` and ``tilefuse compare`` (registered by tilefuse.cli).

Each bench command writes ``<out>/<kind>.json`` (the versioned report), ``<out>/<kind>.md`` (the
Markdown summary) and ``<out>/plots/*.png``, and prints the summary. On a machine without CUDA it
runs the torch backend at tiny sizes and labels everything CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _csv(text: str):
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _ints(text: str):
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _device(args) -> str:
    import torch

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("tilefuse bench: --device cuda requested but CUDA is not available")
    return dev


def _pick(value, allowed, default, what):
    if value is None:
        return list(default)
    items = list(allowed) if value == "all" else _csv(value)
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"tilefuse bench: unknown {what} {bad}; choose from {list(allowed)}")
    return items


def _finish(rep, args, kind: str) -> int:
    from tilefuse.bench import report as rpt

    out = Path(args.out)
    path = rpt.save(rep, out / f"{kind}.json")
    md = rpt.markdown(rep)
    (out / f"{kind}.md").write_text(md + "\n")
    plots = []
    if not args.no_plots:
        try:
            from tilefuse.bench.plots import write_all

            plots = write_all(rep, out / "plots")
        except ImportError as e:
            print(f"plots skipped: {e} (pip install matplotlib)", file=sys.stderr)
    print(md)
    print(f"\nwrote {path}, {out / (kind + '.md')}" + (f" and {len(plots)} plot(s) in "
                                                       f"{out / 'plots'}" if plots else ""))
    if not rep["entries"]:
        print("tilefuse bench: nothing was measured", file=sys.stderr)
        return 1
    return 0


def _kernels(args) -> int:
    from tilefuse.bench import kernels

    device = _device(args)
    cpu_default = [i for i in kernels.IMPLS if i != "compile"]
    impls = _pick(args.impls, kernels.IMPLS,
                  kernels.IMPLS if device.startswith("cuda") else cpu_default, "impl")
    dtypes = _pick(args.dtype, tuple(kernels.DTYPES),
                   ["bf16"] if device.startswith("cuda") else ["fp32"], "dtype")
    rep = kernels.run(device=device, dtypes=dtypes, size=args.size,
                      only=_csv(args.only) if args.only else None, impls=impls,
                      cpu_reps=args.reps, time_budget_s=args.time_budget,
                      show_progress=not args.no_progress,
                      partial_path=Path(args.out) / "kernels.partial.json")
    (Path(args.out) / "kernels.partial.json").unlink(missing_ok=True)
    return _finish(rep, args, "kernels")


def _models(args) -> int:
    from tilefuse.bench import models

    device = _device(args)
    cuda = device.startswith("cuda")
    cpu_default = [v for v in models.VARIANTS if "compile" not in v]
    variants = _pick(args.variants, models.VARIANTS,
                     models.VARIANTS if cuda else cpu_default, "variant")
    train_configs = _pick(args.train_configs, models.TRAIN_CONFIGS,
                          [c for c in models.TRAIN_CONFIGS if cuda or "compile" not in c],
                          "training config")
    rep = models.run(
        device=device, models=_csv(args.models), batches=args.batch or ([1, 32] if cuda else [1]),
        dtypes=_pick(args.dtype, ("fp32", "fp16", "bf16", "int8"),
                     ["fp32", "fp16"] if cuda else ["fp32"], "dtype"),
        variants=variants, runs=args.runs, warmup=args.warmup, size=args.size,
        inference=not args.no_inference, train=not args.no_train, train_model=args.train_model, train_batch=args.train_batch,
        train_configs=train_configs, proxies=args.proxies, onnx=args.onnx,
        compile_mode=args.compile_mode, time_budget_s=args.time_budget,
        show_progress=not args.no_progress, partial_path=Path(args.out) / "models.partial.json")
    (Path(args.out) / "models.partial.json").unlink(missing_ok=True)
    return _finish(rep, args, "models")


def _compare(args) -> int:
    from tilefuse.bench.compare import main

    return main(args.old, args.new, args.threshold, allow_missing=args.allow_missing)


def _common(p) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--size", choices=("tiny", "full"), default=None,
                   help="shape set (default: full on CUDA, tiny on CPU)")
    p.add_argument("--out", default="out/bench", help="output directory (default out/bench)")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    from tilefuse.bench.models import MODELS

    bench = subparsers.add_parser("bench", help="benchmark kernels or models; JSON + Markdown + "
                                                "plots")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    k = sub.add_parser("kernels", help="every kernel family vs eager, torch.compile and vendor")
    _common(k)
    k.add_argument("--only", default=None, help="comma-separated families, e.g. matmul,norm")
    k.add_argument("--dtype", default=None, help="comma-separated: fp32,fp16,bf16,int8 "
                                                 "(default bf16 on CUDA, fp32 on CPU)")
    k.add_argument("--impls", default=None, help="comma-separated subset of tilefuse,eager,"
                                                 "compile,vendor or 'all' (CPU default: no "
                                                 "compile)")
    k.add_argument("--reps", type=int, default=5, help="timed calls per impl on CPU")
    k.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases left after it are reported as skipped")
    k.set_defaults(func=_kernels)

    m = sub.add_parser("models", help="model latency/throughput/size and the training table")
    _common(m)
    m.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    m.add_argument("--batch", type=_ints, default=None, help="e.g. 1,32 (default 1,32 on CUDA, "
                                                             "1 on CPU)")
    m.add_argument("--dtype", default=None, help="fp32,fp16,bf16,int8 (default fp32,fp16 on "
                                                 "CUDA, fp32 on CPU)")
    m.add_argument("--variants", default=None, help="subset of eager,patched,compile,"
                                                    "patched+compile or 'all'")
    m.add_argument("--runs", type=int, default=None, help="timed runs (default 200 CUDA, 10 CPU)")
    m.add_argument("--warmup", type=int, default=None, help="untimed runs first")
    m.add_argument("--no-train", action="store_true", help="skip the training-step table")
    m.add_argument("--no-inference", action="store_true",
                   help="only the training-step table")
    m.add_argument("--train-model", default=None, help="model of the training table")
    m.add_argument("--train-batch", type=int, default=None)
    m.add_argument("--train-configs", default=None, help="subset of the training configs")
    m.add_argument("--proxies", action=argparse.BooleanOptionalAction, default=None,
                   help="ResNet-50 at 640x640 / 512x1024 (detection / segmentation proxies; "
                        "default on CUDA)")
    m.add_argument("--onnx", action="store_true", help="also export ONNX and report its size")
    m.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. "
                                                        "reduce-overhead (CUDA graphs)")
    m.add_argument("--time-budget", type=float, default=None,
                   help="seconds; configurations left after it are reported as skipped")
    m.set_defaults(func=_models)

    from tilefuse.bench.host import add_parser as add_host_parser

    add_host_parser(sub)  # tilefuse bench host: host cost per call (tilefuse/bench/host.py)

    c = subparsers.add_parser("compare", help="compare two bench JSON reports; exit 1 on a "
                                              "regression, 2 on unusable input",
                              description="Compare two bench reports (a directory names the "
                              "kernels.json, models.json or host.json inside it). Exit 0: no regression; 1: "
                              "a regression beyond --threshold; 2: unreadable input, entries of "
                              "OLD missing from NEW, nothing compared or invalid times.")
    c.add_argument("old", help="baseline report (JSON file or bench output directory)")
    c.add_argument("new", help="new report (JSON file or bench output directory)")
    c.add_argument("--threshold", default="5%", help="regression threshold as a percentage "
                   "('5%%') or a fraction below 1 ('0.05'); default 5%%")
    c.add_argument("--allow-missing", action="store_true", dest="allow_missing",
                   help="list entries of OLD missing from NEW instead of failing (exit 2)")
    c.set_defaults(func=_compare)

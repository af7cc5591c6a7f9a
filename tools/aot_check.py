#!/usr/bin/env python
"""Ahead-of-time compile check: compile every Triton kernel launch that tilefuse's public ops make
for a real NVIDIA target (default sm_90, Hopper) on a machine WITHOUT a GPU.

How it works (see docs/aot_check.md):

1. Runs with ``TRITON_INTERPRET`` unset, so ``@triton.jit`` yields real ``JITFunction`` objects.
2. ``tilefuse._backend.backend_for_device`` is patched to answer ``"triton"`` for CPU tensors and
   (by default) ``torch.Tensor.is_cuda`` answers True, so the launchers pick their *GPU* block
   configs (``interpreter_enabled()`` is already False). The autotune DB lookup is disabled so the
   heuristic configs are what get compiled.
3. ``JITFunction.run`` is replaced: each ``kernel[grid](*args, **kw)`` is bound and specialized
   with Triton's own binder (the same code path the GPU runtime uses: dtypes, ``== 1`` and
   ``% 16`` specializations, constexprs, num_warps/num_stages) and recorded instead of launched.
   Op outputs are therefore uninitialized memory, which is fine: only the launches matter.
4. Each distinct specialization is compiled with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", arch, 32))`` down to a cubin with the ptxas bundled in the wheel;
   registers / spills come from the ptxas ``-v`` log, shared memory from the kernel metadata,
   TMA (``cp.async.bulk.tensor``) and ``wgmma`` from the PTX.

Code: this file is the CLI and the report; ``tools/aot_record.py`` intercepts, records and
compiles the launches; ``tools/aot_scenarios.py`` holds the scenarios that drive the public ops.

Usage::

    python tools/aot_check.py [--families matmul,depthwise,...] [--arch 90] [--json out.json]

Exit status: 0 when every specialization compiles and fits (shared memory <= the target's
opt-in limit), 1 otherwise (2 for usage errors).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # sibling modules, also under ``python -m tools.aot_check``
    sys.path.insert(0, _HERE)
from aot_record import Recorder, compile_all, pairwise_cover  # noqa: E402
from aot_scenarios import FAMILIES, drive  # noqa: E402

# max dynamic shared memory per block (opt-in), bytes
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def _prepare_env(cache_dir: str | None) -> None:
    """Must run before triton / tilefuse are imported."""
    if "triton" in sys.modules or "tilefuse" in sys.modules:
        interp = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
        if interp:
            raise SystemExit("aot_check: TRITON_INTERPRET was set when triton was imported; run "
                             "tools/aot_check.py in a fresh process without TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton <= 3.9 default; no warning
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="tilefuse_aot_")
        import atexit
        import shutil

        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    for k in ("TILEFUSE_BACKEND",):
        os.environ.pop(k, None)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _fmt_row(r) -> str:
    regs = r.get("regs")
    sp = r.get("spill_stores")
    shared = r.get("shared")
    cols = [r["status"], r["kernel"][:26].ljust(26), f"{r['seconds']:6.2f}s",
            (f"{shared / 1024:6.1f}K" if shared is not None else "      -"),
            (f"{regs:4d}r" if regs is not None else "    -"),
            (f"sp{sp}" if sp else "    "),
            ("tma" if r.get("tma") else "   ") + (" wgmma" if r.get("wgmma") else "      "),
            (f"{r['ld_global_128']:3d}/{r['ld_global']:<3d}" if "ld_global" in r else "   -   "),
            r["spec"]]
    return "  ".join(c if i else c.ljust(5) for i, c in enumerate(cols))


def load_share(results) -> list[str]:
    """Per kernel, summed over its compiled specializations: 128-bit ``ld.global`` / all
    ``ld.global`` (static PTX count) and the byte-weighted share."""
    acc: dict = {}
    for r in results:
        if "ld_global" not in r:
            continue
        a = acc.setdefault(r["kernel"], [0, 0, 0, 0])
        for i, k in enumerate(("ld_global_128", "ld_global", "ld_bytes_128", "ld_bytes")):
            a[i] += r[k]
    return [f"{k} {a[0]}/{a[1]} ({100 * a[2] / a[3]:.0f}% of bytes)" if a[3] else f"{k} 0/0"
            for k, a in sorted(acc.items())]


def markdown_table(results) -> str:
    """The per-kernel properties as a markdown table (docs/gemm.md)."""
    rows = ["| scenario | kernel | TMA | wgmma | 128-bit ld.global | regs | spill B | shared KB "
            "| spec |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("regs") is None:
            continue
        rows.append(f"| {r['scenario']} | {r['kernel']} | {'yes' if r.get('tma') else 'no'} | "
                    f"{'yes' if r.get('wgmma') else 'no'} | "
                    f"{r.get('ld_global_128', 0)}/{r.get('ld_global', 0)} | {r['regs']} | "
                    f"{r.get('spill_stores') or 0} | {r['shared'] / 1024:.0f} | {r['spec']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma-separated subset of {','.join(FAMILIES)} (default: all)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90)")
    ap.add_argument("--only", default=None, help="regex: run only scenarios whose name matches")
    ap.add_argument("--no-cuda-heuristics", action="store_true",
                    help="do not fake Tensor.is_cuda (compile the configs launchers pick for "
                         "non-CUDA tensors instead of the GPU ones)")
    ap.add_argument("--i64", action="store_true",
                    help="also compile every launch with its int arguments as i64 (what tensors "
                         "with >= 2**31 elements/strides give)")
    ap.add_argument("--full", action="store_true",
                    help="compile every recorded specialization (default: a greedy subset in "
                         "which every pair of (dtype, constexpr value, num_warps, num_stages) "
                         "seen together for a kernel is compiled together at least once)")
    ap.add_argument("--all-specializations", action="store_true",
                    help="compile every distinct specialization (also those differing only in "
                         "which int arguments are 1 or multiples of 16); default: one per "
                         "(kernel, dtypes, constexprs, num_warps, num_stages)")
    ap.add_argument("-j", "--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                    help="parallel compile processes (default: CPU count, at most 8)")
    ap.add_argument("--limit", type=int, default=0, help="compile at most N specializations")
    ap.add_argument("--cache-dir", default=None,
                    help="TRITON_CACHE_DIR to use (default: a fresh temp dir, so every "
                         "specialization is really compiled and its ptxas log read)")
    ap.add_argument("--json", default=None, help="write all results to this JSON file")
    ap.add_argument("--list", action="store_true", help="only list the recorded specializations")
    ap.add_argument("--table", action="store_true",
                    help="also print a markdown table (scenario, kernel, TMA, wgmma, registers, "
                         "spills, shared memory) for docs/gemm.md")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; choose from {','.join(FAMILIES)}")

    _prepare_env(args.cache_dir)
    import warnings

    warnings.filterwarnings("ignore")
    import triton

    rec = Recorder(args.arch, promote_i64=args.i64, full=args.all_specializations)
    t0 = time.perf_counter()
    drv_errors = drive(families, rec, not args.no_cuda_heuristics, args.only, args.verbose)
    t_drive = time.perf_counter() - t0
    launches = rec.order if args.full else pairwise_cover(rec.order)
    if args.limit:
        launches = launches[:args.limit]
    print(f"# aot_check: triton {triton.__version__}, target sm_{args.arch}, families "
          f"{','.join(families)}; {rec.n_calls} launches -> {len(rec.order)} distinct "
          f"specializations (recorded in {t_drive:.1f}s); compiling "
          f"{'all' if args.full else 'an all-pairs cover: ' + str(len(launches))}")
    if args.list:
        for ln in launches:
            print(f"{ln.family:9s} {ln.kernel:28s} {ln.spec()}")
        for e in drv_errors:
            print(f"# {e.get('level', 'DRIVER ERROR')}: [{e['family']}] {e['scenario']}: "
                  f"{e['error']} ({e['where']})")
        return 0

    smem_limit = SMEM_LIMIT.get(args.arch, 232448)
    results = []
    t1 = time.perf_counter()
    print("status kernel                      time    shared   regs  spill tma wgmma  "
          "ld128/ld  spec")
    for r in compile_all(launches, rec.target, smem_limit, args.jobs):
        results.append(r)
        print(_fmt_row(r), flush=True)
        if r["status"] == "FAIL":
            print("       at " + r["where"] + " (" + r["scenario"] + ")")
            print("       " + r["error"].replace("\n", "\n       "))
    n_fail = sum(r["status"] == "FAIL" for r in results)
    n_spill = sum(r["status"] == "SPILL" for r in results)
    real_drv = [e for e in drv_errors if e.get("level") != "note"]
    print(f"\n# summary: {len(results)} specializations of "
          f"{len({(r['kernel'], r['where']) for r in results})} kernels: "
          f"{len(results) - n_fail} compiled, {n_fail} failed, {n_spill} spill registers; "
          f"compile {time.perf_counter() - t1:.0f}s wall ({args.jobs} jobs); "
          f"{len(real_drv)} driver errors")
    for e in drv_errors:
        tag = "note" if e.get("level") == "note" else "DRIVER ERROR"
        print(f"# {tag}: [{e['family']}] {e['scenario']}: {e['error']} ({e['where']})")
    ok = [r for r in results if r.get("regs") is not None]
    if ok:
        heavy = sorted(ok, key=lambda r: (r["shared"], r["regs"]), reverse=True)[:5]
        print("# heaviest (shared memory): " + "; ".join(
            f"{r['kernel']} {r['spec']} {r['shared']}B {r['regs']}r" for r in heavy))
        print("# 128-bit share of static ld.global per kernel (instructions; bytes): " + "; ".join(
            load_share(ok)))
    if args.table:
        print()
        print(markdown_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, results=results,
                           driver_errors=drv_errors), f, indent=1, default=str)
    return 1 if (n_fail or real_drv) else 0


if __name__ == "__main__":
    sys.exit(main())

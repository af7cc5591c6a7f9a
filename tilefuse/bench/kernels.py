"""``tilefuse bench kernels``: discover every ``tilefuse.bench.kernels_<family>`` module, time
each implementation of each case and derive TFLOP/s or GB/s and % of the GPU's peak.

A module that fails to import, or whose ``cases()`` raises, is reported in the report's
``errors`` and skipped; so is a single implementation that raises (e.g. ``torch.compile``
without a C++ compiler). Nothing here asserts on time.
"""
from __future__ import annotations

import gc
import importlib
import pkgutil
import traceback
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from tilefuse.bench import report as rpt
from tilefuse.bench import timing
from tilefuse.bench.case import BenchCase

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64, "int8": torch.int8}
IMPLS = ("tilefuse", "eager", "compile", "vendor")


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    return msg.splitlines()[0][:300] if msg else type(e).__name__


def discover(only: Optional[Sequence[str]] = None) -> Tuple[Dict[str, Any], List[Dict[str, str]]]:
    """``({family: module}, errors)`` for the ``kernels_*`` modules (``only`` filters families)."""
    import tilefuse.bench as pkg

    mods, errors = {}, []
    infos = [i for i in pkgutil.iter_modules(pkg.__path__) if i.name.startswith("kernels_")]
    # alphabetical, or in the order ``only`` names them (a time budget then spends itself on the
    # families named first)
    rank = {fam: n for n, fam in enumerate(only or ())}
    for info in sorted(infos, key=lambda i: (rank.get(i.name[len("kernels_"):], 0), i.name)):
        family = info.name[len("kernels_"):]
        if only and family not in only:
            continue
        try:
            mod = importlib.import_module(f"tilefuse.bench.{info.name}")
            if not callable(getattr(mod, "cases", None)):
                raise AttributeError("module has no cases(device, dtype, size) function")
            mods[family] = mod
        except Exception as e:  # noqa: BLE001 - report and continue
            errors.append({"where": f"tilefuse.bench.{info.name}", "error": _short_error(e)})
    if only:
        for fam in only:
            if fam not in mods and not any(e["where"].endswith("kernels_" + fam) for e in errors):
                errors.append({"where": f"tilefuse.bench.kernels_{fam}",
                               "error": "no such benchmark module"})
    return mods, errors


def _peaks(env: Dict[str, Any], device: str) -> Dict[str, Any]:
    from tilefuse.bench.targets import peaks_for

    if env.get("device_type") != "cuda":
        return {"hbm_gbps": None, "tflops": {}, "source": "cpu: no peak"}
    row = peaks_for(env.get("gpu") or "")
    if row:
        return {"hbm_gbps": row["hbm_gbps"], "tflops": dict(row.get("tflops", {})),
                "source": f"peak table ({row['match']})"}
    return {"hbm_gbps": timing.measured_copy_gbps(device), "tflops": {},
            "source": "unknown GPU: measured copy bandwidth, no compute peak"}


def case_entries(case: BenchCase, device: str, peaks: Dict[str, Any],
                 impls: Iterable[str] = IMPLS, cpu_reps: int = 5
                 ) -> Tuple[List[Dict[str, Any]], List[Dict[str, str]]]:
    """Time every implementation of ``case``; return report entries and errors."""
    entries, errors = [], []
    for impl, fn in case.fns.items():
        if impl not in impls:
            continue
        try:
            t = timing.bench_kernel(fn, device, cpu_reps=cpu_reps)
        except Exception as e:  # noqa: BLE001
            errors.append({"where": f"{case.key}/{impl}", "error": _short_error(e)})
            if device.startswith("cuda"):
                try:  # a sticky CUDA error (illegal address) cannot be recovered from here
                    torch.cuda.synchronize()
                except Exception as e2:  # noqa: BLE001
                    errors.append({"where": f"{case.key}/{impl}", "error": "CUDA context lost: "
                                   + _short_error(e2)})
            continue
        sec = t["time_ms"] * 1e-3
        e = {"key": f"kernel/{case.key}/{impl}", "group": f"kernel/{case.key}", "impl": impl,
             "kind": "kernel", "family": case.family, "name": case.name, "dtype": case.dtype,
             "shape": case.shape, "bound": case.bound, "flops": case.flops, "bytes": case.bytes,
             "note": case.note, "device": device, **t,
             "tflops": case.flops / sec / 1e12 if case.flops and sec > 0 else None,
             "gbps": case.bytes / sec / 1e9 if case.bytes and sec > 0 else None,
             "pct_peak": None}
        if case.bound == "compute" and e["tflops"] and peaks["tflops"].get(case.dtype):
            e["pct_peak"] = 100.0 * e["tflops"] / peaks["tflops"][case.dtype]
        elif case.bound == "memory" and e["gbps"] and peaks.get("hbm_gbps"):
            e["pct_peak"] = 100.0 * e["gbps"] / peaks["hbm_gbps"]
        entries.append(e)
    by_impl = {e["impl"]: e for e in entries}
    for e in entries:
        for ref, field in (("eager", "speedup_vs_eager"), ("vendor", "speedup_vs_vendor")):
            r = by_impl.get(ref)
            e[field] = r["time_ms"] / e["time_ms"] if r and e["time_ms"] > 0 else None
    return entries, errors


def run(device: str = "cpu", dtypes: Sequence[str] = ("fp32",), size: Optional[str] = None,
        only: Optional[Sequence[str]] = None, impls: Iterable[str] = IMPLS, cpu_reps: int = 5,
        time_budget_s: Optional[float] = None, show_progress: bool = True,
        partial_path=None) -> Dict[str, Any]:
    """Run the kernel benchmarks and return a report dict (see :mod:`tilefuse.bench.report`).

    ``time_budget_s`` bounds the run: cases left when it is spent are reported as skipped (their
    inputs are not even built). With ``partial_path`` the report so far is saved there after
    every family, so a run killed from outside still leaves what it measured."""
    budget = timing.Budget(time_budget_s)
    size = size or ("full" if device.startswith("cuda") else "tiny")
    env = rpt.environment(device)
    rep = rpt.new_report("kernels", env)
    env["size"] = size
    mods, rep["errors"] = discover(only)
    peaks = _peaks(env, device)
    env["peaks"] = peaks
    impls = tuple(impls)
    with timing.torch_backend_on_cpu(device):
        for family, mod in timing.progress(mods.items(), "families", total=len(mods),
                                           enable=show_progress):
            for dname in dtypes:
                if budget.skip(rep, f"kernel/{family}/{dname}"):
                    continue
                try:
                    cases = list(mod.cases(device, DTYPES[dname], size))
                except Exception as e:  # noqa: BLE001
                    rep["errors"].append({"where": f"tilefuse.bench.kernels_{family}.cases"
                                                   f"({device}, {dname}, {size})",
                                          "error": _short_error(e)})
                    if not isinstance(e, (ValueError, TypeError, NotImplementedError)):
                        traceback.print_exc()
                    continue
                for case in timing.progress(cases, f"{family} {dname}", enable=show_progress):
                    if budget.skip(rep, f"kernel/{case.key}"):
                        continue
                    entries, errors = case_entries(case, device, peaks, impls, cpu_reps)
                    rep["entries"] += entries
                    rep["errors"] += errors
                del cases
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            if partial_path is not None:
                rpt.save(rep, partial_path)
    # keys must be unique: families are responsible for unique case names; drop duplicates loudly
    seen, uniq = set(), []
    for e in rep["entries"]:
        if e["key"] in seen:
            rep["errors"].append({"where": e["key"], "error": "duplicate case key, dropped"})
            continue
        seen.add(e["key"])
        uniq.append(e)
    rep["entries"] = uniq
    return rep

"""``tilefuse bench host``: the host (Python + dispatch) cost of one call of each public op.

Tiny ops on a GPU are bound by what happens on the CPU before the kernel starts: argument checks,
custom-op dispatch, autograd set-up, output allocation, the launch itself. This command measures
that cost per call of every name in :mod:`tilefuse.ops` (plus the ``tilefuse.optim.AdamW`` step)
next to the torch call it replaces, so a host-cost regression shows in ``tilefuse compare``.

* CPU (the default without CUDA): the Triton interpreter lane with every launch stubbed out.
  ``kernel[grid](...)`` ends in ``InterpretedFunction.run`` (triton's interpreter); inside
  :func:`stub_launches` that method is a no-op that only counts calls, so what is timed is
  everything tilefuse does around the kernel, on tiny CPU tensors, ``torch.set_num_threads(1)``.
  The command re-runs itself with ``TRITON_INTERPRET=1`` when started without it (Triton
  picks interpreter vs compiler when tilefuse is imported).
* CUDA: nothing is stubbed: the real time per call of the tiny op, launch included, with
  ``torch.cuda.synchronize()`` after each batch of calls (launches are counted in the warm-up
  by wrapping ``JITFunction.run``).

Timing is interleaved: for each repeat, ``calls`` calls of tilefuse then ``calls`` calls of torch;
the result is the minimum over repeats of the per-call mean (``time.perf_counter_ns``), in us,
after a warm-up. A row whose tilefuse call launched no kernel is flagged (it measured a torch
fallback, not the kernel path). No number here is asserted anywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

from tilefuse.bench import report as rpt
from tilefuse.bench.host_cases import CASES, HostCase

NO_LAUNCH = "no kernel launched (torch fallback)"
_CHILD_ENV = "TILEFUSE_BENCH_HOST_CHILD"  # set on the re-run with TRITON_INTERPRET=1


# --------------------------------------------------------------------------------------------
# launches: stubbed (interpreter lane) or counted (CUDA)
# --------------------------------------------------------------------------------------------
class LaunchCount:
    n = 0


def _launcher_class(interpreter: bool):
    if interpreter:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction
    from triton.runtime.jit import JITFunction

    return JITFunction


@contextlib.contextmanager
def _patched_run(cls, run):
    had = "run" in cls.__dict__
    original = cls.__dict__.get("run")
    cls.run = run
    try:
        yield
    finally:
        if had:
            cls.run = original
        else:  # pragma: no cover - triton defines run on the class itself
            del cls.run


@contextlib.contextmanager
def stub_launches():
    """Inside: every interpreted ``kernel[grid](...)`` does nothing but count itself (yields the
    :class:`LaunchCount`). The real ``InterpretedFunction.run`` is restored on exit."""
    count = LaunchCount()

    def run(self, *args, **kwargs):
        count.n += 1

    with _patched_run(_launcher_class(interpreter=True), run):
        yield count


@contextlib.contextmanager
def count_launches():
    """Inside: compiled launches run for real and are counted (the CUDA lane's warm-up)."""
    count = LaunchCount()
    cls = _launcher_class(interpreter=False)
    real = cls.__dict__["run"]

    def run(self, *args, **kwargs):
        count.n += 1
        return real(self, *args, **kwargs)

    with _patched_run(cls, run):
        yield count


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _batch_ns(fn, calls: int, grad: bool, sync) -> float:
    with torch.enable_grad() if grad else torch.no_grad():
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter_ns() - t0) / calls


def measure(case: HostCase, device: str, calls: int, repeats: int, warmup: int = 3,
            stub_count: Optional[LaunchCount] = None) -> Dict[str, object]:
    """One row: ``tilefuse_us``, ``torch_us`` (min over repeats of the per-call mean),
    ``ratio`` (tilefuse / torch), ``launches_per_call`` (counted over the warm-up calls),
    ``torch_call``, ``flag``. ``stub_count``: the count of the :func:`stub_launches` the caller
    holds (interpreter lane); None: launches are real and counted during the warm-up."""
    ours, ref, label = case.build(device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    warmup = max(1, warmup)
    with contextlib.nullcontext(stub_count) if stub_count is not None else count_launches() as c:
        start = c.n
        _batch_ns(ours, warmup, case.grad, sync)
        per_call = (c.n - start) / warmup
    _batch_ns(ref, warmup, case.grad, sync)
    best_ours = best_ref = math.inf
    for _ in range(max(1, repeats)):  # interleaved: N calls of ours, then N of torch
        best_ours = min(best_ours, _batch_ns(ours, calls, case.grad, sync))
        best_ref = min(best_ref, _batch_ns(ref, calls, case.grad, sync))
    return {"tilefuse_us": best_ours / 1e3, "torch_us": best_ref / 1e3,
            "ratio": best_ours / best_ref, "launches_per_call": per_call, "torch_call": label,
            "flag": NO_LAUNCH if per_call < 1 else None}


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def select(only: Optional[List[str]] = None) -> List[HostCase]:
    """The cases named in ``only`` (row names or op names; None: all)."""
    if not only:
        return list(CASES)
    known = [c.name for c in CASES] + sorted({c.op for c in CASES})
    bad = [o for o in only if o not in known]
    if bad:
        raise ValueError(f"only: unknown op(s) {bad}; choose from {known}")
    return [c for c in CASES if c.name in only or c.op in only]


def _check_lane(device: str) -> str:
    from tilefuse import _backend

    interp = _backend.interpreter_enabled()
    if str(device).startswith("cuda"):
        if interp:
            raise ValueError("device: the CUDA lane times compiled kernels; unset TRITON_INTERPRET")
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but CUDA is not available")
    elif not interp:
        raise ValueError("device: the CPU lane needs TRITON_INTERPRET=1 set before tilefuse is "
                         "imported (the command line re-runs itself with it)")
    if _backend.backend_for_device(device) != "triton":
        raise ValueError(f"TILEFUSE_BACKEND={os.environ.get('TILEFUSE_BACKEND')!r} sends every op "
                         f"to torch: no kernel path to measure")
    return "interpreter, launches stubbed" if interp else "cuda, real launches"


def run(device: str = "cpu", only: Optional[List[str]] = None, calls: int = 100,
        repeats: int = 15, warmup: int = 3) -> Dict[str, object]:
    """Measure the selected cases; return a ``tilefuse-bench`` report (``kind`` "host")."""
    for name, v in (("calls", calls), ("repeats", repeats), ("warmup", warmup)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    cases = select(only)
    lane = _check_lane(device)
    env = rpt.environment(device)
    env.update(lane=lane, calls=calls, repeats=repeats, threads=1)
    rep = rpt.new_report("kernels", env)
    rep["kind"] = "host"  # same schema; the host table is printed by :func:`table`
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stub = stub_launches() if "stubbed" in lane else contextlib.nullcontext(None)
    try:
        with stub as count:
            for case in cases:
                try:
                    row = measure(case, device, calls, repeats, warmup, stub_count=count)
                except Exception as e:  # noqa: BLE001 - one broken op must not stop the rest
                    rep["errors"].append({"where": f"host/{case.name}",
                                          "error": f"{type(e).__name__}: {e}"})
                    continue
                _add_entries(rep, case, row)
    finally:
        torch.set_num_threads(threads)
    ratios = [e["ratio_vs_torch"] for e in rep["entries"] if e["impl"] == "tilefuse"]
    if ratios:
        worst = max((e for e in rep["entries"] if e["impl"] == "tilefuse"),
                    key=lambda e: e["ratio_vs_torch"])
        rep["summary"] = {"geomean_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                          "worst_ratio": worst["ratio_vs_torch"], "worst": worst["op"]}
    return rep


def _add_entries(rep, case: HostCase, row) -> None:
    group = f"host/{case.name}"
    for impl, us in (("tilefuse", row["tilefuse_us"]), ("eager", row["torch_us"])):
        e = {"key": f"{group}/{impl}", "group": group, "impl": impl, "kind": "host",
             "op": case.name, "time_ms": us / 1e3, "time_us": us}
        if impl == "tilefuse":
            e.update(ratio_vs_torch=row["ratio"], launches_per_call=row["launches_per_call"],
                     flag=row["flag"])
        else:
            e["call"] = row["torch_call"]
        rep["entries"].append(e)


def table(rep) -> str:
    """The stdout table: op, tilefuse us, torch us, ratio, launches/call, then the summary."""
    by_group: Dict[str, Dict[str, dict]] = {}
    for e in rep["entries"]:
        by_group.setdefault(e["group"], {})[e["impl"]] = e
    rows = []
    for impls in by_group.values():
        ours, ref = impls["tilefuse"], impls["eager"]
        rows.append([ours["op"], round(ours["time_us"], 1), round(ref["time_us"], 1),
                     round(ours["ratio_vs_torch"], 2), ours["launches_per_call"],
                     ours["flag"] or "", ref["call"]])
    env = rep["env"]
    out = [f"tilefuse bench host: {env['lane']}, {env['calls']} calls x {env['repeats']} repeats, "
           f"1 thread, commit {(env.get('git_commit') or '?')[:7]}; ratio = tilefuse / torch",
           "", rpt.md_table(["op", "tilefuse us", "torch us", "ratio", "launches/call", "flag",
                             "torch call"], rows)]
    s = rep.get("summary")
    if s:
        out += ["", f"geometric mean ratio {s['geomean_ratio']:.2f}, worst {s['worst_ratio']:.2f} "
                    f"({s['worst']})"]
    out += [f"error: {e['where']}: {e['error']}" for e in rep["errors"]]
    return "\n".join(out)


def _argv(args) -> List[str]:
    argv = ["bench", "host", "--device", args.device or "cpu", "--calls", str(args.calls),
            "--repeats", str(args.repeats)]
    return argv + (["--only", args.only] if args.only else []) + \
        (["--json", args.json] if args.json else [])


def _rerun_in_interpreter(args) -> int:
    import tilefuse

    if os.environ.get(_CHILD_ENV):
        print("tilefuse bench host: still not in the Triton interpreter after re-running with "
              "TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(tilefuse.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "tilefuse", *_argv(args)], env=env).returncode


def main(args) -> int:
    from tilefuse import _backend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda") and not _backend.interpreter_enabled():
        return _rerun_in_interpreter(args)
    try:
        rep = run(device, only=[t.strip() for t in args.only.split(",") if t.strip()]
                  if args.only else None, calls=args.calls, repeats=args.repeats)
    except ValueError as e:
        print(f"tilefuse bench host: {e}", file=sys.stderr)
        return 2
    print(table(rep))
    if args.json:
        print(f"wrote {rpt.save(rep, args.json)}")
    return 0 if rep["entries"] else 1


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_parser(sub) -> None:
    """``tilefuse bench host`` (``sub``: the ``bench`` subparsers)."""
    h = sub.add_parser("host", help="host cost per call of every op (launch stubbed on CPU) vs "
                                    "the torch call it replaces")
    h.add_argument("--only", default=None, help="comma-separated op or row names")
    h.add_argument("--calls", type=_positive, default=100, help="calls per timed batch")
    h.add_argument("--repeats", type=_positive, default=15, help="batches per op (min is kept)")
    h.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available (real launches), else cpu (stubbed)")
    h.add_argument("--json", default=None, help="write the report (tilefuse compare reads it)")
    h.set_defaults(func=main)

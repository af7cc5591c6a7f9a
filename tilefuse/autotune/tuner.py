"""The tuning loop: try each candidate config of a space on one problem, keep the fastest correct.

Timers are pluggable: ``timer(fn, config) -> milliseconds``, or one of the names below.

* ``bench`` (CUDA default): ``triton.testing.do_bench``, median of repeated runs after warm-up,
  with its L2 flush between runs.
* ``wall`` (CPU default): median wall-clock of a few synchronised calls (in the interpreter this
  measures interpretation cost, not GPU speed: useful only to exercise the loop).
* ``model``: a deterministic, instant stand-in (larger tiles score better) so CI can run the whole
  loop, the DB and the CLI through the interpreter in seconds. Never a measurement.

Every candidate's output is checked against an fp64 reference before it is timed; configs that
fail to compile, run out of resources or give wrong results are skipped, never stored.
"""
from __future__ import annotations

import datetime
import logging
import statistics
import time
from typing import Callable, Optional

from tilefuse.autotune.space import KernelSpace, device_limits

log = logging.getLogger("tilefuse.autotune")

Timer = Callable[[Callable[[], object], dict], float]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def bench_timer(fn, config) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def make_wall_timer(device: str = "cpu", reps: int = 3) -> Timer:
    def wall_timer(fn, config) -> float:
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    wall_timer.__name__ = "wall"
    return wall_timer


def model_timer(fn, config) -> float:
    """Instant, deterministic score: 1000 / (product of the BLOCK_* sizes) ** (1/3)."""
    size = 1.0
    for k, v in config.items():
        if k.startswith("BLOCK"):
            size *= v
    return 1000.0 / size ** (1.0 / 3.0) + 0.001 * config.get("num_warps", 0)


TIMERS = {"bench": bench_timer, "model": model_timer}


def get_timer(name: str, device: str) -> Timer:
    """``auto`` -> ``bench`` on CUDA, ``wall`` on CPU."""
    if name == "auto":
        name = "bench" if device.startswith("cuda") else "wall"
    if name == "wall":
        return make_wall_timer(device)
    if name not in TIMERS:
        raise ValueError(f"unknown timer {name!r}; expected auto, bench, wall or model")
    return TIMERS[name]


def resolve_timer(timer, device: str) -> Timer:
    """``timer`` as a callable: None -> ``auto``; a name (``auto``, ``bench``, ``wall``,
    ``model``) -> that timer; a callable as is; anything else -> TypeError."""
    if timer is None:
        return get_timer("auto", device)
    if isinstance(timer, str):
        return get_timer(timer, device)
    if not callable(timer):
        raise TypeError(f"timer must be a name (auto, bench, wall, model) or a callable "
                        f"timer(fn, config) -> ms, got {type(timer).__name__} {timer!r}")
    return timer


def _cfg_id(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))


def tune(space: KernelSpace, key: dict, *, identity, timer: Optional[Timer] = None,
         budget_s: Optional[float] = None, exhaustive: bool = False,
         max_configs: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None
         ) -> Optional[dict]:
    """Tune ``space`` on the problem ``key`` on the device of ``identity``.

    Tries the heuristic default first, then the pruned candidates in order, until they are all
    done, ``max_configs`` were tried or ``budget_s`` seconds have passed (the default and one
    other candidate always run). Returns a DB entry, or None when no config worked.
    """
    device = identity.torch_device
    timer = resolve_timer(timer, device)
    start = time.perf_counter()
    default = space.default(key)
    configs = space.candidates(key, device_limits(identity), exhaustive=exhaustive)
    if _cfg_id(default) not in {_cfg_id(c) for c in configs}:
        configs.insert(0, default)
    if max_configs is not None:
        configs = configs[:max(1, max_configs)]
    problem = space.prepare(key, device)
    results, failed = [], 0
    default_ms = None
    for i, cfg in enumerate(configs):
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
            break
        try:
            out = problem.run(cfg)  # compiles + warms up
            _sync(device)
            if not problem.check(out):
                raise ValueError("wrong result")
            ms = float(timer(lambda: problem.run(cfg), cfg))
        except Exception as e:  # compile errors, out of resources, wrong results
            failed += 1
            log.debug("%s %s: config %s rejected: %s", space.name, key, cfg, e)
            ms = None
        if ms is not None:
            results.append((ms, cfg))
            if _cfg_id(cfg) == _cfg_id(default):
                default_ms = ms
        if progress is not None:
            progress(i + 1, len(configs))
    if not results:
        return None
    results.sort(key=lambda r: r[0])
    best_ms, best = results[0]
    return {
        "kernel": space.name,
        "bucket": space.bucket(key),
        "shape": {k: (list(v) if isinstance(v, tuple) else v) for k, v in key.items()},
        "config": best,
        "time_ms": best_ms,
        "default_config": default,
        "default_time_ms": default_ms,
        "runner_up": [{"config": c, "time_ms": t} for t, c in results[1:4]],
        "tried": len(results) + failed,
        "failed": failed,
        "timer": getattr(timer, "__name__", "custom").replace("_timer", ""),
        "tuning_s": round(time.perf_counter() - start, 3),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": identity.as_dict(),
    }

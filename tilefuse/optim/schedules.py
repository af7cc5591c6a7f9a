"""Learning-rate schedules as ``LambdaLR`` factories (compose with torch's SequentialLR,
ChainedScheduler, ...). Each ``*_lambda`` returns the multiplier function (step -> factor of the
base lr) and the same name without ``_lambda`` wraps it in ``torch.optim.lr_scheduler.LambdaLR``.
The factor is computed on the host from the step index: lr reaches the fused kernels as a runtime
scalar, so changing it every step never recompiles.

* ``warmup_cosine``: linear warmup from 0 to the base lr over ``warmup_steps``, then cosine decay
  to ``min_lr_ratio`` x base lr at ``total_steps`` (constant after); with ``min_lr_ratio=0`` it
  is transformers' ``get_cosine_schedule_with_warmup``.
* ``one_cycle``: Smith's one-cycle policy (as torch's OneCycleLR with cosine annealing): from
  base/div_factor up to base over ``pct_start`` of the run, then down to base/(div*final_div).
* ``step_decay``: multiply by ``gamma`` every ``step_size`` steps.
* ``inverse_sqrt_warmup``: the Transformer schedule ("Attention is all you need"), normalised to
  peak 1 at ``warmup_steps``: min(step / warmup, sqrt(warmup / step)).
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


def _check_ratio(name, v, lo=0.0, hi=1.0):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v!r}")


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("total_steps", total_steps, 1)
    _check_ratio("min_lr_ratio", min_lr_ratio)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")

    def f(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def one_cycle_lambda(total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
                     final_div_factor: float = 1e4):
    _check_int("total_steps", total_steps, 2)
    _check_ratio("pct_start", pct_start)
    for name, v in (("div_factor", div_factor), ("final_div_factor", final_div_factor)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{name} must be > 0, got {v!r}")
    start, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
    up = max(1.0, pct_start * total_steps - 1)
    down = max(1.0, total_steps - 1 - up)

    def cos(a, b, t):
        return b + (a - b) / 2.0 * (math.cos(math.pi * min(1.0, t)) + 1)

    def f(step: int) -> float:
        if step <= up:
            return cos(start, 1.0, step / up)
        return cos(1.0, end, (step - up) / down)
    return f


def step_decay_lambda(step_size: int, gamma: float = 0.1):
    _check_int("step_size", step_size, 1)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    return lambda step: gamma ** (step // step_size)


def inverse_sqrt_warmup_lambda(warmup_steps: int):
    _check_int("warmup_steps", warmup_steps, 1)

    def f(step: int) -> float:
        s = step + 1
        return min(s / warmup_steps, math.sqrt(warmup_steps / s))
    return f


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                  last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, warmup_cosine_lambda(warmup_steps, total_steps, min_lr_ratio),
                    last_epoch=last_epoch)


def one_cycle(optimizer, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4, last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, one_cycle_lambda(total_steps, pct_start, div_factor,
                                                final_div_factor), last_epoch=last_epoch)


def step_decay(optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, step_decay_lambda(step_size, gamma), last_epoch=last_epoch)


def inverse_sqrt_warmup(optimizer, warmup_steps: int, last_epoch: int = -1) -> LambdaLR:
    return LambdaLR(optimizer, inverse_sqrt_warmup_lambda(warmup_steps), last_epoch=last_epoch)

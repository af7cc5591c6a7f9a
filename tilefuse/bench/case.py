"""The unit every kernel benchmark is made of.

Each op family provides ``tilefuse/bench/kernels_<family>.py`` with a function
``cases(device: str, dtype: torch.dtype, size: str) -> list[BenchCase]`` (size is ``"tiny"`` on CPU
and ``"full"`` on GPU). The harness (``tilefuse bench kernels``) discovers those modules, times
every implementation of each case and derives TFLOP/s or GB/s from the analytic model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import torch


@dataclass
class BenchCase:
    family: str                    # "matmul", "layer_norm", ...
    name: str                      # unique within the family, e.g. "fwd+bwd/4096x4096/gelu"
    shape: Dict[str, Any]          # the problem size, for the report
    dtype: str                     # "fp16", ...
    # implementation label -> zero-arg callable; labels: "tilefuse", "eager", "compile",
    # "vendor" (cuBLAS/cuDNN/_int_mm where one exists). Missing labels are simply not timed.
    fns: Dict[str, Callable[[], Any]] = field(default_factory=dict)
    flops: float = 0.0             # analytic floating-point (or int) ops of one call
    bytes: float = 0.0             # analytic bytes moved to/from memory by one call
    bound: str = "memory"          # "memory" (report GB/s) or "compute" (report TFLOP/s)
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.family}/{self.name}/{self.dtype}"


class LazyCompiled:
    """``torch.compile(fn)`` built on first call (importing dynamo costs seconds)."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=False)
        return self.compiled(*args)


def fwd(f: Callable, *args) -> Callable[[], Any]:
    """A zero-arg callable running ``f(*args)`` (a forward-only benchmark body)."""
    def run():
        return f(*args)
    return run


def fwd_bwd(f: Callable, g, *args) -> Callable[[], Any]:
    """A zero-arg callable running ``f(*args).backward(g)``, clearing the leaves' grads first."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        for t in leaves:
            t.grad = None
        f(*args).backward(g)
    return run


def roundtrip_case(family: str, name: str, x, quantize: Callable, dequantize: Callable,
                   eager: Callable, dname: str) -> "BenchCase":
    """A quantize -> dequantize round trip of a 2-D ``x`` (memory-bound: read ``x``, write and
    read the 8-bit codes and per-row scales, write ``x``'s dtype) against ``eager(x)``."""
    M, K = x.shape
    es = x.element_size()
    return BenchCase(
        family=family, name=name, shape={"M": M, "K": K}, dtype=dname,
        fns={"tilefuse": lambda: dequantize(*quantize(x), dtype=x.dtype),
             "eager": lambda: eager(x)},
        flops=0.0, bytes=float(2 * es * M * K + 2 * M * K + 8 * M), bound="memory",
        note=f"{quantize.__name__} (one kernel) then {dequantize.__name__} (torch ops)")

"""Fused cross-entropy benchmark cases (memory-bound: reported as GB/s).

Case: ``fwd+bwd/ls0.1`` (label smoothing 0.1). Implementations:

* ``tilefuse``: :func:`tilefuse.ops.cross_entropy` (the gradient is produced in the forward
  pass, no probability tensor is kept);
* ``eager``: ``F.cross_entropy``;
* ``compile``: the eager function under :func:`torch.compile` (GPU only).

Bytes: fwd+bwd reads the logits twice (pass 1 statistics, pass 2 gradient) and writes the
gradient once, vs eager's log-softmax tensor (``R*V`` elements saved for backward) plus the
backward's read/write.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from tilefuse.bench.case import BenchCase
from tilefuse.bench.kernels_dropout import DTYPE_NAMES, maybe_compile

# (rows, vocabulary): an LLM head at full size
SHAPES = {"tiny": (16, 1000), "full": (8192, 32000)}


def cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"cross_entropy benchmarks take fp32/fp16/bf16, got {dtype}")
    import tilefuse

    R, V = SHAPES[size]
    es = torch.tensor([], dtype=dtype).element_size()
    logits = torch.randn(R, V, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, V, (R,), device=device)

    def run(fn):
        def f():
            logits.grad = None
            fn(logits, target).backward()
        return f

    def eager(x, t):
        return F.cross_entropy(x, t, label_smoothing=0.1)

    def ours(x, t):
        return tilefuse.ops.cross_entropy(x, t, label_smoothing=0.1)

    fns = {"tilefuse": run(ours), "eager": run(eager)}
    comp = maybe_compile(eager, device)
    if comp is not None:
        fns["compile"] = run(comp)
    return [BenchCase("cross_entropy", f"fwd+bwd/ls0.1/{R}x{V}", {"R": R, "V": V},
                      DTYPE_NAMES[dtype], fns, flops=6 * R * V, bytes=3 * R * V * es,
                      note="eager keeps an R*V log-softmax for backward; tilefuse keeps the "
                           "gradient it wrote in the forward")]

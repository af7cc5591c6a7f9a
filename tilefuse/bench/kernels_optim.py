"""Optimizer-step benchmark cases: one ``step()`` over many parameter tensors.

Sizes: "full" (GPU) = 10M and 100M parameters spread over 200 tensors (a mix of matrix and vector
shapes, like a transformer's weights / biases / norms); "tiny" (CPU) = 20k parameters over 8.
Gradients are set once; every call is one optimizer step.

Implementations per case:

* ``tilefuse``: :mod:`tilefuse.optim` (one multi-tensor launch per bucket);
* ``eager``: torch's default multi-tensor path (``foreach=True``);
* ``vendor``: torch's ``fused=True`` CUDA kernels where torch has them (Adam, AdamW, SGD);
* ``compile``: not timed (compiling the step of 200 tensors costs minutes).

Each case is repeated under ``/single`` with ``eager`` = ``foreach=False`` (one kernel per op and
per tensor: the launch-bound baseline the multi-tensor designs replace).

Bytes are the analytic minimum per step: every state tensor read and written once, the gradient
read once, the param read and written once (AdamW: 4 reads + 3 writes per element; SGD with
momentum: 3 reads + 2 writes; Lion: 3 reads + 2 writes). Memory-bound: reported as GB/s.
"""
from __future__ import annotations

from typing import List

import torch

from tilefuse.bench.case import BenchCase

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}
# (total parameters, number of tensors)
SIZES = {"tiny": [(20_000, 8)], "full": [(10_000_000, 200), (100_000_000, 200)]}
# name, torch class, kwargs, (reads, writes) per element, flops per element, torch has fused
OPTIMIZERS = [
    ("adamw", "AdamW", dict(lr=1e-3, weight_decay=1e-2), (4, 3), 18, True),
    ("sgd_momentum", "SGD", dict(lr=1e-2, momentum=0.9, nesterov=True), (3, 2), 6, True),
    ("lion", None, dict(lr=1e-4, weight_decay=1e-2), (3, 2), 10, False),
]


def _shapes(total: int, count: int):
    """``count`` tensors of ~``total`` elements: 3/4 matrices, 1/4 vectors (biases, norms)."""
    n_mat = count * 3 // 4
    n_vec = count - n_mat
    vec = max(1, min(4096, total // (100 * max(1, n_vec))))
    per_mat = max(1, (total - vec * n_vec) // n_mat)
    cols = 1024 if per_mat >= 1024 else 16
    rows = max(1, per_mat // cols)
    return [(rows, cols)] * n_mat + [(vec,)] * n_vec


def _params(shapes, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype))
        p.grad = torch.randn(s, generator=g).to(device=device, dtype=dtype) * 1e-2
        params.append(p)
    return params


def _stepper(opt):
    def run():
        opt.step()
    return run


def cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    import tilefuse.optim as tfo

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return []
    out: List[BenchCase] = []
    elsize = torch.tensor([], dtype=dtype).element_size()
    on_cuda = str(device).startswith("cuda")
    for total, count in SIZES["full" if size == "full" else "tiny"]:
        shapes = _shapes(total, count)
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for name, torch_name, kw, (reads, writes), flops, has_fused in OPTIMIZERS:
            ours_cls = getattr(tfo, torch_name or "Lion")
            fns = {"tilefuse": _stepper(ours_cls(_params(shapes, device, dtype), **kw))}
            single = {"tilefuse": fns["tilefuse"]}
            if torch_name is not None:
                cls = getattr(torch.optim, torch_name)
                fns["eager"] = _stepper(cls(_params(shapes, device, dtype), foreach=True, **kw))
                single["eager"] = _stepper(cls(_params(shapes, device, dtype), foreach=False,
                                               **kw))
                if has_fused and on_cuda:
                    fns["vendor"] = _stepper(cls(_params(shapes, device, dtype), fused=True,
                                                 **kw))
            shape = dict(params=numel, tensors=len(shapes))
            nbytes = float(numel * elsize * (reads + writes))
            tag = f"{numel / 1e6:.0f}M" if numel >= 1e6 else f"{numel // 1000}k"
            for suffix, f in (("", fns), ("/single", single)):
                if suffix and "eager" not in f:
                    continue
                out.append(BenchCase(
                    family="optim", name=f"{name}/{tag}x{len(shapes)}{suffix}", shape=shape,
                    dtype=DTYPE_NAMES[dtype], fns=f, flops=float(numel * flops), bytes=nbytes,
                    bound="memory",
                    note="eager = foreach=False" if suffix else "eager = foreach=True"))
    return out

"""Dropout-family benchmark cases (memory-bound: reported as GB/s); the fused cross-entropy has
its own family, :mod:`tilefuse.bench.kernels_cross_entropy`.

Cases: ``fwd/dropout``, ``fwd/dropout_add``, ``fwd/dropout2d``, ``fwd/dropconnect_linear``,
``fwd/mixup``. Implementations per case:

* ``tilefuse``: :func:`tilefuse.ops.dropout` / :func:`~tilefuse.ops.dropout_add` (one Philox
  kernel; only a seed is kept for backward) / the mixup op;
* ``eager``: ``F.dropout`` / ``r + F.dropout(x)`` / gather + lerp;
* ``compile``: the eager function under :func:`torch.compile` (GPU only: compiling on CPU for a
  tiny case costs more than the whole benchmark).

Bytes are the analytic minimum of one call: dropout reads x and writes y (eager also writes a
bool mask, which tilefuse does not: the "memory saved" is ``numel`` bytes per call kept for
backward); dropout_add also reads the residual.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from tilefuse.bench.case import BenchCase

SHAPES = {
    # (rows, cols): transformer activations, several times the 60 MB L2 on the full size
    "tiny": {"dropout": (64, 256)},
    "full": {"dropout": (16384, 8192)},
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
P = 0.1


def maybe_compile(fn, device):
    return torch.compile(fn) if device == "cuda" else None


def _dropout_cases(device, dtype, size) -> List[BenchCase]:
    import tilefuse

    R, C = SHAPES[size]["dropout"]
    es = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(R, C, device=device, dtype=dtype)
    r = torch.randn(R, C, device=device, dtype=dtype)
    n = R * C
    out = []

    def eager_add(a, b):
        return b + F.dropout(a, P)

    fns = {"tilefuse": lambda: tilefuse.ops.dropout(x, P), "eager": lambda: F.dropout(x, P)}
    comp = maybe_compile(lambda a: F.dropout(a, P), device)
    if comp is not None:
        fns["compile"] = lambda: comp(x)
    out.append(BenchCase("dropout", f"fwd/dropout/{R}x{C}", {"R": R, "C": C},
                         DTYPE_NAMES[dtype], fns, flops=2 * n, bytes=2 * n * es,
                         note=f"eager also stores a {n}-byte bool mask; tilefuse stores a seed"))
    fns = {"tilefuse": lambda: tilefuse.ops.dropout_add(x, r, P), "eager": lambda: eager_add(x, r)}
    comp = maybe_compile(eager_add, device)
    if comp is not None:
        fns["compile"] = lambda: comp(x, r)
    out.append(BenchCase("dropout", f"fwd/dropout_add/{R}x{C}", {"R": R, "C": C},
                         DTYPE_NAMES[dtype], fns, flops=3 * n, bytes=3 * n * es,
                         note="eager: 2 kernels + intermediate; tilefuse: 1 pass"))
    x4 = x.reshape(R // 8, 8, C // 16, 16)  # NCHW maps: a channel is zeroed whole
    fns = {"tilefuse": lambda: tilefuse.ops.dropout2d(x4, P),
           "eager": lambda: F.dropout2d(x4, P)}
    out.append(BenchCase("dropout", f"fwd/dropout2d/{tuple(x4.shape)}",
                         dict(zip("NCHW", x4.shape)), DTYPE_NAMES[dtype], fns, flops=2 * n,
                         bytes=2 * n * es, note="per-channel keep mask from the seed"))
    K = C // 2
    w = torch.randn(C, K, device=device, dtype=dtype) * K ** -0.5
    xa = x[:, :K]
    fns = {"tilefuse": lambda: tilefuse.ops.dropconnect_linear(xa, w, p=P),
           "eager": lambda: F.linear(xa, F.dropout(w, P))}
    out.append(BenchCase("dropout", f"fwd/dropconnect_linear/{R}x{C}x{K}",
                         {"M": R, "N": C, "K": K}, DTYPE_NAMES[dtype], fns,
                         flops=2.0 * R * C * K, bytes=float(es * (R * K + C * K + R * C)),
                         bound="compute",
                         note="weights dropped as they are loaded (matmul's DropConnect path); "
                              "eager materializes the dropped weight"))
    return out


def _mixup_cases(device, dtype, size) -> List[BenchCase]:
    from tilefuse.fused.dropout import mixup_op

    N, C, H, W = (8, 3, 32, 32) if size == "tiny" else (256, 3, 224, 224)
    es = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(N, C, H, W, device=device, dtype=dtype)
    perm = torch.randperm(N).to(device)
    n = x.numel()

    def eager(a, p):
        return torch.lerp(a.index_select(0, p), a, 0.3)

    fns = {"tilefuse": lambda: mixup_op(x, perm, 0.3), "eager": lambda: eager(x, perm)}
    comp = maybe_compile(eager, device)
    if comp is not None:
        fns["compile"] = lambda: comp(x, perm)
    return [BenchCase("dropout", f"fwd/mixup/{N}x{C}x{H}x{W}", {"N": N, "C": C, "H": H, "W": W},
                      DTYPE_NAMES[dtype], fns, flops=3 * n, bytes=3 * n * es,
                      note="eager: gather copy + lerp (5 passes); tilefuse: 1 pass")]


def cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dropout benchmarks take fp32/fp16/bf16, got {dtype}")
    return _dropout_cases(device, dtype, size) + _mixup_cases(device, dtype, size)

"""Matmul benchmark cases: ``gelu(a @ w + bias)`` (the fused Linear+GELU of an MLP).

Implementations per case:

* ``tilefuse``: :func:`tilefuse.ops.matmul` with ``bias`` and ``activation="gelu"`` (one kernel
  forward; backward = one elementwise pass + two matmuls);
* ``eager``: ``F.gelu(torch.mm(a, w) + bias)`` (three kernels forward);
* ``compile``: the eager function under :func:`torch.compile`;
* ``vendor``: ``torch.mm(a, w)`` alone (cuBLAS, no epilogue): the roofline anchor, it does less
  work than the others.

``linear/MxNxK`` cases (issue 19) time :func:`tilefuse.ops.linear` without an epilogue against
``F.linear`` (cuBLAS, ``vendor``) on the weight layout a model has (K-major: the persistent TMA
path on sm_90), at decode / small-batch / prefill M: the ``x vendor`` column is the ratio to
cuBLAS. GPU figures: unmeasured until a GPU run.

``fwd`` cases time the forward; ``fwd+bwd`` cases time forward + backward w.r.t. a, w and bias
with a fixed upstream gradient. Flops are the matmul flops only (2MNK forward, 6MNK with
backward); bytes are each operand read/written once per kernel (an analytic lower bound).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from tilefuse.bench.case import BenchCase, LazyCompiled, fwd, fwd_bwd

# (M, N, K): tokens x out_features x in_features
SHAPES = {
    "tiny": [(64, 96, 80)],
    "full": [(4096, 4096, 4096), (8192, 11008, 4096)],
}
# (M, N, K) of the linear cases: decode, small batch (text classifier), prefill
LINEAR_SHAPES = {
    "tiny": [(16, 96, 80)],
    "full": [(1, 4096, 4096), (16, 4096, 4096), (128, 768, 768), (256, 4096, 4096),
             (4096, 4096, 4096), (8192, 8192, 8192)],
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}


def _eager(a, w, b):
    return F.gelu(torch.mm(a, w) + b)


def _ours(a, w, b):
    import tilefuse

    return tilefuse.ops.matmul(a, w, bias=b, activation="gelu")


def _vendor(a, w, b):
    return torch.mm(a, w)


def _linear_cases(device, dtype, size) -> List[BenchCase]:
    import tilefuse

    es = torch.tensor([], dtype=dtype).element_size()
    out = []
    for M, N, K in LINEAR_SHAPES[size]:
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(device=device, dtype=dtype)
        out.append(BenchCase(
            family="matmul", name=f"linear/{M}x{N}x{K}", shape={"M": M, "N": N, "K": K},
            dtype=DTYPE_NAMES[dtype],
            fns={"tilefuse": fwd(tilefuse.ops.linear, x, w), "vendor": fwd(F.linear, x, w)},
            flops=2.0 * M * N * K, bytes=float((M * K + N * K + M * N) * es),
            bound="memory" if M <= 16 else "compute",
            note="vendor = F.linear (cuBLAS); weight (N, K) as in a model"))
    return out


def cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"matmul benchmarks take floating dtypes, got {dtype}")
    dname = DTYPE_NAMES[dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    compiled = LazyCompiled(_eager)
    out: List[BenchCase] = _linear_cases(device, dtype, size) if dtype != torch.float64 else []
    for M, N, K in SHAPES[size]:
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

        a, w, b = rand(M, K), rand(K, N, scale=K ** -0.5), rand(N)
        shape = {"M": M, "N": N, "K": K}
        fwd_bytes = (M * K + K * N + N + M * N) * es
        out.append(BenchCase(
            family="matmul", name=f"fwd/{M}x{N}x{K}/bias+gelu", shape=shape, dtype=dname,
            fns={"tilefuse": fwd(_ours, a, w, b), "eager": fwd(_eager, a, w, b),
                 "compile": fwd(compiled, a, w, b), "vendor": fwd(_vendor, a, w, b)},
            flops=2.0 * M * N * K, bytes=float(fwd_bytes), bound="compute",
            note="vendor = torch.mm without bias/GELU"))
        ag, wg, bg = (t.clone().requires_grad_(True) for t in (a, w, b))
        g = rand(M, N)
        # + pre-activation store/load, dz write, dA and dB matmuls reading their operands
        bwd_bytes = (3 * M * N + 2 * (M * K + K * N + M * N)) * es
        out.append(BenchCase(
            family="matmul", name=f"fwd+bwd/{M}x{N}x{K}/bias+gelu", shape=shape, dtype=dname,
            fns={"tilefuse": fwd_bwd(_ours, g, ag, wg, bg),
                 "eager": fwd_bwd(_eager, g, ag, wg, bg),
                 "compile": fwd_bwd(compiled, g, ag, wg, bg),
                 "vendor": fwd_bwd(_vendor, g, ag, wg, bg)},
            flops=6.0 * M * N * K, bytes=float(fwd_bytes + bwd_bytes), bound="compute",
            note="vendor = torch.mm fwd+bwd without bias/GELU"))
    return out

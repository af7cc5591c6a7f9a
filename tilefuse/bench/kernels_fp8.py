"""fp8 benchmark cases: the fp8 GEMM with its scaled epilogue, and the dynamic fp8 linear.

Shapes ("full", GPU): LLM linears with a 4096x4096 weight (M = 1 decode, 256, 4096 prefill), a
4096x11008 LLM MLP, and BERT-base's 768 <-> 3072 MLP over 32 x 128 tokens; ("tiny", CPU) two
64-wide shapes that only prove the cases run. A (M, K) x weight (N, K).T, e4m3 operands, per-row
A scales and per-column B scales, bf16 (or fp16) output.

``cases(device, torch.bfloat16 | torch.float16, size)`` (other dtypes: no cases):

* ``scaled/MxNxK``: ``act(A @ B * sa * sb + bias)`` in one kernel. ``tilefuse`` =
  :func:`tilefuse.ops.fp8_matmul`; ``vendor`` = ``torch._scaled_mm`` with the same scales and
  bias (cuBLASLt fp8, ``use_fast_accum=False`` like our default; omitted where it rejects the
  shape or device); ``eager`` = our bf16/fp16 GEMM (:func:`tilefuse.ops.matmul`) on the same
  shape, the GEMM fp8 replaces (goal from issue 21: >= 1.6x it and >= 0.95x ``_scaled_mm`` at
  >= 4096^3; unmeasured).
* ``fast_accum/MxNxK`` (GPU, M >= 256): the same with ``fast_accum=True`` against
  ``torch._scaled_mm(use_fast_accum=True)``.
* ``linear/MxNxK``: :class:`tilefuse.nn.Fp8Linear`'s path (:func:`tilefuse.ops.fp8_linear`:
  fused per-row quantizer + fp8 GEMM); ``eager`` = ``F.linear`` in the float dtype;
  ``vendor`` = torch's per-row amax quantization + ``torch._scaled_mm``.

On CUDA below sm_89 (no fp8 tensor cores) there are no cases. Ops are counted as 2*M*N*K;
bytes are each operand read/written once. The report's ``dtype`` is ``fp8`` (% of peak needs an
``fp8`` column in the peak table). No GPU number is asserted.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from tilefuse.bench.case import BenchCase, roundtrip_case
from tilefuse.bench.kernels_int8 import _bound, _try

SHAPES = {"tiny": [(1, 64, 64), (16, 64, 64)],
          "full": [(1, 4096, 4096), (256, 4096, 4096), (4096, 4096, 4096), (4096, 11008, 4096),
                   (4096, 3072, 768), (4096, 768, 3072)]}
OUT = {torch.bfloat16: "bf16", torch.float16: "fp16"}
E4 = torch.float8_e4m3fn


def _scaled_mm(a, b, sa, sb, bias, out_dtype, fast=False):
    """``torch._scaled_mm`` with per-row / per-column scales (its rowwise mode wants (M, 1) and
    (1, N) fp32 scales and b column-major)."""
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast)


def _torch_fp8_linear(x, w, sw, bias):
    sx = x.abs().amax(-1, keepdim=True).float().clamp(min=2.0 ** -100) / 448.0
    qx = (x.float() / sx).clamp(-448, 448).to(E4)
    return _scaled_mm(qx, w.t(), sx, sw[None, :], bias, x.dtype)


def _torch_fp8_roundtrip(x):
    s = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    return ((x.float() / s).to(torch.float8_e4m3fn).float() * s).to(x.dtype)


def cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    import tilefuse

    if dtype not in OUT:
        return []
    if device.startswith("cuda") and torch.cuda.get_device_capability(device) < (8, 9):
        return []  # no fp8 tensor cores: fp8_matmul raises there
    dname = OUT[dtype]
    out: List[BenchCase] = []
    for M, N, K in SHAPES[size]:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(device=device, dtype=dtype)
        bias = torch.randn(N, generator=gen).to(device=device, dtype=dtype)
        qx, sx = tilefuse.ops.quantize_fp8_per_row(x)
        qw, sw = tilefuse.ops.quantize_fp8_per_row(w)
        sw_row = sw.reshape(1, N)
        shape = {"M": M, "N": N, "K": K}
        flops = 2.0 * M * N * K
        gemm_bytes = float(M * K + N * K + 8 * (M + N) + 2 * N + 2 * M * N)
        wt = w.t()
        for fast in ((False, True) if device.startswith("cuda") and M >= 256 else (False,)):
            fns = {"tilefuse": lambda qx=qx, qw=qw, sx=sx, sw=sw, b=bias, f=fast:
                   tilefuse.ops.fp8_matmul(qx, qw.t(), sx, sw, bias=b, out_dtype=dtype,
                                           fast_accum=f)}
            if not fast:
                fns["eager"] = lambda x=x, wt=wt, b=bias: tilefuse.ops.matmul(x, wt, b)
            vendor = _try(lambda qx=qx, qw=qw, sx=sx, sw=sw_row, b=bias, f=fast: _scaled_mm(
                qx, qw.t(), sx, sw, b, dtype, f))
            if vendor is not None:
                fns["vendor"] = vendor
            out.append(BenchCase(
                family="fp8", name=f"{'fast_accum' if fast else 'scaled'}/{M}x{N}x{K}/"
                f"out={dname}", shape=shape, dtype="fp8", fns=fns, flops=flops,
                bytes=gemm_bytes, bound=_bound(M),
                note="vendor = torch._scaled_mm (rowwise scales, same bias); eager = our "
                     f"{dname} GEMM on the float operands"))
        fns = {"tilefuse": lambda x=x, qw=qw, sw=sw, b=bias: tilefuse.ops.fp8_linear(
                   x, qw, sw, bias=b),
               "eager": lambda x=x, w=w, b=bias: F.linear(x, w, b)}
        vendor = _try(lambda x=x, qw=qw, sw=sw, b=bias: _torch_fp8_linear(x, qw, sw, b))
        if vendor is not None:
            fns["vendor"] = vendor
        out.append(roundtrip_case("fp8", f"quant_roundtrip/{M}x{K}/x={dname}", x,
                                  tilefuse.ops.quantize_fp8_per_row, tilefuse.ops.dequantize_fp8,
                                  _torch_fp8_roundtrip, dname))
        out.append(BenchCase(
            family="fp8", name=f"linear/{M}x{N}x{K}/x={dname}", shape=shape, dtype="fp8",
            fns=fns, flops=flops, bytes=float(2 * M * K + N * K + 4 * N + 2 * N + 2 * M * N),
            bound=_bound(M),
            note="dynamic per-row activation quantization + fp8 GEMM; eager = F.linear in "
                 f"{dname}; vendor = torch amax/scale/cast + torch._scaled_mm"))
    return out

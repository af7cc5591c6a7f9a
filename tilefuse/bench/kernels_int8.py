"""Int8 benchmark cases: the int8 GEMM (raw and W8A8 with epilogue) and weight-only int8 linear.

Shapes: a (M, K) x weight (K, N) with N = K = 4096 and M in {1, 16, 256, 4096} on GPU ("full": M=1
is batch-1 decode, M=4096 a prefill/training-size GEMM); tiny 64-wide shapes on CPU.

``cases(device, torch.int8, size)`` -- int8 GEMMs, reported against the GPU's int8 peak (the
peak table's ``int8`` column, via ``BenchCase.dtype == "int8"``):

* ``raw/MxNxK``: ``tilefuse`` = :func:`tilefuse.ops.int8_matmul` (int32 out); ``vendor`` =
  ``torch._int_mm`` (omitted where it rejects the shape, e.g. M <= 16 on some builds);
  ``eager`` = ``torch.mm`` in fp16 on the same shape (the GEMM int8 replaces: cuBLAS fp16).
* ``w8a8/MxNxK``: dequantizing epilogue ``(A @ B) * sa * sb + bias -> fp16``; ``tilefuse`` = one
  kernel; ``vendor`` = ``torch._int_mm`` + the scale/bias ops in eager; ``compile`` = that
  composition under :func:`torch.compile`; ``eager`` = fp16 ``F.linear``.

``cases(device, fp16|bf16|fp32, size)`` -- activations in that dtype:

* ``weight_only/MxNxK``: ``tilefuse`` = :func:`tilefuse.ops.weight_only_int8_linear`;
  ``eager`` = dequantize the weight then ``F.linear`` (what a naive weight-only layer does);
  ``compile`` = that under :func:`torch.compile` (Inductor can fuse the dequantize into its GEMM
  template); ``vendor`` = ``F.linear`` on the float weight (cuBLAS, no dequantize: the anchor).
* ``w8a8_linear/MxNxK``: :func:`tilefuse.ops.w8a8_linear` (x quantized per row on the fly, then
  the int8 GEMM); ``eager`` as for weight_only; ``vendor`` = ``F.linear`` on the float weight.
* ``quant_roundtrip/MxK``: :func:`tilefuse.ops.quantize_per_row` then ``dequantize_per_row`` vs
  the same absmax/round/clamp in eager torch (memory-bound).
* ``gemm/MxNxK`` (fp16/bf16 only): our float GEMM (:func:`tilefuse.ops.matmul`) vs ``torch.mm``,
  so the int8 rows have the float rows of the same shapes next to them.

Ops are counted as 2*M*N*K (int ops for int8); bytes are each operand read/written once. M <= 16
cases are weight-streaming (memory-bound), the rest compute-bound. No GPU number is asserted.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from tilefuse.bench.case import BenchCase, roundtrip_case

SHAPES = {"tiny": [(1, 64, 64), (16, 64, 64)],
          "full": [(1, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096), (4096, 4096, 4096)]}
FLOAT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _bound(M: int) -> str:
    """Weight-streaming GEMMs (M <= 16) are memory-bound (shared with the fp8 cases)."""
    return "memory" if M <= 16 else "compute"


def _try(fn):
    """``fn`` if one call of it runs, else None (the vendor op rejects some shapes/devices)."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - the vendor op rejects some shapes/devices
        return None
    return fn


def _int8_cases(device: str, size: str) -> List[BenchCase]:
    import tilefuse

    half = torch.float16 if device.startswith("cuda") else torch.float32
    out: List[BenchCase] = []

    def w8a8_eager(qa, qb, sa, sb, bias):
        return (torch._int_mm(qa, qb).float() * sa * sb + bias).to(half)

    compiled = torch.compile(w8a8_eager, dynamic=False)
    for M, N, K in SHAPES[size]:
        gen = torch.Generator(device="cpu").manual_seed(0)
        qa = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8).to(device)
        qb = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(device).t()
        sa = (torch.rand(M, 1, generator=gen) * 1e-2).to(device)
        sb = (torch.rand(N, generator=gen) * 1e-2).to(device)
        bias = torch.randn(N, generator=gen).to(device)
        af = torch.randn(M, K, generator=gen).to(device=device, dtype=half)
        wf = torch.randn(N, K, generator=gen).to(device=device, dtype=half)
        shape = {"M": M, "N": N, "K": K}
        ops = 2.0 * M * N * K
        vendor = _try(lambda qa=qa, qb=qb: torch._int_mm(qa, qb))
        fns = {"tilefuse": lambda qa=qa, qb=qb: tilefuse.ops.int8_matmul(qa, qb),
               "eager": lambda af=af, wf=wf: torch.mm(af, wf.t())}
        if vendor is not None:
            fns["vendor"] = vendor
        out.append(BenchCase(
            family="int8", name=f"raw/{M}x{N}x{K}", shape=shape, dtype="int8", fns=fns,
            flops=ops, bytes=float(M * K + K * N + 4 * M * N), bound=_bound(M),
            note="eager = fp16 torch.mm on the same shape; vendor = torch._int_mm"))
        fns = {"tilefuse": lambda qa=qa, qb=qb, sa=sa, sb=sb, bias=bias: tilefuse.ops.int8_matmul(
                   qa, qb, sa, sb, bias=bias, out_dtype=half),
               "eager": lambda af=af, wf=wf, bias=bias: F.linear(af, wf, bias.to(half))}
        composed = _try(lambda qa=qa, qb=qb, sa=sa, sb=sb, bias=bias: w8a8_eager(qa, qb, sa, sb,
                                                                                 bias))
        if composed is not None:
            fns["vendor"] = composed
            fns["compile"] = lambda qa=qa, qb=qb, sa=sa, sb=sb, bias=bias: compiled(
                qa, qb, sa, sb, bias)
        out.append(BenchCase(
            family="int8", name=f"w8a8/{M}x{N}x{K}/out={FLOAT_NAMES[half]}", shape=shape,
            dtype="int8", fns=fns, flops=ops,
            bytes=float(M * K + K * N + 4 * (M + 2 * N) + 2 * M * N), bound=_bound(M),
            note="vendor = torch._int_mm + eager scale/bias; eager = fp16 F.linear"))
    return out


def _torch_roundtrip(x: torch.Tensor) -> torch.Tensor:
    s = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return ((x.float() / s).round().clamp(-127, 127).to(torch.int8).float() * s).to(x.dtype)


def _float_cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    import tilefuse

    dname = FLOAT_NAMES[dtype]
    es = torch.tensor([], dtype=dtype).element_size()

    def dequant_linear(x, q, s, bias):
        return F.linear(x, (q.to(x.dtype) * s[:, None].to(x.dtype)), bias)

    compiled = torch.compile(dequant_linear, dynamic=False)
    out: List[BenchCase] = []
    for M, N, K in SHAPES[size]:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(device=device)
        q, s = tilefuse.ops.quantize_per_row(w)
        s = s.reshape(N)
        wf, bias = w.to(dtype), torch.zeros(N, device=device, dtype=dtype)
        shape = {"M": M, "N": N, "K": K}
        out.append(BenchCase(
            family="int8", name=f"weight_only/{M}x{N}x{K}", shape=shape, dtype=dname,
            fns={"tilefuse": lambda x=x, q=q, s=s, b=bias: tilefuse.ops.weight_only_int8_linear(
                     x, q, s, bias=b),
                 "eager": lambda x=x, q=q, s=s, b=bias: dequant_linear(x, q, s, b),
                 "compile": lambda x=x, q=q, s=s, b=bias: compiled(x, q, s, b),
                 "vendor": lambda x=x, w=wf, b=bias: F.linear(x, w, b)},
            flops=2.0 * M * N * K, bytes=float(es * (M * K + M * N) + K * N + 4 * N),
            bound=_bound(M), note="vendor = F.linear on the float weight (no dequantize)"))
        out.append(BenchCase(
            family="int8", name=f"w8a8_linear/{M}x{N}x{K}", shape=shape, dtype=dname,
            fns={"tilefuse": lambda x=x, q=q, s=s, b=bias: tilefuse.ops.w8a8_linear(
                     x, q, s, bias=b),
                 "eager": lambda x=x, q=q, s=s, b=bias: dequant_linear(x, q, s, b),
                 "vendor": lambda x=x, w=wf, b=bias: F.linear(x, w, b)},
            flops=2.0 * M * N * K, bytes=float(es * (M * K + M * N) + K * N + 4 * N),
            bound=_bound(M), note="x quantized per row on the fly + int8 GEMM; vendor = "
                                  "F.linear on the float weight"))
        out.append(roundtrip_case("int8", f"quant_roundtrip/{M}x{K}", x,
                                  tilefuse.ops.quantize_per_row, tilefuse.ops.dequantize_per_row,
                                  _torch_roundtrip, dname))
        if dtype in (torch.float16, torch.bfloat16):
            wt = wf.t()
            out.append(BenchCase(
                family="int8", name=f"gemm/{M}x{N}x{K}", shape=shape, dtype=dname,
                fns={"tilefuse": lambda x=x, wt=wt: tilefuse.ops.matmul(x, wt),
                     "vendor": lambda x=x, wt=wt: torch.mm(x, wt)},
                flops=2.0 * M * N * K, bytes=float(es * (M * K + K * N + M * N)),
                bound=_bound(M), note="float GEMM at the int8 shapes, for comparison"))
    return out


def cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    if dtype == torch.int8:
        return _int8_cases(device, size)
    if dtype in FLOAT_NAMES:
        return _float_cases(device, dtype, size)
    raise ValueError(f"int8 benchmarks take int8 (GEMM) or fp32/fp16/bf16 (weight-only), got "
                     f"{dtype}")

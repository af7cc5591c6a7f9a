"""Fused dynamic per-row int8 quantizer: absmax -> scale -> round -> int8 in one kernel.

For each row ``x[m, :]``: ``absmax = max |x|``, ``scale = absmax / 127`` (1.0 for an all-zero row)
and ``q = clamp(round(x * (127 / absmax)), -127, 127)`` (symmetric: -128 is never produced, so
``-q`` is always representable). A row holding any NaN or +-Inf gets ``scale = NaN`` and
``q = 0``, so dequantizing it (or an int8 GEMM using the scale) yields NaN: non-finite input
propagates instead of being silently clamped, with no host sync. Rounding is half away from zero
(``floor(|v| + 0.5)``) in both this kernel and the torch reference path, so the two agree bit for
bit where division is IEEE (the interpreter, the torch path); compiled GPU code may use an
approximate division, so a value sitting exactly on a rounding tie can land one step away
(documented in docs/quantization.md).

Rows that fit one tile (``ONE_TILE``: the whole row in registers) are read from memory once; wider
rows run two loops over column chunks (absmax, then quantize), the second read mostly from L2.
Several rows share a program when rows are short. Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, split_constexprs

QMAX = 127.0
MAX_ONE_TILE = 8192


@triton.jit
def _round_to_fp8(v, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """Round fp32 ``v`` (|v| <= the format's max) to the nearest fp8 value, ties to even; the
    result is still fp32 (and exactly representable in the fp8 format)."""
    a = tl.abs(v)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 a) for normal a
    e = tl.maximum(e, EMIN) - MBITS                         # log2 of the fp8 step at a
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - e) << 23).to(tl.float32, bitcast=True)
    t = a * inv_step                                        # exact: a power-of-two rescale
    f = tl.floor(t)
    d = t - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f) * step
    # the sign bit: -0.0 stays -0.0. ``r * -1.0``, not ``-r``: triton 3.6 lowers a float ``-r``
    # to ``0 - r``, which turns -0.0 into +0.0 (3.9 emits a true negation)
    return tl.where(v.to(tl.int32, bitcast=True) < 0, r * -1.0, r)


@triton.jit
def _quantize_tile(x, inv, finite, QMAX: tl.constexpr, FP8: tl.constexpr, MBITS: tl.constexpr,
                   EMIN: tl.constexpr):
    v = tl.where(finite[:, None], x * inv[:, None], 0.0)  # non-finite rows: q = 0, scale NaN
    if FP8:  # clamp, then round to the fp8 grid exactly (ties to even) in fp32
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        return _round_to_fp8(v, MBITS, EMIN)
    r = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))  # int8: half away from zero
    return tl.minimum(tl.maximum(r, -QMAX), QMAX)


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, N, stride_xm, stride_xn, stride_qm, stride_qn,
                         QMAX: tl.constexpr, FP8: tl.constexpr, MBITS: tl.constexpr,
                         EMIN: tl.constexpr, MIN_AMAX: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr):
    """Symmetric per-row quantization: ``scale = absmax / QMAX`` (at least ``MIN_AMAX / QMAX``),
    ``q = round(x / scale)`` to int8 (``FP8`` False) or to the fp8 format of ``q_ptr``
    (``MBITS``/``EMIN``); a row with NaN/Inf gets scale NaN and q = 0, an all-zero row scale 1."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rows64[:, None] * stride_xm
    q_rows = q_ptr + rows64[:, None] * stride_qm
    q_ty = q_ptr.dtype.element_ty
    if ONE_TILE:
        mask = r_mask[:, None] & (cols < N)[None, :]
        cols64 = cols.to(tl.int64)
        x = tl.load(x_rows + cols64[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
        # NaN/Inf are counted explicitly: max-reductions need not propagate NaN on GPU
        ok = tl.abs(x) < float("inf")
        absmax = tl.max(tl.where(ok, tl.abs(x), 0.0), axis=1)
        nonfinite = tl.max(tl.where(ok, 0, 1), axis=1)
    else:
        absmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        nonfinite = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for n0 in range(0, N, BLOCK_N):
            cc = n0 + cols
            mask = r_mask[:, None] & (cc < N)[None, :]
            x = tl.load(x_rows + cc.to(tl.int64)[None, :] * stride_xn, mask=mask,
                        other=0.0).to(tl.float32)
            ok = tl.abs(x) < float("inf")
            absmax = tl.maximum(absmax, tl.max(tl.where(ok, tl.abs(x), 0.0), axis=1))
            nonfinite = tl.maximum(nonfinite, tl.max(tl.where(ok, 0, 1), axis=1))
    finite = nonfinite == 0
    nonzero = absmax > 0
    safe = tl.where(nonzero, tl.maximum(absmax, MIN_AMAX), 1.0)
    inv = tl.where(nonzero, QMAX / safe, 0.0)
    scale = tl.where(nonzero, safe / QMAX, 1.0)
    scale = tl.where(finite, scale, float("nan"))
    tl.store(s_ptr + rows64, scale, mask=r_mask)
    if ONE_TILE:
        q = _quantize_tile(x, inv, finite, QMAX, FP8, MBITS, EMIN)
        tl.store(q_rows + cols64[None, :] * stride_qn, q.to(q_ty), mask=mask)
    else:
        for n0 in range(0, N, BLOCK_N):
            cc = n0 + cols
            mask = r_mask[:, None] & (cc < N)[None, :]
            cc64 = cc.to(tl.int64)
            x = tl.load(x_rows + cc64[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            q = _quantize_tile(x, inv, finite, QMAX, FP8, MBITS, EMIN)
            tl.store(q_rows + cc64[None, :] * stride_qn, q.to(q_ty), mask=mask)


def quant_config(M: int, N: int) -> dict:
    """Tile shape: the whole row when it fits (``ONE_TILE`` up to ``MAX_ONE_TILE`` elements, on
    every backend: wider rows take the two-pass path in the interpreter too), and enough rows to
    give each program ~4-8K elements on GPU (~64K in the interpreter, whose cost is per
    program). Unmeasured on GPU."""
    interp = interpreter_enabled()
    block_n = min(next_pow2(max(N, 1)), MAX_ONE_TILE)
    one_tile = block_n >= N
    target = (1 << 16) if interp else 4096
    block_m = max(1, min(next_pow2(max(M, 1)), target // block_n, 64 if not interp else 1024))
    warps = 8 if block_m * block_n >= 8192 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile, num_warps=warps)


_LAUNCH = launch_cache()
_N_RUNTIME = quantize_rows_kernel.arg_names.index("QMAX")
# q dtype -> (QMAX, FP8, mantissa bits, smallest normal exponent, smallest absmax)
FORMATS = {torch.int8: (QMAX, False, 0, 0, 0.0),
           torch.float8_e4m3fn: (448.0, True, 3, -6, 2.0 ** -100),
           torch.float8_e5m2: (57344.0, True, 2, -14, 2.0 ** -100)}


def launch_quantize_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """x (M, N) float with any strides -> q (M, N) int8 or fp8 (its dtype picks the format),
    scale (M,) fp32 (both written)."""
    M, N = x.shape
    if M == 0:
        return
    if N == 0:
        scale.fill_(1.0)
        return
    sig = (M, N, q.dtype)
    params = _LAUNCH.get(sig)
    if params is None:
        qmax, fp8, mbits, emin, min_amax = FORMATS[q.dtype]
        cfg = dict(quant_config(M, N), QMAX=qmax, FP8=fp8, MBITS=mbits, EMIN=emin,
                   MIN_AMAX=min_amax)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        params = _LAUNCH[sig] = (grid,) + split_constexprs(quantize_rows_kernel, _N_RUNTIME, cfg)
    grid, consts, opts = params
    quantize_rows_kernel[grid](x, q, scale, M, N, x.stride(0), x.stride(1), q.stride(0),
                               q.stride(1), *consts, **opts)


def torch_quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.int8):
    """Reference with the kernel's exact semantics: (q (M, N) ``dtype``, scale fp32 (M,))."""
    qmax, fp8, _, _, min_amax = FORMATS[dtype]
    xf = x.float()
    ok = xf.abs() < float("inf")  # False for NaN and +-Inf
    finite = ok.all(dim=1)
    absmax = (torch.where(ok, xf.abs(), 0.0).amax(dim=1) if x.shape[1]
              else xf.new_zeros(x.shape[0]))
    nonzero = absmax > 0
    safe = torch.where(nonzero, absmax.clamp(min=min_amax), torch.ones_like(absmax))
    # a true division: ``QMAX / tensor`` is reciprocal(tensor) * QMAX in torch (two roundings,
    # which moves exact .5 ties)
    inv = torch.where(nonzero, torch.full_like(safe, qmax) / safe, torch.zeros_like(absmax))
    scale = torch.where(nonzero, safe / qmax, torch.ones_like(absmax))
    scale = torch.where(finite, scale, float("nan"))
    v = torch.where(finite[:, None], xf * inv[:, None], 0.0)
    if fp8:  # torch's cast rounds to nearest even, as the kernel does
        return v.clamp_(-qmax, qmax).to(dtype), scale
    r = torch.where(v >= 0, torch.floor(v + 0.5), torch.ceil(v - 0.5)).clamp_(-qmax, qmax)
    return r.to(torch.int8), scale

"""Fused dynamic per-row fp8 quantizer: absmax -> scale -> scale, clamp, round -> fp8, one kernel.

For each row ``x[m, :]`` (fp32/fp16/bf16/fp64 in, read once when the row fits one tile):
``absmax = max |x|``, ``scale = absmax / FMAX`` (1.0 for an all-zero row) and
``q = fp8(clamp(x * (FMAX / absmax), -FMAX, FMAX))`` with ``FMAX`` = 448 (``float8_e4m3fn``) or
57344 (``float8_e5m2``), rounded to nearest even. Rows whose absmax is below ``2**-100`` are
scaled as if it were ``2**-100`` (so ``FMAX / absmax`` stays finite). A row holding any NaN or
+-Inf gets ``scale = NaN`` and ``q = 0`` (as the int8 quantizer: non-finite input propagates
through the GEMM's epilogue instead of being clamped, with no host sync).

Rounding is done in fp32 arithmetic that is exact on every backend (a power-of-two rescale,
``floor`` and a half-to-even test), and only the already-representable value is converted to fp8.
The Triton 3.9 interpreter's float -> fp8 conversion rounds some values to the wrong binade
(e.g. 126.4 -> 64 instead of 128), so a plain ``.to(fp8)`` would be wrong there; this way the
interpreter, the GPU and the torch reference (:func:`torch_quantize_fp8_rows`, which uses torch's
round-to-nearest-even conversion) agree bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse.kernels import launch_cache, split_constexprs
from tilefuse.kernels.quant import quant_config

# dtype -> (largest finite value, mantissa bits, smallest normal exponent)
FORMATS = {torch.float8_e4m3fn: (448.0, 3, -6), torch.float8_e5m2: (57344.0, 2, -14)}
MIN_ABSMAX = 2.0 ** -100


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
    return tl.where(v.to(tl.int32, bitcast=True) < 0, -r, r)  # the sign bit: -0.0 stays -0.0


@triton.jit
def _quantize_tile(x, inv, finite, FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
    v = tl.where(finite[:, None], x * inv[:, None], 0.0)  # non-finite rows: q = 0, scale NaN
    v = tl.minimum(tl.maximum(v, -FMAX), FMAX)
    return _round_to_fp8(v, MBITS, EMIN)


@triton.jit
def quantize_fp8_rows_kernel(x_ptr, q_ptr, s_ptr, M, N, stride_xm, stride_xn, stride_qm,
                             stride_qn, FMAX: tl.constexpr, MBITS: tl.constexpr,
                             EMIN: tl.constexpr, MIN_AMAX: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             ONE_TILE: tl.constexpr):
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
    safe = tl.maximum(absmax, MIN_AMAX)
    inv = tl.where(nonzero, FMAX / safe, 0.0)
    scale = tl.where(nonzero, safe / FMAX, 1.0)
    scale = tl.where(finite, scale, float("nan"))
    tl.store(s_ptr + rows64, scale, mask=r_mask)
    if ONE_TILE:
        q = _quantize_tile(x, inv, finite, FMAX, MBITS, EMIN)
        tl.store(q_rows + cols64[None, :] * stride_qn, q.to(q_ty), mask=mask)
    else:
        for n0 in range(0, N, BLOCK_N):
            cc = n0 + cols
            mask = r_mask[:, None] & (cc < N)[None, :]
            cc64 = cc.to(tl.int64)
            x = tl.load(x_rows + cc64[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
            q = _quantize_tile(x, inv, finite, FMAX, MBITS, EMIN)
            tl.store(q_rows + cc64[None, :] * stride_qn, q.to(q_ty), mask=mask)


_LAUNCH = launch_cache()
_N_RUNTIME = quantize_fp8_rows_kernel.arg_names.index("FMAX")


def launch_quantize_fp8_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """x (M, N) float with any strides -> q (M, N) fp8 (its dtype picks the format), scale (M,)
    fp32 (both written)."""
    M, N = x.shape
    if M == 0:
        return
    if N == 0:
        scale.fill_(1.0)
        return
    sig = (M, N, q.dtype)
    params = _LAUNCH.get(sig)
    if params is None:
        fmax, mbits, emin = FORMATS[q.dtype]
        cfg = dict(quant_config(M, N), FMAX=fmax, MBITS=mbits, EMIN=emin, MIN_AMAX=MIN_ABSMAX)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        params = _LAUNCH[sig] = (grid,) + split_constexprs(quantize_fp8_rows_kernel, _N_RUNTIME,
                                                           cfg)
    grid, consts, opts = params
    quantize_fp8_rows_kernel[grid](x, q, scale, M, N, x.stride(0), x.stride(1), q.stride(0),
                                   q.stride(1), *consts, **opts)


def torch_quantize_fp8_rows(x: torch.Tensor, dtype: torch.dtype):
    """Reference with the kernel's exact semantics: (q (M, N) ``dtype``, scale fp32 (M,))."""
    fmax = FORMATS[dtype][0]
    xf = x.float()
    ok = xf.abs() < float("inf")  # False for NaN and +-Inf
    finite = ok.all(dim=1)
    absmax = (torch.where(ok, xf.abs(), 0.0).amax(dim=1) if x.shape[1]
              else xf.new_zeros(x.shape[0]))
    nonzero = absmax > 0
    safe = absmax.clamp(min=MIN_ABSMAX)
    # a true division (``fmax / tensor`` is reciprocal(tensor) * fmax in torch: two roundings)
    inv = torch.where(nonzero, torch.full_like(safe, fmax) / safe, torch.zeros_like(absmax))
    scale = torch.where(nonzero, safe / fmax, torch.ones_like(absmax))
    scale = torch.where(finite, scale, float("nan"))
    v = torch.where(finite[:, None], xf * inv[:, None], 0.0).clamp_(-fmax, fmax)
    return v.to(dtype), scale

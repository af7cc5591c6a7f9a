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

import math

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


_FILL = ("fill",)  # a bound quantization of rows of width 0: every scale is 1


def bind_quantize_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor):
    """The launch of one signature (x (M, N), q (M, N), scale (M,)) bound once: None when there
    is nothing to do (M = 0), else what :func:`rows_launcher` takes (strides included)."""
    M, N = x.shape
    if M == 0:
        return None
    if N == 0:
        return _FILL
    sig = (M, N, q.dtype)
    params = _LAUNCH.get(sig)
    if params is None:
        qmax, fp8, mbits, emin, min_amax = FORMATS[q.dtype]
        cfg = dict(quant_config(M, N), QMAX=qmax, FP8=fp8, MBITS=mbits, EMIN=emin,
                   MIN_AMAX=min_amax)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        params = _LAUNCH[sig] = (grid,) + split_constexprs(quantize_rows_kernel, _N_RUNTIME, cfg)
    grid, consts, opts = params
    return grid, (M, N, x.stride(0), x.stride(1), q.stride(0), q.stride(1)) + consts, opts


def _fill_scales(x, q, scale) -> None:
    scale.fill_(1.0)


def _nothing(*tensors) -> None:
    return None


def rows_launcher(bound):
    """``launch(x, q, scale)``: the launch of :func:`bind_quantize_rows`'s ``bound`` on tensors
    of its signature (only their data pointers are read: the strides are bound)."""
    if bound is None:
        return _nothing
    if bound is _FILL:
        return _fill_scales
    grid, args, opts = bound
    kernel = quantize_rows_kernel  # (``kernel.run`` is looked up per call: tools patch the class)

    def launch(x, q, scale):
        kernel.run(x, q, scale, *args, grid=grid, warmup=False, **opts)
    return launch


def launch_quantize_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """x (M, N) float with any strides -> q (M, N) int8 or fp8 (its dtype picks the format),
    scale (M,) fp32 (both written)."""
    rows_launcher(bind_quantize_rows(x, q, scale))(x, q, scale)


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


# --------------------------------------------------------------------------------------------
# dequantization: out = (float(q) * float(scale)).to(out dtype), scale broadcast to q
# --------------------------------------------------------------------------------------------
DEQUANT_KINDS = {torch.int8: 0, torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}


@triton.jit
def _decode(q, KIND: tl.constexpr):
    """Exact fp32 value of int8 (``KIND`` 0) or of the bits of a ``float8_e4m3fn`` (1) /
    ``float8_e5m2`` (2) element, decoded with integer ops (no fp8 conversion instruction)."""
    if KIND == 0:
        return q.to(tl.float32)
    b = q.to(tl.uint8, bitcast=True)
    if KIND == 2:  # e5m2 is the high byte of an fp16 (infinities and NaN included)
        return (b.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(tl.float32)
    bi = b.to(tl.int32)
    e = (bi >> 3) & 15
    m = bi & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # (1 + m/8) 2^(e-7)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)        # subnormal: m 2^-9
    mag = tl.where((e == 15) & (m == 7), float("nan"), mag)                # no infinities
    # ``mag * -1.0``, not ``-mag``: triton 3.6 lowers a float negation to ``0 - x`` (+0.0)
    return tl.where(bi >= 128, mag * -1.0, mag)


@triton.jit
def _to_f32(v):
    """Exact fp32 of an fp16/bf16/fp32 ``v``; bf16 by its bits (the interpreter's bf16 -> fp32
    cast flushes subnormals)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def _cast_out(y, OUT: tl.constexpr):
    """fp32 ``y`` rounded to ``OUT`` to nearest even. bf16 is rounded in integer ops, as torch
    does (the interpreter's fp32 -> bf16 cast truncates and mishandles subnormals), NaN ->
    0x7FC0; other formats by the cast itself."""
    if OUT == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        bits = tl.where(y != y, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(OUT)


@triton.jit
def dequantize_kernel(q_ptr, s_ptr, out_ptr, R, C, stride_qr, stride_qc, stride_sr, stride_sc,
                      COL_BLOCKS, KIND: tl.constexpr, S_ROWS: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out[r, c] = (decode(q[r, c]) * float(s[r, c])).to(out)``: the fp32 product, rounded
    once by the store's cast; out is (R, C) row-major. ``S_ROWS``: the scale is constant along
    a row (``stride_sc`` is 0), loaded once per row. One grid axis (rows x column blocks)."""
    pid = tl.program_id(0)
    pid_r = pid // COL_BLOCKS
    pid_c = pid - pid_r * COL_BLOCKS
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    r_mask = rows < R
    mask = r_mask[:, None] & (cols < C)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qr + cols[None, :] * stride_qc, mask=mask)
    if S_ROWS:
        s = _to_f32(tl.load(s_ptr + rows * stride_sr, mask=r_mask))[:, None]
    else:
        s = _to_f32(tl.load(s_ptr + rows[:, None] * stride_sr + cols[None, :] * stride_sc,
                            mask=mask))
    y = _decode(q, KIND) * s
    tl.store(out_ptr + rows[:, None] * C + cols[None, :],
             _cast_out(y, out_ptr.dtype.element_ty), mask=mask)


def dequant_config(R: int, C: int) -> dict:
    """Tile shape, the same on every backend: up to 1024 columns and rows up to ~4K elements per
    program. Unmeasured on GPU."""
    block_c = min(next_pow2(C), 1024)
    block_r = max(1, min(next_pow2(R), 4096 // block_c))
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)


def _merge(shape, strides):
    """The stride of ``shape``'s dims merged into one index (row-major order), or None when they
    do not merge (size-1 dims are free; an empty group merges with stride 0)."""
    merged = None
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size == 1:
            continue
        if merged is None:
            merged, inner = stride, stride * size
        elif stride != inner:
            return None
        else:
            inner = stride * size
    return 0 if merged is None else merged


def dequant_layout(shape, q: torch.Tensor, scale: torch.Tensor):
    """``(R, C, stride_qr, stride_qc, stride_sr, stride_sc)``: the broadcast output ``shape`` as
    R rows of C elements (trailing dims merged into C, leading into R) such that ``q`` and
    ``scale`` (broadcast to ``shape``) are strided 2-D views; the split keeps the last dim as
    the columns when it can. None when no split gives both as 2-D views."""
    nd = len(shape)
    strides = []
    for t in (q, scale):
        pad = nd - t.dim()
        strides.append([0] * pad + [0 if size == 1 else st
                                    for size, st in zip(t.shape, t.stride())])
    for k in [nd - 1] + list(range(nd - 2, -1, -1)) + [nd]:
        k = max(k, 0)
        lead, tail = shape[:k], shape[k:]
        out = []
        for st in strides:
            sr, sc = _merge(lead, st[:k]), _merge(tail, st[k:])
            if sr is None or sc is None:
                break
            out += [sr, sc]
        else:
            return (math.prod(lead), math.prod(tail), *out)
    return None


_DQ_N_RUNTIME = dequantize_kernel.arg_names.index("KIND")


def bind_dequantize(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor):
    """The launch of one signature bound once: None when ``out`` is empty or ``q`` and ``scale``
    have no common 2-D layout (:func:`dequant_layout`; the caller then passes contiguous
    broadcasts), else what :func:`dequant_launcher` takes."""
    if out.numel() == 0:
        return None
    layout = dequant_layout(tuple(out.shape), q, scale)
    if layout is None:
        return None
    R, C, sqr, sqc, ssr, ssc = layout
    sig = (R, C, q.dtype, ssc == 0)
    params = _LAUNCH.get(sig)
    if params is None:
        cfg = dequant_config(R, C)
        cols = triton.cdiv(C, cfg["BLOCK_C"])
        cfg.update(KIND=DEQUANT_KINDS[q.dtype], S_ROWS=ssc == 0)
        consts, opts = split_constexprs(dequantize_kernel, _DQ_N_RUNTIME, cfg)
        params = _LAUNCH[sig] = ((triton.cdiv(R, cfg["BLOCK_R"]) * cols,), cols, consts, opts)
    grid, cols, consts, opts = params
    return grid, (R, C, sqr, sqc, ssr, ssc, cols) + consts, opts


def dequant_launcher(bound):
    """``launch(q, scale, out) -> out``: the launch of :func:`bind_dequantize`'s ``bound`` on
    tensors of its signature (only their data pointers are read: the strides are bound)."""
    grid, args, opts = bound
    kernel = dequantize_kernel  # (``kernel.run`` is looked up per call: tools patch the class)

    def launch(q, scale, out):
        kernel.run(q, scale, out, *args, grid=grid, warmup=False, **opts)
        return out
    return launch

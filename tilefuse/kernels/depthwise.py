"""Direct depthwise conv2d kernels (no ``tl.dot``): forward with fused epilogue, grad_input
(transposed depthwise) and grad_weight + grad_bias in one pass plus a fixed-order reduction.

Layout-agnostic: every tensor is addressed through its 4 strides, so NCHW, channels_last and
sliced views run the same kernel (stride 1 is specialised by Triton, so the contiguous axis is
known to the compiler). A program owns a ``BLOCK_H x BLOCK_W`` tile of output pixels times
``BLOCK_C`` channels of one image; for every tap it loads the shifted input tile (the halo is
re-read from L1/L2, not from HBM) and accumulates in fp32 (fp64 for fp64). Output channel ``co``
reads input channel ``co // MULT`` (channel multiplier). Offsets are int32 (``IDX``) unless a
tensor spans 2**31 elements or more.

Epilogue order (same as the matmul family): ``z = conv + bias`` -> optional store of ``z`` (for the
activation backward) -> ``act(z)`` (shared helper) -> ``+ residual`` -> cast and store. relu and
relu6 without a residual store no ``z``: their derivative is read off the output
(``relu'(z) = y > 0``, ``relu6'(z) = 0 < y < 6``, exact also after rounding ``y``).

Backward: ``dz = dy * act'(saved)`` is formed on the fly wherever ``dy`` is read (the saved tensor
is ``z``, or ``y`` for relu/relu6), so there is no separate elementwise pass. grad_input is a
gather over the taps (no atomics). grad_weight: program (channel block, split) walks a fixed range
of output tiles, reads each ``dy`` (and saved) tile once, forms all ``KH*KW`` tap sums from the
shifted ``x`` tiles plus the bias sum, and writes one partial row; a second kernel sums the
partials over splits in a fixed order (deterministic) and writes ``dw``/``db`` in their dtypes.
The tiling and the split count are pure functions of the problem and
:func:`tilefuse.kernels.sm_count`, so the interpreter runs the GPU's algorithm.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse.kernels import launch_cache, next_pow2, sm_count, split_constexprs
from tilefuse.kernels.activations import activation_grad, apply_activation

MAX_GRID_Z = 65535
INT32_LIMIT = 2 ** 31


@triton.jit
def dw_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, pre_ptr,
    C_out, H, W, OH, OW, TILES_W, PAD_H, PAD_W,
    sxn, sxc, sxh, sxw,
    swc, swh, sww,
    syn, syc, syh, syw,
    srn, src, srh, srw,
    stride_bias,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE_PRE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, IDX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(IDX)
    i = tl.arange(0, BLOCK_H * BLOCK_W)
    oh = ((pid_p // TILES_W) * BLOCK_H + i // BLOCK_W).to(IDX)
    ow = tl.max_contiguous(tl.multiple_of((pid_p % TILES_W) * BLOCK_W, BLOCK_W)
                           + i % BLOCK_W, BLOCK_W).to(IDX)
    co = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(IDX)
    c_mask = co < C_out
    ci = co // MULT
    p_mask = (oh < OH) & (ow < OW)

    x_base = x_ptr + n * sxn + ci[None, :] * sxc
    w_base = w_ptr + co * swc
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=ACC_DTYPE)
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        m_h = p_mask & (ih >= 0) & (ih < H)
        row = ih * sxh
        for kw in tl.static_range(KW):
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            m = m_h & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + (row + iw * sxw)[:, None],
                         mask=m[:, None] & c_mask[None, :], other=0.0)
            wv = tl.load(w_base + kh * swh + kw * sww, mask=c_mask, other=0.0)
            acc += xv.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]

    if HAS_BIAS:
        b = tl.load(bias_ptr + co * stride_bias, mask=c_mask, other=0.0)
        acc += b.to(ACC_DTYPE)[None, :]
    out_mask = p_mask[:, None] & c_mask[None, :]
    y_off = n * syn + co[None, :] * syc + (oh * syh + ow * syw)[:, None]
    if SAVE_PRE:  # pre has the output's strides
        tl.store(pre_ptr + y_off, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
    acc = apply_activation(acc, ACTIVATION, ACT_PARAM)
    if HAS_RESIDUAL:
        r_off = n * srn + co[None, :] * src + (oh * srh + ow * srw)[:, None]
        r = tl.load(res_ptr + r_off, mask=out_mask, other=0.0)
        acc += r.to(ACC_DTYPE)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _load_dz(dy_ptr, s_ptr, n, co, oh, ow, mask, sdn, sdc, sdh, sdw, ssn, ssc, ssh, ssw,
             ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dz = dy * act'(saved) of a (pixels, channels) tile (``saved``: z, or y for relu/relu6)."""
    dv = tl.load(dy_ptr + n * sdn + co[None, :] * sdc + (oh * sdh + ow * sdw)[:, None],
                 mask=mask, other=0.0).to(ACC_DTYPE)
    if ACTIVATION != 0:
        sv = tl.load(s_ptr + n * ssn + co[None, :] * ssc + (oh * ssh + ow * ssw)[:, None],
                     mask=mask, other=0.0).to(ACC_DTYPE)
        dv = dv * activation_grad(sv, ACTIVATION, ACT_PARAM)
    return dv


@triton.jit
def dw_conv_bwd_input_kernel(
    dy_ptr, s_ptr, w_ptr, dx_ptr,
    C_in, H, W, OH, OW, TILES_W, PAD_H, PAD_W,
    sdn, sdc, sdh, sdw,
    ssn, ssc, ssh, ssw,
    swc, swh, sww,
    sxn, sxc, sxh, sxw,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
    IDX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx[n, ci, ih, iw] = sum_{m, kh, kw} dz[n, ci*MULT+m, oh, ow] * w[ci*MULT+m, kh, kw] where
    oh*STRIDE_H = ih + PAD_H - kh*DIL_H (a gather: no atomics, deterministic)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(IDX)
    i = tl.arange(0, BLOCK_H * BLOCK_W)
    ih = ((pid_p // TILES_W) * BLOCK_H + i // BLOCK_W).to(IDX)
    iw = tl.max_contiguous(tl.multiple_of((pid_p % TILES_W) * BLOCK_W, BLOCK_W)
                           + i % BLOCK_W, BLOCK_W).to(IDX)
    ci = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(IDX)
    c_mask = ci < C_in
    p_mask = (ih < H) & (iw < W)
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=ACC_DTYPE)
    for m in range(MULT):
        co = ci * MULT + m
        w_base = w_ptr + co * swc
        for kh in range(KH):
            th = ih + PAD_H - kh * DIL_H
            oh = th // STRIDE_H
            m_h = p_mask & (th >= 0) & (oh < OH)
            if STRIDE_H > 1:
                m_h = m_h & (th % STRIDE_H == 0)
            for kw in tl.static_range(KW):
                tw = iw + PAD_W - kw * DIL_W
                ow = tw // STRIDE_W
                mk = m_h & (tw >= 0) & (ow < OW)
                if STRIDE_W > 1:
                    mk = mk & (tw % STRIDE_W == 0)
                dv = _load_dz(dy_ptr, s_ptr, n, co, oh, ow, mk[:, None] & c_mask[None, :],
                              sdn, sdc, sdh, sdw, ssn, ssc, ssh, ssw, ACTIVATION, ACT_PARAM,
                              ACC_DTYPE)
                wv = tl.load(w_base + kh * swh + kw * sww, mask=c_mask, other=0.0)
                acc += dv * wv.to(ACC_DTYPE)[None, :]
    x_off = n * sxn + ci[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(dx_ptr + x_off, acc.to(dx_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def dw_conv_bwd_weight_kernel(
    dy_ptr, s_ptr, x_ptr, part_ptr,
    C_out, H, W, OH, OW, TILES_W, TILES_P, PAD_H, PAD_W, TILES, TILES_PER_SPLIT,
    sdn, sdc, sdh, sdw,
    ssn, ssc, ssh, ssw,
    sxn, sxc, sxh, sxw,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
    IDX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Stage 1 of dw/db: program (channel block, split) walks output tiles
    ``[split * TILES_PER_SPLIT, ...)`` (tile = image x pixel tile) in order; each dz tile is read
    once and multiplied by the ``KH*KW`` shifted x tiles. ``part[split, co, t]`` holds the tap
    sums (``t < KH*KW``) and the dz sum (``t == KH*KW``, the bias gradient)."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    i = tl.arange(0, BLOCK_H * BLOCK_W)
    t = tl.arange(0, BLOCK_T)
    co = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(IDX)
    c_mask = co < C_out
    ci = co // MULT
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC_DTYPE)
    first = split * TILES_PER_SPLIT
    for k in range(first, tl.minimum(first + TILES_PER_SPLIT, TILES)):
        n = (k // TILES_P).to(IDX)
        p = k % TILES_P
        oh = ((p // TILES_W) * BLOCK_H + i // BLOCK_W).to(IDX)
        ow = tl.max_contiguous(tl.multiple_of((p % TILES_W) * BLOCK_W, BLOCK_W)
                               + i % BLOCK_W, BLOCK_W).to(IDX)
        p_mask = (oh < OH) & (ow < OW)
        dz = _load_dz(dy_ptr, s_ptr, n, co, oh, ow, p_mask[:, None] & c_mask[None, :],
                      sdn, sdc, sdh, sdw, ssn, ssc, ssh, ssw, ACTIVATION, ACT_PARAM, ACC_DTYPE)
        acc += tl.where(t[:, None] == KH * KW, tl.sum(dz, axis=0)[None, :], 0.0)
        x_base = x_ptr + n * sxn + ci[None, :] * sxc
        for kh in range(KH):
            ih = oh * STRIDE_H - PAD_H + kh * DIL_H
            m_h = p_mask & (ih >= 0) & (ih < H)
            for kw in tl.static_range(KW):
                iw = ow * STRIDE_W - PAD_W + kw * DIL_W
                m = m_h & (iw >= 0) & (iw < W)
                xv = tl.load(x_base + (ih * sxh + iw * sxw)[:, None],
                             mask=m[:, None] & c_mask[None, :], other=0.0)
                s = tl.sum(dz * xv.to(ACC_DTYPE), axis=0)
                acc += tl.where(t[:, None] == kh * KW + kw, s[None, :], 0.0)
    out = part_ptr + (split.to(IDX) * C_out + co[None, :]) * (KH * KW + 1) + t[:, None]
    tl.store(out, acc, mask=(t[:, None] <= KH * KW) & c_mask[None, :])


@triton.jit
def dw_conv_reduce_kernel(part_ptr, dw_ptr, db_ptr, SPLITS, COLS,
                          T: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 2: ``dw[co, t]`` / ``db[co]`` = sum over splits of the partials, in split order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < COLS
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLITS):
        acc += tl.load(part_ptr + s * COLS + offs, mask=mask, other=0.0)
    c = offs // (T + 1)
    t = offs % (T + 1)
    tl.store(dw_ptr + c * T + t, acc.to(dw_ptr.dtype.element_ty), mask=mask & (t < T))
    if HAS_BIAS:
        tl.store(db_ptr + c, acc.to(db_ptr.dtype.element_ty), mask=mask & (t == T))


# ------------------------------------------------------------------------------------------------
# configs and launchers
# ------------------------------------------------------------------------------------------------

def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _idx(*tensors):
    """int32 offsets unless some tensor's addressed span reaches 2**31 elements."""
    for t in tensors:
        if t is not None and 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())
                                     if s > 0) >= INT32_LIMIT:
            return tl.int64
    return tl.int32


def fit_block(n: int, cap: int, floor: int = 1) -> int:
    """The power of two in ``[min(floor, next_pow2(n)), min(cap, next_pow2(n))]`` that covers
    ``n`` with the least padding (the larger one on ties): OW=56 -> 8 (no idle lanes), not 64."""
    hi = min(cap, next_pow2(n))
    best, b = hi, hi
    while b >= max(1, min(floor, hi)):
        if -(-n // b) * b < -(-n // best) * best:
            best = b
        b //= 2
    return best


def tile_config(C: int, OH: int, OW: int, channels_last: bool) -> dict:
    """Tile of ``BLOCK_H x BLOCK_W`` pixels x ``BLOCK_C`` channels (a pure function of the
    problem: the interpreter runs the GPU's tiles).

    channels_last: channels are the contiguous axis, so a channel block fitted to C (16..64) and a
    small pixel tile; NCHW: a row-major pixel tile with BLOCK_W fitted to OW (8..64, 16-byte rows
    or more) and few channels. Small maps (7x7) take several channels.
    """
    if channels_last:  # ~1024 elements (<= 128 registers on sm_90 up to 7x7 backward)
        bc = fit_block(C, 64, 16)
        bw = fit_block(OW, 8, 4)
        cap = min(8, max(1, 1024 // (bc * bw)))
        bh = fit_block(OH, cap, max(1, cap // 2))
        return dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=4)
    bw = fit_block(OW, 64, 8)
    bh = fit_block(OH, max(1, 1024 // bw), max(1, 64 // bw))
    bc = min(next_pow2(C), max(1, 1024 // (bh * bw)))
    return dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=4)


def _grid_batches(n: int):
    for start in range(0, n, MAX_GRID_Z):
        yield start, min(n, start + MAX_GRID_Z)


_FWD_LAUNCH = launch_cache()
_BWD_INPUT_LAUNCH = launch_cache()
_BWD_WEIGHT_LAUNCH = launch_cache()
_FWD_RUNTIME = dw_conv_fwd_kernel.arg_names.index("STRIDE_H")
_BWD_INPUT_RUNTIME = dw_conv_bwd_input_kernel.arg_names.index("STRIDE_H")
_BWD_WEIGHT_RUNTIME = dw_conv_bwd_weight_kernel.arg_names.index("STRIDE_H")


def _tiled_launch(kernel, n_runtime, N, C, OH, OW, channels_last, config, constexprs):
    """(TILES_W, ((start, end, grid) per batch of images), constexprs, options) of a launch
    over ``OH x OW`` pixel tiles times ``C`` channels."""
    cfg = dict(config or tile_config(C, OH, OW, channels_last))
    cfg.setdefault("num_warps", 4)
    tiles_w = triton.cdiv(OW, cfg["BLOCK_W"])
    grid_p = triton.cdiv(OH, cfg["BLOCK_H"]) * tiles_w
    grid_c = triton.cdiv(C, cfg["BLOCK_C"])
    consts, opts = split_constexprs(kernel, n_runtime, dict(constexprs, **cfg))
    batches = tuple((s, e, (grid_p, grid_c, e - s)) for s, e in _grid_batches(N))
    return tiles_w, batches, consts, opts


def _is_channels_last(t, C) -> bool:
    return t.stride()[1] == 1 and C > 1


def launch_forward(x, weight, y, bias=None, residual=None, pre=None, stride=(1, 1),
                   padding=(0, 0), dilation=(1, 1), activation: int = 0, act_param: float = 0.0,
                   config: dict | None = None):
    """y = act(dwconv(x, weight) + bias) + residual. ``padding`` is (top, left); the output size
    is taken from ``y`` (any extra bottom/right padding is implied by it). The launch parameters
    of a signature are computed once (:func:`tilefuse.kernels.launch_cache`)."""
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    OH, OW = y.shape[2], y.shape[3]
    if y.numel() == 0:
        return y
    ys = y.stride()
    channels_last = _is_channels_last(y, C_out)
    idx = _idx(x, y, residual)
    sig = (N, C_in, C_out, KH, KW, OH, OW, channels_last, stride[0], stride[1], dilation[0],
           dilation[1], activation, act_param, bias is not None, residual is not None,
           pre is not None, x.dtype, idx)
    launch = _FWD_LAUNCH.get(sig) if config is None else None
    if launch is None:
        launch = _tiled_launch(dw_conv_fwd_kernel, _FWD_RUNTIME, N, C_out, OH, OW,
                               channels_last, config, dict(
            STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
            KH=KH, KW=KW, MULT=C_out // C_in, ACTIVATION=activation, ACT_PARAM=float(act_param),
            HAS_BIAS=sig[14], HAS_RESIDUAL=sig[15], SAVE_PRE=sig[16], ACC_DTYPE=_acc(x.dtype),
            IDX=idx))
        if config is None:
            _FWD_LAUNCH[sig] = launch
    tiles_w, batches, consts, opts = launch
    res = residual if residual is not None else y
    b = bias if bias is not None else y
    sb = bias.stride(0) if bias is not None else 0
    ws = weight.stride()
    xs, rs = x.stride(), res.stride()
    one = len(batches) == 1  # no per-batch views (the usual case)
    for s, e, grid in batches:
        dw_conv_fwd_kernel[grid](
            x if one else x[s:e], weight, b, res if one else res[s:e], y if one else y[s:e],
            y if pre is None else (pre if one else pre[s:e]),
            C_out, H, W, OH, OW, tiles_w, padding[0], padding[1],
            *xs, ws[0], ws[2], ws[3], *ys, *rs, sb, *consts, **opts)
    return y


def launch_backward_input(dy, weight, dx, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                          saved=None, activation: int = 0, act_param: float = 0.0):
    """dx (N, C_in, H, W), preallocated with any strides, from ``dz = dy * act'(saved)``
    (``saved``: the pre-activation, or the output for relu/relu6; unused when activation=0)."""
    N, C_in, H, W = dx.shape
    C_out, _, KH, KW = weight.shape
    OH, OW = dy.shape[2], dy.shape[3]
    if dx.numel() == 0:
        return dx
    if dy.numel() == 0:
        return dx.zero_()
    if saved is None or activation == 0:
        saved, activation, act_param = dy, 0, 0.0
    xs = dx.stride()
    channels_last = _is_channels_last(dx, C_in)
    idx = _idx(dy, saved, dx)
    sig = (N, C_in, H, W, C_out, KH, KW, channels_last, stride[0], stride[1], dilation[0],
           dilation[1], activation, act_param, dx.dtype, idx)
    launch = _BWD_INPUT_LAUNCH.get(sig)
    if launch is None:
        launch = _BWD_INPUT_LAUNCH[sig] = _tiled_launch(
            dw_conv_bwd_input_kernel, _BWD_INPUT_RUNTIME, N, C_in, H, W, channels_last, None,
            dict(STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
                 KH=KH, KW=KW, MULT=C_out // C_in, ACTIVATION=activation,
                 ACT_PARAM=float(act_param), ACC_DTYPE=_acc(dx.dtype), IDX=idx))
    tiles_w, batches, consts, opts = launch
    ws = weight.stride()
    ds, ss = dy.stride(), saved.stride()
    one = len(batches) == 1
    for s, e, grid in batches:
        dw_conv_bwd_input_kernel[grid](
            dy if one else dy[s:e], saved if one else saved[s:e], weight,
            dx if one else dx[s:e], C_in, H, W, OH, OW, tiles_w, padding[0], padding[1],
            *ds, *ss, ws[0], ws[2], ws[3], *xs, *consts, **opts)
    return dx


def weight_grad_plan(N, C_out, OH, OW, KH, KW, channels_last, device, num_splits=None):
    """(stage-1 grid, tile constexprs, TILES_W, TILES_P, TILES, TILES_PER_SPLIT, splits): the
    output tiles are split into contiguous ranges, about 4 programs per SM in all (from
    :func:`~tilefuse.kernels.sm_count`: the interpreter gets the GPU's rule at its pseudo-SM
    count), at least 128 output pixels (and 2 tiles) per range so the partials stay small."""
    cfg = tile_config(C_out, OH, OW, channels_last)
    tiles_w = triton.cdiv(OW, cfg["BLOCK_W"])
    tiles_p = triton.cdiv(OH, cfg["BLOCK_H"]) * tiles_w
    tiles = N * tiles_p
    c_blocks = triton.cdiv(C_out, cfg["BLOCK_C"])
    if num_splits is None:
        least = max(2, 128 // (cfg["BLOCK_H"] * cfg["BLOCK_W"]))
        num_splits = min(triton.cdiv(4 * sm_count(device), c_blocks), triton.cdiv(tiles, least))
    per_split = triton.cdiv(tiles, max(1, min(num_splits, tiles)))
    splits = triton.cdiv(tiles, per_split)
    cfg["BLOCK_T"] = next_pow2(KH * KW + 1)
    return (c_blocks, splits), cfg, tiles_w, tiles_p, tiles, per_split, splits


def launch_backward_weight(dy, x, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                           saved=None, activation: int = 0, act_param: float = 0.0,
                           dtype: torch.dtype | None = None, bias_grad: bool = False,
                           num_splits: int | None = None):
    """(dw as (C_out, 1, KH, KW), db as (C_out,) or None) in ``dtype`` (default: the
    accumulation dtype, fp32/fp64), from ``dz = dy * act'(saved)``: stage 1 writes per-split
    partials, stage 2 sums them in split order (deterministic)."""
    N, C_in, H, W = x.shape
    C_out, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    KH, KW = kernel_size
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dtype = dtype or acc_dtype
    dw = torch.empty((C_out, 1, KH, KW), device=x.device, dtype=dtype)
    db = torch.empty((C_out,), device=x.device, dtype=dtype) if bias_grad else None
    if N * OH * OW == 0 or C_out == 0:
        return dw.zero_(), (db.zero_() if bias_grad else None)
    if saved is None or activation == 0:
        saved, activation, act_param = dy, 0, 0.0
    channels_last = _is_channels_last(dy, C_out)
    idx = _idx(dy, saved, x)
    sig = (N, C_in, H, W, C_out, OH, OW, KH, KW, channels_last, stride[0], stride[1],
           dilation[0], dilation[1], activation, act_param, x.dtype, idx, str(x.device))
    launch = _BWD_WEIGHT_LAUNCH.get(sig) if num_splits is None else None
    if launch is None:
        grid, cfg, tiles_w, tiles_p, tiles, per_split, splits = weight_grad_plan(
            N, C_out, OH, OW, KH, KW, channels_last, x.device, num_splits)
        consts, opts = split_constexprs(dw_conv_bwd_weight_kernel, _BWD_WEIGHT_RUNTIME, dict(
            cfg, STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
            KH=KH, KW=KW, MULT=C_out // C_in, ACTIVATION=activation, ACT_PARAM=float(act_param),
            ACC_DTYPE=_acc(x.dtype), IDX=idx))
        cols = C_out * (KH * KW + 1)
        block = min(1024, next_pow2(cols))
        launch = (grid, (tiles_w, tiles_p, tiles, per_split), consts, opts, splits, cols,
                  block)
        if num_splits is None:
            _BWD_WEIGHT_LAUNCH[sig] = launch
    grid, tiling, consts, opts, splits, cols, block = launch
    part = torch.empty((splits, cols), device=x.device, dtype=acc_dtype)
    tiles_w, tiles_p, tiles, per_split = tiling
    dw_conv_bwd_weight_kernel[grid](
        dy, saved, x, part, C_out, H, W, OH, OW, tiles_w, tiles_p, padding[0], padding[1],
        tiles, per_split, *dy.stride(), *saved.stride(), *x.stride(), *consts, **opts)
    dw_conv_reduce_kernel[(triton.cdiv(cols, block),)](
        part, dw, db if bias_grad else dw, splits, cols, T=KH * KW, HAS_BIAS=bias_grad,
        BLOCK=block, num_warps=4)
    return dw, db

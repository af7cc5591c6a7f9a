"""Direct depthwise conv2d kernels (no ``tl.dot``): forward with fused epilogue, grad_input
(transposed depthwise) and grad_weight + grad_bias in one pass plus a fixed-order reduction.

Layout-agnostic: every tensor is addressed through its 4 strides, so NCHW, channels_last and
sliced views run the same kernel (stride 1 is specialised by Triton, so the contiguous axis is
known to the compiler). A program owns a ``BLOCK_H x BLOCK_W`` tile of output pixels times
``BLOCK_C`` channels of one image; for every tap it loads the shifted input tile (the halo is
re-read from L1/L2, not from HBM) and accumulates in fp32 (fp64 for fp64). Output channel ``co``
reads input channel ``co // MULT`` (channel multiplier). Offsets are int32 (``IDX``) unless a
tensor spans 2**31 elements or more. In NCHW, where the per-tap loads are scalar, aligned row
windows or whole planes give 128-bit loads instead (``ROW_VEC`` / ``FLAT_N`` constexprs, chosen
on the host: :mod:`tilefuse.kernels.depthwise_rows`).

Epilogue order (same as the matmul family): ``z = conv + bias`` -> optional store of ``z`` (for the
activation backward) -> ``act(z)`` (shared helper) -> ``+ residual`` -> cast and store. relu and
relu6 without a residual store no ``z``: their derivative is read off the output
(``relu'(z) = y > 0``, ``relu6'(z) = 0 < y < 6``, exact also after rounding ``y``).

Backward: ``dz = dy * act'(saved)`` is formed on the fly wherever ``dy`` is read (the saved tensor
is ``z``, or ``y`` for relu/relu6), so there is no separate elementwise pass. grad_input is a
gather over the taps (no atomics). grad_weight and grad_bias are in
:mod:`tilefuse.kernels.depthwise_wgrad`. The tiling and the split count are pure functions of
the problem and :func:`tilefuse.kernels.sm_count`, so the interpreter runs the GPU's algorithm.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse.kernels import launch_cache, next_pow2, split_constexprs
from tilefuse.kernels.activations import activation_grad, apply_activation
from tilefuse.kernels.depthwise_planes import (flat_res_plan, flat_taps_dgrad, flat_taps_fwd,
                                               plane_gather, plane_window)
from tilefuse.kernels.depthwise_rows import (row_plan, row_plan_dgrad, row_taps_dgrad,
                                             row_taps_fwd)

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
    ROW_VEC: tl.constexpr = 1, WIN_A: tl.constexpr = 0, WIN_W: tl.constexpr = 1,
    TAPS: tl.constexpr = 1, FLAT_N: tl.constexpr = 0, RES_FLAT: tl.constexpr = 0,
    BAND: tl.constexpr = 0,
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

    w_base = w_ptr + co * swc
    if FLAT_N > 0:  # NCHW, whole planes or row bands: one aligned flat load + gathers
        acc = flat_taps_fwd(x_ptr, w_base, bias_ptr + co * stride_bias, n,
                            (pid_c * BLOCK_C).to(IDX), co, ci, c_mask, oh, ow, p_mask,
                            ((pid_p // TILES_W) * BLOCK_H).to(IDX), C_out, H, W, PAD_H, PAD_W,
                            sxn, swh, sww, HAS_BIAS, STRIDE_H, STRIDE_W, DIL_H, DIL_W, KH, KW,
                            MULT, ACC_DTYPE, ROW_VEC, FLAT_N, BAND, TAPS, BLOCK_C)
    elif ROW_VEC > 1:  # NCHW, aligned rows: one 128-bit window load per kernel row + shifts
        acc = row_taps_fwd(x_ptr, w_base, bias_ptr + co * stride_bias, n, ci, c_mask, pid_p,
                           TILES_W, H, W, OH, PAD_H, PAD_W, sxn, sxc, sxh, swh, sww, HAS_BIAS,
                            STRIDE_H, STRIDE_W, DIL_H, DIL_W,
                            KH, KW, ACC_DTYPE, ROW_VEC, WIN_A, WIN_W, TAPS, BLOCK_H,
                            BLOCK_W, BLOCK_C)
    else:
        x_base = x_ptr + n * sxn + ci[None, :] * sxc
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

    if HAS_BIAS and ROW_VEC == 1:  # (the row / flat paths added it from their weight tile)
        b = tl.load(bias_ptr + co * stride_bias, mask=c_mask, other=0.0)
        acc += b.to(ACC_DTYPE)[None, :]
    out_mask = p_mask[:, None] & c_mask[None, :]
    y_off = n * syn + co[None, :] * syc + (oh * syh + ow * syw)[:, None]
    if SAVE_PRE:  # pre has the output's strides
        tl.store(pre_ptr + y_off, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
    acc = apply_activation(acc, ACTIVATION, ACT_PARAM)
    if HAS_RESIDUAL:
        if RES_FLAT > 0:  # whole residual planes: one aligned flat load + a gather
            r = plane_gather(plane_window(res_ptr, n, (pid_c * BLOCK_C).to(IDX), C_out, OH * OW,
                                          srn, ROW_VEC, RES_FLAT, BLOCK_C),
                             (pid_c * BLOCK_C).to(IDX), co, c_mask, oh, ow, p_mask, OH, OW)
        else:
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
    ROW_VEC: tl.constexpr = 1, WIN_A: tl.constexpr = 0, WIN_W: tl.constexpr = 1,
    TAPS: tl.constexpr = 1, FLAT_N: tl.constexpr = 0, BAND: tl.constexpr = 0,
):
    """dx[n, ci, ih, iw] = sum_{m, kh, kw} dz[n, ci*MULT+m, oh, ow] * w[ci*MULT+m, kh, kw] where
    oh*STRIDE_H = ih + PAD_H - kh*DIL_H (a gather: no atomics, deterministic). ``ROW_VEC > 1``:
    the aligned-row path (:func:`~tilefuse.kernels.depthwise_rows.row_taps_dgrad`)."""
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
    if FLAT_N > 0:  # whole dz planes or row bands (tilefuse.kernels.depthwise_planes)
        acc = flat_taps_dgrad(dy_ptr, s_ptr, w_ptr, n, (pid_c * BLOCK_C).to(IDX), ci, c_mask, ih,
                              iw, p_mask, (pid_p // TILES_W) * BLOCK_H, C_in, OH, OW, PAD_H,
                              PAD_W, sdn, ssn, swc, swh, sww, STRIDE_H, STRIDE_W, DIL_H, DIL_W,
                              KH, KW, MULT, ACTIVATION, ACT_PARAM, ACC_DTYPE, ROW_VEC, FLAT_N,
                              BAND, TAPS, BLOCK_C)
    elif ROW_VEC > 1:
        acc = row_taps_dgrad(dy_ptr, s_ptr, w_ptr, n, ci, c_mask, pid_p, TILES_W, H, OH, OW,
                             PAD_H, PAD_W, sdn, sdc, sdh, ssn, ssc, ssh, swc, swh, sww,
                             STRIDE_H, STRIDE_W, DIL_H, DIL_W, KH, KW, MULT, ACTIVATION,
                             ACT_PARAM, ACC_DTYPE, ROW_VEC, WIN_A, WIN_W, TAPS, BLOCK_H, BLOCK_W,
                             BLOCK_C)
    else:
        acc = _taps_dgrad(dy_ptr, s_ptr, w_ptr, n, ci, c_mask, ih, iw, p_mask, OH, OW, PAD_H,
                          PAD_W, sdn, sdc, sdh, sdw, ssn, ssc, ssh, ssw, swc, swh, sww,
                          STRIDE_H, STRIDE_W, DIL_H, DIL_W, KH, KW, MULT, ACTIVATION, ACT_PARAM,
                          ACC_DTYPE, BLOCK_H, BLOCK_W, BLOCK_C)
    x_off = n * sxn + ci[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(dx_ptr + x_off, acc.to(dx_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _taps_dgrad(dy_ptr, s_ptr, w_ptr, n, ci, c_mask, ih, iw, p_mask, OH, OW, PAD_H, PAD_W,
                sdn, sdc, sdh, sdw, ssn, ssc, ssh, ssw, swc, swh, sww,
                STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr,
                DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
                ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The per-tap grad_input path (any layout and stride): one masked dz load per tap."""
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
    return acc


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
_FWD_RUNTIME = dw_conv_fwd_kernel.arg_names.index("STRIDE_H")
_BWD_INPUT_RUNTIME = dw_conv_bwd_input_kernel.arg_names.index("STRIDE_H")


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
           pre is not None, x.dtype, idx, H, W, padding[1], x.stride(), x.data_ptr() % 16 == 0,
           None if residual is None else (residual.shape, residual.stride(),
                                          residual.data_ptr() % 16 == 0))
    launch = _FWD_LAUNCH.get(sig) if config is None else None
    if launch is None:
        cfg = dict(config or tile_config(C_out, OH, OW, channels_last))
        cfg.update(row_plan(x, cfg, stride[1], dilation[1], padding[1], KH, KW,
                            channels_last, OH, OW, C_out // C_in, stride[0], dilation[0]))
        if residual is not None and residual.shape == y.shape:
            cfg["RES_FLAT"] = flat_res_plan(residual, cfg, cfg["FLAT_N"])
        launch = _tiled_launch(dw_conv_fwd_kernel, _FWD_RUNTIME, N, C_out, OH, OW,
                               channels_last, cfg, dict(
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
           dilation[1], activation, act_param, dx.dtype, idx, OH, OW, padding[1], dy.stride(),
           saved.stride(), dy.data_ptr() % 16 == 0, saved.data_ptr() % 16 == 0)
    launch = _BWD_INPUT_LAUNCH.get(sig)
    if launch is None:
        cfg = tile_config(C_in, H, W, channels_last)
        cfg.update(row_plan_dgrad(dy, saved, cfg, stride[1], dilation[1], padding[1], KH, KW,
                                  channels_last, H, W, C_out // C_in, stride[0], dilation[0]))
        launch = _BWD_INPUT_LAUNCH[sig] = _tiled_launch(
            dw_conv_bwd_input_kernel, _BWD_INPUT_RUNTIME, N, C_in, H, W, channels_last, cfg,
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

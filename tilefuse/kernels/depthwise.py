"""Direct depthwise conv2d kernels (no ``tl.dot``): forward with fused epilogue, grad_input
(transposed depthwise) and a deterministic two-stage grad_weight.

Layout-agnostic: every tensor is addressed through its 4 strides, so NCHW, channels_last and
sliced views run the same kernel (stride 1 is specialised by Triton, so the contiguous axis is
known to the compiler). A program owns a ``BLOCK_H x BLOCK_W`` tile of output pixels times
``BLOCK_C`` channels of one image; for every tap it loads the shifted input tile (the halo is
re-read from L1/L2, not from HBM) and accumulates in fp32 (fp64 for fp64). Output channel ``co``
reads input channel ``co // MULT`` (channel multiplier). All offsets are int64.

Epilogue order (same as the matmul family): ``z = conv + bias`` -> optional store of ``z`` (for the
activation backward) -> ``act(z)`` (shared helper) -> ``+ residual`` -> cast and store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, split_constexprs
from tilefuse.kernels.activations import apply_activation

MAX_GRID_Z = 65535


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
    ACC_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    i = tl.arange(0, BLOCK_H * BLOCK_W)
    oh = (pid_p // TILES_W) * BLOCK_H + i // BLOCK_W
    ow = (pid_p % TILES_W) * BLOCK_W + i % BLOCK_W
    co = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = co < C_out
    co64 = co.to(tl.int64)
    ci64 = (co // MULT).to(tl.int64)
    p_mask = (oh < OH) & (ow < OW)

    x_base = x_ptr + n * sxn + ci64[None, :] * sxc
    w_base = w_ptr + co64 * swc
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=ACC_DTYPE)
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        m_h = p_mask & (ih >= 0) & (ih < H)
        row = ih.to(tl.int64) * sxh
        for kw in tl.static_range(KW):
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            m = m_h & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + (row + iw.to(tl.int64) * sxw)[:, None],
                         mask=m[:, None] & c_mask[None, :], other=0.0)
            wv = tl.load(w_base + kh * swh + kw * sww, mask=c_mask, other=0.0)
            acc += xv.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]

    if HAS_BIAS:
        b = tl.load(bias_ptr + co64 * stride_bias, mask=c_mask, other=0.0)
        acc += b.to(ACC_DTYPE)[None, :]
    out_mask = p_mask[:, None] & c_mask[None, :]
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    y_off = n * syn + co64[None, :] * syc + (oh64 * syh + ow64 * syw)[:, None]
    if SAVE_PRE:  # pre has the output's strides
        tl.store(pre_ptr + y_off, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
    acc = apply_activation(acc, ACTIVATION, ACT_PARAM)
    if HAS_RESIDUAL:
        r_off = n * srn + co64[None, :] * src + (oh64 * srh + ow64 * srw)[:, None]
        r = tl.load(res_ptr + r_off, mask=out_mask, other=0.0)
        acc += r.to(ACC_DTYPE)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def dw_conv_bwd_input_kernel(
    dy_ptr, w_ptr, dx_ptr,
    C_in, H, W, OH, OW, TILES_W, PAD_H, PAD_W,
    sdn, sdc, sdh, sdw,
    swc, swh, sww,
    sxn, sxc, sxh, sxw,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx[n, ci, ih, iw] = sum_{m, kh, kw} dy[n, ci*MULT+m, oh, ow] * w[ci*MULT+m, kh, kw] where
    oh*STRIDE_H = ih + PAD_H - kh*DIL_H (a gather: no atomics, deterministic)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    i = tl.arange(0, BLOCK_H * BLOCK_W)
    ih = (pid_p // TILES_W) * BLOCK_H + i // BLOCK_W
    iw = (pid_p % TILES_W) * BLOCK_W + i % BLOCK_W
    ci = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = ci < C_in
    p_mask = (ih < H) & (iw < W)
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=ACC_DTYPE)
    for m in range(MULT):
        co64 = (ci * MULT + m).to(tl.int64)
        d_base = dy_ptr + n * sdn + co64[None, :] * sdc
        w_base = w_ptr + co64 * swc
        for kh in range(KH):
            th = ih + PAD_H - kh * DIL_H
            oh = th // STRIDE_H
            m_h = p_mask & (th >= 0) & (oh < OH)
            if STRIDE_H > 1:
                m_h = m_h & (th % STRIDE_H == 0)
            row = oh.to(tl.int64) * sdh
            for kw in tl.static_range(KW):
                tw = iw + PAD_W - kw * DIL_W
                ow = tw // STRIDE_W
                mk = m_h & (tw >= 0) & (ow < OW)
                if STRIDE_W > 1:
                    mk = mk & (tw % STRIDE_W == 0)
                dv = tl.load(d_base + (row + ow.to(tl.int64) * sdw)[:, None],
                             mask=mk[:, None] & c_mask[None, :], other=0.0)
                wv = tl.load(w_base + kh * swh + kw * sww, mask=c_mask, other=0.0)
                acc += dv.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]
    x_off = (n * sxn + ci.to(tl.int64)[None, :] * sxc
             + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None])
    tl.store(dx_ptr + x_off, acc.to(dx_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def dw_conv_bwd_weight_kernel(
    dy_ptr, x_ptr, part_ptr,
    C_out, H, W, OH, OW, PAD_H, PAD_W, R, R_PER_SPLIT,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Stage 1 of dw: program (tap block, channel block, split) sums dy * x over its fixed slice
    of the N*OH*OW rows into ``part[split, co, tap]`` (fixed order, no atomics: deterministic).
    ``BLOCK_T`` taps are handled as a tile axis (1 on GPU; all taps at once in the interpreter,
    whose cost is per operation)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    t_mask = t < KH * KW
    kh = t // KW
    kw = t % KW
    co = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = co < C_out
    co64 = co.to(tl.int64)
    ci64 = (co // MULT).to(tl.int64)
    ohw = OH * OW
    acc = tl.zeros((BLOCK_R, BLOCK_T, BLOCK_C), dtype=ACC_DTYPE)
    r_start = split.to(tl.int64) * R_PER_SPLIT
    r_end = tl.minimum(r_start + R_PER_SPLIT, R)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        r_mask = r < r_end
        n = r // ohw
        p = r % ohw
        oh = p // OW
        ow = p % OW
        ih = oh[:, None] * STRIDE_H - PAD_H + kh[None, :] * DIL_H       # (R, T)
        iw = ow[:, None] * STRIDE_W - PAD_W + kw[None, :] * DIL_W
        x_mask = (r_mask[:, None] & t_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                  & (iw < W))
        dv = tl.load(dy_ptr + (n * sdn + oh * sdh + ow * sdw)[:, None] + co64[None, :] * sdc,
                     mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        x_off = (n * sxn)[:, None] + ih * sxh + iw * sxw
        xv = tl.load(x_ptr + x_off[:, :, None] + (ci64 * sxc)[None, None, :],
                     mask=x_mask[:, :, None] & c_mask[None, None, :], other=0.0)
        acc += dv.to(ACC_DTYPE)[:, None, :] * xv.to(ACC_DTYPE)
    total = tl.sum(acc, axis=0)                                           # (T, C)
    out = part_ptr + (split.to(tl.int64) * C_out + co64[None, :]) * (KH * KW) + t[:, None]
    tl.store(out, total, mask=t_mask[:, None] & c_mask[None, :])


# ------------------------------------------------------------------------------------------------
# configs and launchers
# ------------------------------------------------------------------------------------------------

def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile_config(C: int, OH: int, OW: int, channels_last: bool) -> dict:
    """Tile of ``BLOCK_H x BLOCK_W`` pixels x ``BLOCK_C`` channels.

    channels_last: channels are the contiguous axis, so a wide channel block and a small pixel
    tile; NCHW: a row-major pixel tile (contiguous along W) and few channels. The interpreter's
    cost is per program, so there a tile covers as much as possible.
    """
    if interpreter_enabled():
        bw = min(next_pow2(OW), 64)
        bh = min(next_pow2(OH), max(1, 4096 // bw))
        bc = min(next_pow2(C), max(1, 32768 // (bh * bw)), 128)
        return dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=4)
    if channels_last:  # ~2048 elements: 64 channels x 4x8 pixels at most
        bc = min(next_pow2(C), 64)
        bw = min(next_pow2(OW), 8)
        bh = min(next_pow2(OH), max(1, 2048 // (bc * bw)), 8)
        return dict(BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc, num_warps=4)
    # NCHW: ~1024 elements, a row-major pixel tile; small maps (7x7) take several channels
    bw = min(next_pow2(OW), 64)
    bh = min(next_pow2(OH), max(1, 1024 // bw))
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
    channels_last = ys[1] == 1 and C_out > 1
    sig = (N, C_in, C_out, KH, KW, OH, OW, channels_last, stride[0], stride[1], dilation[0],
           dilation[1], activation, act_param, bias is not None, residual is not None,
           pre is not None, x.dtype)
    launch = _FWD_LAUNCH.get(sig) if config is None else None
    if launch is None:
        launch = _tiled_launch(dw_conv_fwd_kernel, _FWD_RUNTIME, N, C_out, OH, OW,
                               channels_last, config, dict(
            STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
            KH=KH, KW=KW, MULT=C_out // C_in, ACTIVATION=activation, ACT_PARAM=float(act_param),
            HAS_BIAS=sig[14], HAS_RESIDUAL=sig[15], SAVE_PRE=sig[16], ACC_DTYPE=_acc(x.dtype)))
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


def launch_backward_input(dy, weight, dx, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """dx (N, C_in, H, W), preallocated with any strides."""
    N, C_in, H, W = dx.shape
    C_out, _, KH, KW = weight.shape
    OH, OW = dy.shape[2], dy.shape[3]
    if dx.numel() == 0:
        return dx
    if dy.numel() == 0:
        return dx.zero_()
    xs = dx.stride()
    channels_last = xs[1] == 1 and C_in > 1
    sig = (N, C_in, H, W, C_out, KH, KW, channels_last, stride[0], stride[1], dilation[0],
           dilation[1], dx.dtype)
    launch = _BWD_INPUT_LAUNCH.get(sig)
    if launch is None:
        launch = _BWD_INPUT_LAUNCH[sig] = _tiled_launch(
            dw_conv_bwd_input_kernel, _BWD_INPUT_RUNTIME, N, C_in, H, W, channels_last, None,
            dict(STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
                 KH=KH, KW=KW, MULT=C_out // C_in, ACC_DTYPE=_acc(dx.dtype)))
    tiles_w, batches, consts, opts = launch
    ws = weight.stride()
    ds = dy.stride()
    one = len(batches) == 1
    for s, e, grid in batches:
        dw_conv_bwd_input_kernel[grid](
            dy if one else dy[s:e], weight, dx if one else dx[s:e],
            C_in, H, W, OH, OW, tiles_w, padding[0], padding[1],
            *ds, ws[0], ws[2], ws[3], *xs, *consts, **opts)
    return dx


def _weight_launch(N, C_out, OH, OW, KH, KW, channels_last, num_splits):
    """(grid, R_PER_SPLIT, SPLITS, BLOCK_R, BLOCK_T, BLOCK_C) of the grad_weight stage 1."""
    R = N * OH * OW
    if interpreter_enabled():
        block_t = next_pow2(KH * KW)
        block_c = min(next_pow2(C_out), 64)
        block_r = min(next_pow2(R), max(16, 65536 // (block_c * block_t)))
        splits = 1
    else:
        block_t = 1
        block_c = min(next_pow2(C_out), 32 if channels_last else 4)
        block_r = 64 if channels_last else 256  # 128x32 tiles spill on sm_90 (aot_check)
        programs = KH * KW * triton.cdiv(C_out, block_c)
        want = max(1, (4 * 132) // programs)  # ~4 waves of programs on a 132-SM GPU
        splits = min(want, triton.cdiv(R, block_r * 4), 1024)
    if num_splits is not None:
        splits = num_splits
    splits = max(1, splits)
    r_per_split = triton.cdiv(triton.cdiv(R, splits), block_r) * block_r
    splits = triton.cdiv(R, r_per_split)
    grid = (triton.cdiv(KH * KW, block_t), triton.cdiv(C_out, block_c), splits)
    return grid, r_per_split, splits, block_r, block_t, block_c


def launch_backward_weight(dy, x, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                           num_splits: int | None = None) -> torch.Tensor:
    """Returns dw as (C_out, 1, KH, KW) in the accumulation dtype (fp32/fp64): stage 1 kernel
    writes per-split partials, stage 2 is a fixed-order ``sum`` over splits (deterministic)."""
    N, C_in, H, W = x.shape
    C_out, OH, OW = dy.shape[1], dy.shape[2], dy.shape[3]
    KH, KW = kernel_size
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    R = N * OH * OW
    if R == 0:
        return torch.zeros((C_out, 1, KH, KW), device=x.device, dtype=acc_dtype)
    ds = dy.stride()
    channels_last = ds[1] == 1 and C_out > 1
    sig = (N, C_out, OH, OW, KH, KW, channels_last)
    launch = _BWD_WEIGHT_LAUNCH.get(sig) if num_splits is None else None
    if launch is None:
        launch = _weight_launch(N, C_out, OH, OW, KH, KW, channels_last, num_splits)
        if num_splits is None:
            _BWD_WEIGHT_LAUNCH[sig] = launch
    grid, r_per_split, splits, block_r, block_t, block_c = launch
    part = torch.empty((splits, C_out, KH * KW), device=x.device, dtype=acc_dtype)
    dw_conv_bwd_weight_kernel[grid](
        dy, x, part, C_out, H, W, OH, OW, padding[0], padding[1], R, r_per_split,
        *ds, *x.stride(),
        STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
        KH=KH, KW=KW, MULT=C_out // C_in, ACC_DTYPE=_acc(x.dtype),
        BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return part.sum(0).reshape(C_out, 1, KH, KW)

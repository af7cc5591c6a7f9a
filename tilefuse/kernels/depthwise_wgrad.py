"""Depthwise conv2d grad_weight + grad_bias: one pass over the output tiles and a fixed-order
reduction over splits (2 launches, deterministic).

Program (channel block, split) walks a fixed, contiguous range of output tiles (image x pixel
tile, the forward's tiling from :func:`tilefuse.kernels.depthwise.tile_config`), reads each
``dz = dy * act'(saved)`` tile once (:func:`~tilefuse.kernels.depthwise._load_dz`: no elementwise
pass), forms all ``KH*KW`` tap sums from the shifted ``x`` tiles (the halo re-read from cache) plus
the ``dz`` sum (the bias gradient), and writes one partial row; :func:`dw_conv_reduce_kernel` sums
the partials in split order and writes ``dw``/``db`` in their dtypes. The split count is a pure
function of the problem and :func:`tilefuse.kernels.sm_count` (the interpreter runs the same rule
at its pseudo-SM count).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse.kernels import launch_cache, next_pow2, sm_count, split_constexprs
from tilefuse.kernels.depthwise import _acc, _idx, _is_channels_last, _load_dz, tile_config
from tilefuse.kernels.depthwise_planes import flat_tile_wgrad
from tilefuse.kernels.depthwise_rows import row_plan_wgrad, row_tile_wgrad


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
    BLOCK_T: tl.constexpr, ROW_VEC: tl.constexpr = 1, WIN_A: tl.constexpr = 0,
    WIN_W: tl.constexpr = 1, TAPS: tl.constexpr = 1, FLAT_N: tl.constexpr = 0,
    FLAT_X: tl.constexpr = 0, BAND: tl.constexpr = 0,
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
        if FLAT_N > 0:  # NCHW whole planes or row bands (tilefuse.kernels.depthwise_planes)
            oh = ((p // TILES_W) * BLOCK_H + i // BLOCK_W).to(IDX)
            ow = ((p % TILES_W) * BLOCK_W + i % BLOCK_W).to(IDX)
            acc += flat_tile_wgrad(dy_ptr, s_ptr, x_ptr, n, (pid_c * BLOCK_C).to(IDX), co, ci,
                                   c_mask, oh, ow, (oh < OH) & (ow < OW),
                                   ((p // TILES_W) * BLOCK_H).to(IDX), t, C_out, H, W, OH, OW,
                                   PAD_H, PAD_W, sdn, ssn, sxn, STRIDE_H, STRIDE_W, DIL_H, DIL_W,
                                   KH, KW, MULT, ACTIVATION, ACT_PARAM, ACC_DTYPE, ROW_VEC,
                                   FLAT_N, FLAT_X, BAND, BLOCK_C)
        elif ROW_VEC > 1:  # NCHW aligned rows (tilefuse.kernels.depthwise_rows)
            acc += row_tile_wgrad(dy_ptr, s_ptr, x_ptr, n, co, ci, c_mask, p, TILES_W, H, W, OH,
                                  OW, PAD_H, PAD_W, sdn, sdc, sdh, ssn, ssc, ssh, sxn, sxc, sxh,
                                  STRIDE_H, STRIDE_W, DIL_H, DIL_W, KH, KW, ACTIVATION,
                                  ACT_PARAM, ACC_DTYPE, ROW_VEC, WIN_A, WIN_W, BLOCK_H, BLOCK_W,
                                  BLOCK_T)
        else:
            acc += _tile_wgrad(dy_ptr, s_ptr, x_ptr, n, co, ci, c_mask, p, i, t, TILES_W, H, W,
                               OH, OW, PAD_H, PAD_W, sdn, sdc, sdh, sdw, ssn, ssc, ssh, ssw, sxn,
                               sxc, sxh, sxw, STRIDE_H, STRIDE_W, DIL_H, DIL_W, KH, KW,
                               ACTIVATION, ACT_PARAM, ACC_DTYPE, IDX, BLOCK_H, BLOCK_W, BLOCK_T)
    out = part_ptr + (split.to(IDX) * C_out + co[None, :]) * (KH * KW + 1) + t[:, None]
    tl.store(out, acc, mask=(t[:, None] <= KH * KW) & c_mask[None, :])


@triton.jit
def _tile_wgrad(dy_ptr, s_ptr, x_ptr, n, co, ci, c_mask, p, i, t, TILES_W, H, W, OH, OW, PAD_H,
                PAD_W, sdn, sdc, sdh, sdw, ssn, ssc, ssh, ssw, sxn, sxc, sxh, sxw,
                STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr,
                DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
                IDX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """One output tile's tap sums and dz sum on the per-tap path (any layout)."""
    oh = ((p // TILES_W) * BLOCK_H + i // BLOCK_W).to(IDX)
    ow = tl.max_contiguous(tl.multiple_of((p % TILES_W) * BLOCK_W, BLOCK_W)
                           + i % BLOCK_W, BLOCK_W).to(IDX)
    p_mask = (oh < OH) & (ow < OW)
    dz = _load_dz(dy_ptr, s_ptr, n, co, oh, ow, p_mask[:, None] & c_mask[None, :],
                  sdn, sdc, sdh, sdw, ssn, ssc, ssh, ssw, ACTIVATION, ACT_PARAM, ACC_DTYPE)
    acc = tl.where(t[:, None] == KH * KW, tl.sum(dz, axis=0)[None, :], 0.0)
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
    return acc


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


_BWD_WEIGHT_LAUNCH = launch_cache()
_BWD_WEIGHT_RUNTIME = dw_conv_bwd_weight_kernel.arg_names.index("STRIDE_H")


def weight_grad_plan(N, C_out, OH, OW, KH, KW, channels_last, device, num_splits=None,
                     config=None):
    """(stage-1 grid, tile constexprs, TILES_W, TILES_P, TILES, TILES_PER_SPLIT, splits): the
    output tiles are split into contiguous ranges, about 4 programs per SM in all (from
    :func:`~tilefuse.kernels.sm_count`: the interpreter gets the GPU's rule at its pseudo-SM
    count), at least 128 output pixels (and 2 tiles) per range so the partials stay small."""
    cfg = dict(config or tile_config(C_out, OH, OW, channels_last))
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
           dilation[0], dilation[1], activation, act_param, x.dtype, idx, str(x.device),
           padding[1], x.stride(), dy.stride(), saved.stride(),
           tuple(t.data_ptr() % 16 == 0 for t in (x, dy, saved)))
    launch = _BWD_WEIGHT_LAUNCH.get(sig) if num_splits is None else None
    if launch is None:
        cfg = tile_config(C_out, OH, OW, channels_last)
        cfg.update(row_plan_wgrad(x, dy, saved, cfg, stride[1], dilation[1], padding[1], KW,
                                  channels_last, C_out // C_in, KH, stride[0], dilation[0]))
        grid, cfg, tiles_w, tiles_p, tiles, per_split, splits = weight_grad_plan(
            N, C_out, OH, OW, KH, KW, channels_last, x.device, num_splits, cfg)
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

"""Dense conv2d backward as implicit GEMMs: grad-input and a deterministic grad-weight.

Both take ``dz = dL/d(conv + bias)`` in any strides, or, with ``ACTIVATION`` set, the pair
``(g, z)`` (two tensors of the output's shape, own strides) and form ``dz = g * act'(z)`` in the
operand load (:func:`dz_tile`: fp32 math, fp64 for fp64, rounded to the operand dtype exactly as
the elementwise pass did), so no ``dz`` tensor is written. grad-weight also sums ``dz`` over the
pixels for ``dbias`` (``HAS_DBIAS``: programs of the first tap and channel block, per split).

* grad-input (:func:`conv2d_dgrad_kernel`): per group, ``M = N*H*W`` input pixels x
  ``C_in/groups`` input channels, reduced over ``K = KH*KW*C_out/groups``: for each tap it gathers
  ``dz[n, co, oh, ow]`` with ``oh*stride = ih + pad - kh*dilation`` (masked where that is not a
  whole output row inside the image: strided convs load zeros for the other phases) against the
  flipped/transposed weight ``w[co, ci, kh, kw]`` read through strides. A gather: no atomics.
* grad-weight (:func:`conv2d_wgrad_kernel`): per group, ``C_out/groups`` x ``KH*KW*C_in/groups``
  reduced over the ``N*OH*OW`` output pixels. The pixels are cut into ``SPLIT`` fixed slices
  (more programs for small weights with large images); each program sums its slice in a fixed
  order into ``part[split]`` (fp32, fp64 for fp64) and the slices are added by a fixed-order
  ``sum`` on the host side: the result is deterministic run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse.kernels import launch_cache, sm_count, split_constexprs
from tilefuse.kernels.activations import activation_grad
from tilefuse.kernels.conv_fwd import (acc_constexprs, conv_key, get_config, is_channels_last,
                                       pixel_coords, tap_step, tile_dot)
from tilefuse.kernels.matmul import grouped_pid

MAX_GRID_Z = 65535


@triton.jit
def dz_tile(g_ptr, z_ptr, g_off, z_off, mask, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
            ACC_DTYPE: tl.constexpr):
    """The ``dz`` operand tile: ``g`` as loaded, or ``g * act'(z)`` (computed in ``ACC_DTYPE``,
    rounded to ``g``'s dtype: the values the separate elementwise pass used to store)."""
    g = tl.load(g_ptr + g_off, mask=mask, other=0.0)
    if ACTIVATION != 0:
        z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(ACC_DTYPE)
        g = (g.to(ACC_DTYPE) * activation_grad(z, ACTIVATION, ACT_PARAM)).to(g.dtype)
    return g


@triton.jit
def conv2d_dgrad_kernel(
    dz_ptr, z_ptr, w_ptr, dx_ptr,
    M, C_IN_G, C_OUT_G, H, W, OH, OW, PAD_H, PAD_W,
    sdn, sdc, sdh, sdw,
    szn, szc, szh, szw,
    swo, swc, swh, sww,
    sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    g = tl.program_id(1)
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, C_IN_G, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n, ih, iw = pixel_coords(offs_m % M, H * W, W)
    ci_local = offs_n % C_IN_G
    ci64 = (g * C_IN_G + ci_local).to(tl.int64)
    d_row = dz_ptr + n.to(tl.int64) * sdn + (g * C_OUT_G).to(tl.int64) * sdc
    z_row = n.to(tl.int64) * szn + (g * C_OUT_G).to(tl.int64) * szc
    w_col = w_ptr + ci_local.to(tl.int64)[None, :] * swc + (g * C_OUT_G).to(tl.int64) * swo

    c_tiles = tl.cdiv(C_OUT_G, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for it in range(0, KH * KW * c_tiles):
        cc, kh, kw = tap_step(it, c_tiles, offs_k, KW, BLOCK_K)
        th = ih + PAD_H - kh * DIL_H
        tw = iw + PAD_W - kw * DIL_W
        oh = th // STRIDE_H
        ow = tw // STRIDE_W
        p_mask = (th >= 0) & (tw >= 0) & (oh < OH) & (ow < OW)
        if STRIDE_H > 1:
            p_mask = p_mask & (oh * STRIDE_H == th)
        if STRIDE_W > 1:
            p_mask = p_mask & (ow * STRIDE_W == tw)
        k_mask = cc < C_OUT_G
        cc64 = cc.to(tl.int64)
        oh64 = oh.to(tl.int64)
        ow64 = ow.to(tl.int64)
        a = dz_tile(d_row[:, None], z_ptr,
                    (oh64 * sdh + ow64 * sdw)[:, None] + cc64[None, :] * sdc,
                    (z_row + oh64 * szh + ow64 * szw)[:, None] + cc64[None, :] * szc,
                    p_mask[:, None] & k_mask[None, :], ACTIVATION, ACT_PARAM, ACC_DTYPE)
        b = tl.load(w_col + cc64[:, None] * swo + (kh * swh + kw * sww), mask=k_mask[:, None],
                    other=0.0)
        acc = tile_dot(a, b, acc, INPUT_PRECISION, ACC_DTYPE, UPCAST)

    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < C_IN_G)
    x_off = (n.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] \
        + ci64[None, :] * sxc
    tl.store(dx_ptr + x_off, acc.to(dx_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def conv2d_wgrad_kernel(
    dz_ptr, z_ptr, x_ptr, part_ptr, dbias_ptr,
    P, C_OUT_G, C_IN_G, H, W, OH, OW, PAD_H, PAD_W, P_PER_SPLIT, SPLIT,
    sdn, sdc, sdh, sdw,
    szn, szc, szh, szw,
    sxn, sxc, sxh, sxw,
    sps, spo, spc, sph, spw, sbs,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, HAS_DBIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[split, g*C_OUT_G + co, ci, kh, kw] = sum over this split's pixels p of
    dz[p, co] * x[p shifted by the tap, ci]; program (co block, (tap, ci block), g*SPLIT+split).
    ``HAS_DBIAS``: the programs of tap 0 and ci block 0 also store
    dbias[split, g*C_OUT_G + co] = sum over the split's pixels of dz[p, co]."""
    pid_co = tl.program_id(0)
    ci_tiles = tl.cdiv(C_IN_G, BLOCK_N)
    tap = tl.program_id(1) // ci_tiles
    pid_ci = tl.program_id(1) - tap * ci_tiles
    g = tl.program_id(2) // SPLIT
    split = tl.program_id(2) - g * SPLIT
    kh = tap // KW
    kw = tap - kh * KW
    offs_co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ci = pid_ci * BLOCK_N + tl.arange(0, BLOCK_N)
    co64 = (g * C_OUT_G + offs_co % C_OUT_G).to(tl.int64)
    ci64 = (g * C_IN_G + offs_ci % C_IN_G).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_K)
    p_start = split * P_PER_SPLIT
    p_end = tl.minimum(p_start + P_PER_SPLIT, P)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    bias_prog = (tap == 0) & (pid_ci == 0)
    for p0 in range(p_start, p_end, BLOCK_K):
        p = p0 + offs_p
        n, oh, ow = pixel_coords(p, OH * OW, OW)
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        iw = ow * STRIDE_W - PAD_W + kw * DIL_W
        in_range = p < p_end
        x_mask = in_range & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        n64 = n.to(tl.int64)
        d_off = n64 * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
        z_off = n64 * szn + oh.to(tl.int64) * szh + ow.to(tl.int64) * szw
        a = dz_tile(dz_ptr, z_ptr, co64[:, None] * sdc + d_off[None, :],
                    co64[:, None] * szc + z_off[None, :], in_range[None, :], ACTIVATION,
                    ACT_PARAM, ACC_DTYPE)
        if HAS_DBIAS:
            if bias_prog:
                bias_acc += tl.sum(a.to(ACC_DTYPE), axis=1)
        x_off = n64 * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        b = tl.load(x_ptr + x_off[:, None] + ci64[None, :] * sxc, mask=x_mask[:, None],
                    other=0.0)
        acc = tile_dot(a, b, acc, INPUT_PRECISION, ACC_DTYPE, UPCAST)

    mask = (offs_co[:, None] < C_OUT_G) & (offs_ci[None, :] < C_IN_G)
    ci_local = (offs_ci % C_IN_G).to(tl.int64)
    out = (part_ptr + split.to(tl.int64) * sps + co64[:, None] * spo + ci_local[None, :] * spc
           + (kh * sph + kw * spw))
    tl.store(out, acc.to(part_ptr.dtype.element_ty), mask=mask)
    if HAS_DBIAS:
        if bias_prog:
            tl.store(dbias_ptr + split.to(tl.int64) * sbs + co64, bias_acc,
                     mask=offs_co < C_OUT_G)


_LAUNCH = launch_cache()
_N_DGRAD = conv2d_dgrad_kernel.arg_names.index("KH")
_N_WGRAD = conv2d_wgrad_kernel.arg_names.index("KH")


def _geometry(kernel, stride, dilation) -> dict:
    return dict(KH=kernel[0], KW=kernel[1], STRIDE_H=stride[0], STRIDE_W=stride[1],
                DIL_H=dilation[0], DIL_W=dilation[1])


def _dgrad_params(sig, config=None):
    M, cig, cog, groups, kernel, stride, dilation, dtype, tf32, cl = sig[:10]
    act, act_param = sig[10:] or (0, 0.0)  # the fused-backward flags
    cfg = dict(config) if config is not None else get_config(
        conv_key("dgrad", M, cig, cog, kernel, stride, dtype, cl, tf32), dtype)
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(cig, cfg["BLOCK_N"]), groups)
    cfg.update(_geometry(kernel, stride, dilation), ACTIVATION=act, ACT_PARAM=float(act_param),
               **acc_constexprs(dtype, tf32))
    consts, opts = split_constexprs(conv2d_dgrad_kernel, _N_DGRAD, cfg)
    return grid, consts, opts


def launch_conv2d_dgrad(dz, weight, dx, stride, padding, dilation, groups: int,
                        allow_tf32: bool = False, config: dict | None = None, z=None,
                        activation: int = 0, act_param: float = 0.0):
    """dx (N, C_in, H, W), any strides, = the gradient of conv2d w.r.t. its input for
    ``dz`` (N, C_out, OH, OW); ``padding`` is (top, left). With ``activation``, ``dz`` is the
    gradient of ``act(z)`` and ``z`` (same shape, any strides) the saved pre-activation."""
    N, C_in, H, W = dx.shape
    C_out, cig, KH, KW = weight.shape
    OH, OW = dz.shape[2], dz.shape[3]
    M = N * H * W
    if M == 0 or cig == 0:
        return dx
    if C_out == 0 or OH == 0 or OW == 0:
        return dx.zero_()
    if M >= 2 ** 31:
        raise ValueError(f"conv2d backward: N*H*W = {M} input pixels exceed 2^31")
    tf32 = bool(allow_tf32 and dz.dtype == torch.float32 and dz.is_cuda)
    act = activation if z is not None else 0
    sig = ("dgrad", M, cig, C_out // groups, groups, (KH, KW), tuple(stride), tuple(dilation),
           dz.dtype, tf32, is_channels_last(dx), act, act_param if act else 0.0)
    params = _LAUNCH.get(sig) if config is None else _dgrad_params(sig[1:], config)
    if params is None:
        params = _LAUNCH[sig] = _dgrad_params(sig[1:])
    grid, consts, opts = params
    zt = z if act else dz
    conv2d_dgrad_kernel[grid](
        dz, zt, weight, dx, M, cig, C_out // groups, H, W, OH, OW, padding[0], padding[1],
        *dz.stride(), *zt.stride(), *weight.stride(), *dx.stride(), *consts, **opts)
    return dx


def _wgrad_split(P: int, tiles: int, block_k: int, groups: int, sms: int) -> int:
    """Pixel slices of the grad-weight reduction: enough programs to fill the device (about 2
    per SM) without slices shorter than 4 K-blocks. A pure function of the problem and the SM
    count: the interpreter's pseudo-device (4 SMs) runs the same split rule."""
    want = -(-2 * sms // max(1, tiles * groups))
    most = max(1, P // (4 * block_k))
    return max(1, min(want, most, MAX_GRID_Z // groups))


def _wgrad_params(sig, config=None):
    P, cog, cig, groups, kernel, stride, dilation, dtype, tf32, cl, sms = sig[:11]
    act, act_param, db = sig[11:] or (0, 0.0, False)  # the fused-backward flags
    cfg = dict(config) if config is not None else get_config(
        conv_key("wgrad", cog, cig, P, kernel, stride, dtype, cl, tf32), dtype)
    cfg.pop("GROUP_M", None)
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(cog, bm) * kernel[0] * kernel[1] * triton.cdiv(cig, bn)
    split = _wgrad_split(P, tiles, bk, groups, sms)
    per_split = triton.cdiv(triton.cdiv(P, split), bk) * bk
    split = triton.cdiv(P, per_split)
    grid = (triton.cdiv(cog, bm), kernel[0] * kernel[1] * triton.cdiv(cig, bn), groups * split)
    cfg.update(_geometry(kernel, stride, dilation), ACTIVATION=act, ACT_PARAM=float(act_param),
               HAS_DBIAS=db, **acc_constexprs(dtype, tf32))
    consts, opts = split_constexprs(conv2d_wgrad_kernel, _N_WGRAD, cfg)
    return grid, split, per_split, consts, opts


def launch_conv2d_wgrad(dz, x, kernel_size, stride, padding, dilation, groups: int,
                        allow_tf32: bool = False, config: dict | None = None, z=None,
                        activation: int = 0, act_param: float = 0.0,
                        dbias: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of conv2d w.r.t. its weight, (C_out, C_in/groups, KH, KW) in the
    accumulation dtype (fp32; fp64 for fp64 inputs); deterministic. ``z``/``activation``: as
    :func:`launch_conv2d_dgrad`. ``dbias`` ((C_out,), the accumulation dtype) receives the sum
    of ``dz`` over the pixels, from the same kernel (per split, then a fixed-order sum)."""
    N, C_in, H, W = x.shape
    C_out, OH, OW = dz.shape[1], dz.shape[2], dz.shape[3]
    KH, KW = kernel_size
    cig, cog = C_in // groups, C_out // groups
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    P = N * OH * OW
    if P == 0 or cig == 0 or cog == 0:
        if dbias is not None:
            dbias.zero_()
        return torch.zeros((C_out, cig, KH, KW), device=x.device, dtype=acc_dtype)
    if P >= 2 ** 31:
        raise ValueError(f"conv2d backward: N*OH*OW = {P} output pixels exceed 2^31")
    tf32 = bool(allow_tf32 and x.dtype == torch.float32 and x.is_cuda)
    act = activation if z is not None else 0
    sig = ("wgrad", P, cog, cig, groups, (KH, KW), tuple(stride), tuple(dilation), x.dtype,
           tf32, is_channels_last(x), sm_count(x.device), act, act_param if act else 0.0,
           dbias is not None)
    params = _LAUNCH.get(sig) if config is None else _wgrad_params(sig[1:], config)
    if params is None:
        params = _LAUNCH[sig] = _wgrad_params(sig[1:])
    grid, split, per_split, consts, opts = params
    part = torch.empty((split, C_out, cig, KH, KW), device=x.device, dtype=acc_dtype)
    zt = z if act else dz
    db = part
    if dbias is not None:
        db = dbias.view(1, C_out) if split == 1 else dbias.new_empty((split, C_out))
    conv2d_wgrad_kernel[grid](
        dz, zt, x, part, db, P, cog, cig, H, W, OH, OW, padding[0], padding[1], per_split, split,
        *dz.stride(), *zt.stride(), *x.stride(), *part.stride(), db.stride(0), *consts, **opts)
    if dbias is not None and split > 1:
        torch.sum(db, 0, out=dbias)
    return part[0] if split == 1 else part.sum(0)

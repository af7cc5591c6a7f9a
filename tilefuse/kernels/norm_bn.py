"""BatchNorm (train and eval) with a fused residual add and activation: ``act(bn(x) + residual)``.

The input is viewed as ``(N, C, S)`` with arbitrary strides (2-D ``(N, C)`` has ``S = 1``;
NCHW and channels_last 4-D inputs are both read in place), and each channel's ``R = N * S``
values are indexed by ``r -> (r // S, r % S)``. Tiles are ``[BLOCK_R, BLOCK_C]``: up to 64
channels wide where channels are innermost (2-D, channels_last: coalesced rows of channels), one
channel for NCHW (the lanes then run along the contiguous spatial axis).

The grid is split along ``R`` as well as ``C``, so a GPU fills up even with few channels:

* training statistics, :func:`bn_stats_kernel`, grid ``(C blocks, SPLIT)``: each program takes a
  slice of ``R`` and computes, in fp32, the local mean of ``x - K`` and the local sum of squared
  deviations around it (two passes over a slice small enough to stay in cache). ``K`` is the
  channel's first value (the split-0 programs also store it, fp32, for the apply kernel and the
  mean), so ``x - K`` is exact near the mean and large means do not swamp fp32. The launcher
  merges the ``SPLIT`` partials in a fixed order with Chan's parallel formula (stable,
  deterministic);
* :func:`bn_apply_kernel`, grid ``(R blocks, C blocks)``: ``y = act(((x - K) - (mean - K)) *
  scale + b (+ residual))`` with ``scale = w * rstd``; eval runs only this, on the running stats;
* backward: :func:`bn_bwd_reduce_kernel` writes per-slice partial sums of ``dz`` and
  ``dz * xhat`` (``dz = dy * act'(z)``), merged in a fixed order (they are ``db`` and ``dw``);
  :func:`bn_bwd_apply_kernel` then writes ``dx = w * rstd * (dz - mean(dz) - xhat *
  mean(dz * xhat))`` (eval: ``dz * w * rstd``) and ``d residual = dz``. No atomics anywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, split_constexprs
from tilefuse.kernels.activations import activation_grad, apply_activation

TILE = 4096           # elements per [BLOCK_R, BLOCK_C] tile on a GPU
INTERP_TILE = 16384   # in the interpreter, which pays per program (tests shrink it)


@triton.jit
def pairwise_sum0(acc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum of a ``[BLOCK_R, BLOCK_C]`` fp32 tile over its rows as a balanced binary tree (row
    ``r`` + row ``r + half``, halving): a fixed order with ``O(log BLOCK_R)`` rounding error on
    every backend (the interpreter's ``tl.sum`` over axis 0 adds the rows one after another, whose
    error grows with ``BLOCK_R``: BN -> ReLU6 bias gradients 7-14x further from fp64 than
    torch's)."""
    for i in tl.static_range(24):
        if (BLOCK_R >> i) > 1:
            acc = tl.sum(tl.reshape(acc, (2, BLOCK_R >> (i + 1), BLOCK_C)), axis=0)
    return tl.reshape(acc, (BLOCK_C,))


@triton.jit
def bn_stats_kernel(x_ptr, pmean_ptr, pm2_ptr, k_ptr, C, R, S, R_PER, sxn, sxc, sxs,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sp = tl.program_id(1).to(tl.int64)
    r_lo = sp * R_PER
    r_hi = tl.minimum(r_lo + R_PER, R)
    rr = tl.arange(0, BLOCK_R)
    K = tl.load(x_ptr + c * sxc, mask=cmask, other=0.0).to(tl.float32)
    if sp == 0:  # the shift, for the apply kernel and the mean
        tl.store(k_ptr + c, K, mask=cmask)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = (r0 + rr).to(tl.int64)
        n = r // S
        mask = (r < r_hi)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + (n * sxn + (r - n * S) * sxs)[:, None] + (c * sxc)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(mask, x - K[None, :], 0.0)
    local_mean = pairwise_sum0(acc, BLOCK_R, BLOCK_C) / (r_hi - r_lo)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = (r0 + rr).to(tl.int64)
        n = r // S
        mask = (r < r_hi)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + (n * sxn + (r - n * S) * sxs)[:, None] + (c * sxc)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, (x - K[None, :]) - local_mean[None, :], 0.0)
        acc += d * d
    tl.store(pmean_ptr + sp * C + c, local_mean, mask=cmask)
    tl.store(pm2_ptr + sp * C + c, pairwise_sum0(acc, BLOCK_R, BLOCK_C), mask=cmask)


@triton.jit
def bn_apply_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, k_ptr, md_ptr, var_ptr,
                    C, R, S, sxn, sxc, sxs, srn, src, srs, syn, syc, sys_, eps,
                    HAS_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (r < R)[:, None] & cmask[None, :]
    n = r // S
    s = r - n * S
    md = tl.load(md_ptr + c, mask=cmask, other=0.0)
    scale = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cmask, other=1.0) + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + (n * sxn + s * sxs)[:, None] + (c * sxc)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_K:  # ((x - K) - (mean - K)): no cancellation for large means
        x = x - tl.load(k_ptr + c, mask=cmask, other=0.0)[None, :]
    z = (x - md[None, :]) * scale[None, :]
    if HAS_B:
        z += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        z += tl.load(r_ptr + (n * srn + s * srs)[:, None] + (c * src)[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    if ACTIVATION != 0:  # (skipping the call keeps the interpreter fast)
        z = apply_activation(z, ACTIVATION, ACT_PARAM)
    tl.store(y_ptr + (n * syn + s * sys_)[:, None] + (c * syc)[None, :],
             z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(dy_ptr, x_ptr, r_ptr, w, b, mean, rstd, r, c, mask, S,
              sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
              HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr):
    """(xhat, dz = dy * act'(z)) for one tile, zero outside ``mask``."""
    n = r // S
    s = r - n * S
    x = tl.load(x_ptr + (n * sxn + s * sxs)[:, None] + (c * sxc)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    dz = tl.load(dy_ptr + (n * sdn + s * sds)[:, None] + (c * sdc)[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        z = xhat * w[None, :] + b[None, :]
        if HAS_RESIDUAL:
            z += tl.load(r_ptr + (n * srn + s * srs)[:, None] + (c * src)[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        dz = tl.where(mask, dz * activation_grad(z, ACTIVATION, ACT_PARAM), 0.0)
    return xhat, dz


@triton.jit
def _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, cmask, eps, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cmask, other=1.0) + eps)
    w = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    return mean, rstd, w, b


@triton.jit
def bn_bwd_reduce_kernel(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, p1_ptr, p2_ptr,
                         C, R, S, R_PER, sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs, eps,
                         HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sp = tl.program_id(1).to(tl.int64)
    r_lo = sp * R_PER
    r_hi = tl.minimum(r_lo + R_PER, R)
    mean, rstd, w, b = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, cmask, eps, HAS_W,
                                       HAS_B, BLOCK_C)
    a1 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    a2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (r < r_hi)[:, None] & cmask[None, :]
        xhat, dz = _bwd_tile(dy_ptr, x_ptr, r_ptr, w, b, mean, rstd, r, c, mask, S,
                             sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
                             HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
        a1 += dz
        a2 += dz * xhat
    tl.store(p1_ptr + sp * C + c, pairwise_sum0(a1, BLOCK_R, BLOCK_C), mask=cmask)
    tl.store(p2_ptr + sp * C + c, pairwise_sum0(a2, BLOCK_R, BLOCK_C), mask=cmask)


@triton.jit
def bn_bwd_apply_kernel(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, s1_ptr, s2_ptr,
                        dx_ptr, dres_ptr,
                        C, R, S, sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs, son, soc, sos,
                        eps,
                        TRAINING: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                        STORE_DRES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (r < R)[:, None] & cmask[None, :]
    mean, rstd, w, b = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, cmask, eps, HAS_W,
                                       HAS_B, BLOCK_C)
    xhat, dz = _bwd_tile(dy_ptr, x_ptr, r_ptr, w, b, mean, rstd, r, c, mask, S,
                         sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
                         HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
    n = r // S
    out_off = (n * son + (r - n * S) * sos)[:, None] + (c * soc)[None, :]
    if STORE_DRES:
        tl.store(dres_ptr + out_off, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        m1 = tl.load(s1_ptr + c, mask=cmask, other=0.0) / R
        m2 = tl.load(s2_ptr + c, mask=cmask, other=0.0) / R
        dz = dz - m1[None, :] - xhat * m2[None, :]
    dx = dz * (w * rstd)[None, :]
    tl.store(dx_ptr + out_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _tiles(x) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): wide channel tiles when channels are innermost, else one channel."""
    N, C, S = x.shape
    R = N * S
    block_c = min(next_pow2(C), 64) if (x.stride(1) == 1 or S == 1) else 1
    tile = TILE
    if interpreter_enabled():  # the interpreter pays per program: few, large tiles
        tile = INTERP_TILE
        block_c = min(next_pow2(C), max(block_c, tile // max(1, min(next_pow2(R), tile))))
    block_r = min(next_pow2(R), max(1, tile // block_c))
    return block_r, block_c


def _split(R: int, c_blocks: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT, R_PER): slices of R (multiples of BLOCK_R) so that the reduction grid has about
    4 programs per SM (2 slices in the interpreter, so the merge is exercised by the tests)."""
    max_split = triton.cdiv(R, block_r)
    if interpreter_enabled() or device.type != "cuda":
        want = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, (4 * sms) // c_blocks)
    split = max(1, min(want, max_split))
    r_per = triton.cdiv(triton.cdiv(R, split), block_r) * block_r
    return triton.cdiv(R, r_per), r_per



_FWD_LAUNCH = launch_cache()
_BWD_LAUNCH = launch_cache()
_APPLY_RUNTIME = bn_apply_kernel.arg_names.index("HAS_K")
_BWD_REDUCE_RUNTIME = bn_bwd_reduce_kernel.arg_names.index("HAS_RESIDUAL")
_BWD_APPLY_RUNTIME = bn_bwd_apply_kernel.arg_names.index("TRAINING")


def _counts(split: int, r_per: int, R: int, device) -> torch.Tensor:
    """(SPLIT, 1) fp32: the number of values in each R-slice (the last one may be short)."""
    cnt = torch.full((split, 1), float(r_per), device=device, dtype=torch.float32)
    cnt[-1] = float(R - r_per * (split - 1))
    return cnt


def _cacheable(device) -> bool:
    """A launch entry holding a tensor (the slice counts) is only built outside CUDA-graph
    capture: a tensor filled during capture has no values until the graph replays."""
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _fwd_launch(x, training, has_res, has_w, has_b, activation, act_param):
    """(stats launch or None, apply launch) for one forward signature. The stats launch is
    (grid, SPLIT, R_PER, slice counts (None for one slice), R as a 0-d tensor, options); the
    apply one (grid, constexprs, options)."""
    N, C, S = x.shape
    R = N * S
    br, bc = _tiles(x)
    cb = triton.cdiv(C, bc)
    stats = None
    if training:
        split, r_per = _split(R, cb, br, x.device)
        # R as a 0-d CPU fp32 tensor: the same operand as the Python number in ``t / R`` (a
        # CPU scalar, fp32 in the kernel), without wrapping a number into a tensor per call
        r_t = torch.tensor(float(R), dtype=torch.float32)
        stats = ((cb, split), split, r_per,
                 _counts(split, r_per, R, x.device) if split > 1 else None, r_t,
                 dict(BLOCK_R=br, BLOCK_C=bc, num_warps=4))
    consts, opts = split_constexprs(bn_apply_kernel, _APPLY_RUNTIME, dict(
        HAS_K=training, HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
        ACT_PARAM=float(act_param), BLOCK_R=br, BLOCK_C=bc, num_warps=4))
    return stats, ((triton.cdiv(R, br), cb), consts, opts)


def launch_batch_norm_fwd(x, residual, weight, bias, y, mean, var, training: bool, eps: float,
                          activation: int, act_param: float):
    """x, residual, y: (N, C, S) any strides. Eval: ``mean``/``var`` are the (C,) fp32
    contiguous running stats, read; returns them. Training (pass None for both): returns new
    (C,) fp32 batch ``mean`` and biased ``var``. Launch parameters are computed once per
    signature (:func:`tilefuse.kernels.launch_cache`)."""
    N, C, S = x.shape
    R = N * S
    if C == 0 or R == 0:
        if training:
            mean = torch.empty(C, device=x.device, dtype=torch.float32)
            var = torch.empty(C, device=x.device, dtype=torch.float32)
        return mean, var
    has_res = residual is not None
    sx = x.stride()
    sig = (N, C, S, sx[1] == 1, x.device, training, has_res, weight is not None,
           bias is not None, activation, act_param)
    launch = _FWD_LAUNCH.get(sig)
    if launch is None:
        launch = _fwd_launch(x, training, has_res, sig[7], sig[8], activation, act_param)
        if _cacheable(x.device):
            _FWD_LAUNCH[sig] = launch
    stats, (grid, consts, opts) = launch
    if training:
        sgrid, split, r_per, cnt, r_t, sopts = stats
        dev = x.device
        part = (split, C) if cnt is not None else (C,)  # (one slice: its row)
        pmean = torch.empty(*part, device=dev, dtype=torch.float32)
        pm2 = torch.empty(*part, device=dev, dtype=torch.float32)
        k = torch.empty(C, device=dev, dtype=torch.float32)  # K: each channel's first value
        bn_stats_kernel[sgrid](x, pmean, pm2, k, C, R, S, r_per, *sx, **sopts)
        # Chan's merge of the slices, in a fixed order (deterministic):
        # md = sum(pmean * cnt) / R, var = sum(pm2 + cnt * (pmean - md) ** 2) / R
        # (x ** 2 is computed as x * x by torch, in place here)
        if cnt is None:  # one slice of R values: a sum over one row is the row (same bits)
            md = (pmean * r_t).div_(r_t)
            d = pmean.sub_(md)
            var = d.mul_(d).mul_(r_t).add_(pm2).div_(r_t)
        else:
            md = (pmean * cnt).sum(0).div_(r_t)
            d = pmean.sub_(md)
            var = d.mul_(d).mul_(cnt).add_(pm2).sum(0).div_(r_t)
    else:
        k = md = mean
    res = residual if has_res else x
    bn_apply_kernel[grid](
        x, res, weight if weight is not None else x, bias if bias is not None else x, y,
        k, md, var, C, R, S, *sx, *res.stride(), *y.stride(), float(eps), *consts, **opts)
    if training:
        mean = k.add_(md)  # after the apply kernel (stream order), which reads k
    return mean, var


def _bwd_launch(x, training, has_res, has_w, has_b, activation, act_param, store_dres):
    """(reduce grid, SPLIT, R_PER, reduce constexprs, apply grid, apply constexprs, options)."""
    N, C, S = x.shape
    R = N * S
    br, bc = _tiles(x)
    cb = triton.cdiv(C, bc)
    split, r_per = _split(R, cb, br, x.device)
    rconsts, opts = split_constexprs(bn_bwd_reduce_kernel, _BWD_REDUCE_RUNTIME, dict(
        HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
        ACT_PARAM=float(act_param), BLOCK_R=br, BLOCK_C=bc, num_warps=4))
    aconsts, _ = split_constexprs(bn_bwd_apply_kernel, _BWD_APPLY_RUNTIME, dict(
        TRAINING=training, HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b,
        ACTIVATION=activation, ACT_PARAM=float(act_param), STORE_DRES=store_dres,
        BLOCK_R=br, BLOCK_C=bc, num_warps=4))
    return (cb, split), split, r_per, rconsts, (triton.cdiv(R, br), cb), aconsts, opts


def launch_batch_norm_bwd(dy, x, residual, weight, bias, mean, var, dx, dres, training: bool,
                          eps: float, activation: int, act_param: float):
    """Writes dx (and dres = dy * act'(z) when given); returns fp32 (dw, db), both (C,)."""
    N, C, S = x.shape
    R = N * S
    if C == 0 or R == 0:
        z = torch.zeros(C, device=x.device, dtype=torch.float32)
        return z, z.clone()
    has_res = residual is not None
    sx = x.stride()
    sig = (N, C, S, sx[1] == 1, x.device, training, has_res, weight is not None,
           bias is not None, activation, act_param, dres is not None)
    launch = _BWD_LAUNCH.get(sig)
    if launch is None:
        launch = _BWD_LAUNCH[sig] = _bwd_launch(x, training, has_res, sig[7], sig[8],
                                                activation, act_param, sig[11])
    rgrid, split, r_per, rconsts, agrid, aconsts, opts = launch
    part = (split, C) if split > 1 else (C,)  # (one slice: its row is the sum)
    p1 = torch.empty(*part, device=x.device, dtype=torch.float32)
    p2 = torch.empty(*part, device=x.device, dtype=torch.float32)
    res = residual if has_res else x
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    sd, sr = dy.stride(), res.stride()
    bn_bwd_reduce_kernel[rgrid](dy, x, res, w, b, mean, var, p1, p2, C, R, S, r_per,
                                *sd, *sx, *sr, float(eps), *rconsts, **opts)
    db = p1.sum(0) if split > 1 else p1  # fixed-order second stage
    dw = p2.sum(0) if split > 1 else p2
    bn_bwd_apply_kernel[agrid](
        dy, x, res, w, b, mean, var, db, dw, dx, dres if dres is not None else dx,
        C, R, S, *sd, *sx, *sr, *dx.stride(), float(eps), *aconsts, **opts)
    return dw, db

"""BatchNorm (train and eval) with a fused residual add and activation: ``act(bn(x) + residual)``.

The input is viewed as ``(N, C, S)`` with arbitrary strides (2-D ``(N, C)`` has ``S = 1``;
NCHW and channels_last 4-D inputs are both read in place). Tiles are ``[BLOCK_R, BLOCK_C]``: up to
64 channels wide where channels are innermost (2-D, channels_last: coalesced rows of channels),
one channel for NCHW (the lanes then run along the contiguous spatial axis). Rows are indexed as
``(n, s)`` with no per-element division: a program walks the samples ``n`` of its slice and, in
each, a contiguous run of ``s``; where every tensor's ``(n, s)`` collapses to one stride
(``stride(0) == S * stride(2)``: 2-D, channels_last, NCHW with one sample) the launcher passes
``N = 1, S = N * S`` and the whole slice is one run.

Training forward, three launches:

* :func:`bn_stats_kernel`, grid ``(C blocks, SPLIT)``: each program takes a slice of the
  ``R = N * S`` values of its channels and computes, in fp32, the local mean of ``x - K`` and the
  local sum of squared deviations around it (two passes over a slice small enough to stay in
  cache; per-lane partials reduced as a pairwise tree). ``K`` is the channel's first value (the
  split-0 programs store it), so ``x - K`` is exact near the mean;
* :func:`bn_finalize_kernel`, one program: Chan's merge of the ``SPLIT`` partials in a fixed
  order (the mean, biased variance and ``mean = K + md``), the running-statistics update
  (``running = (1 - m) * running + m * stat``, unbiased variance) and ``num_batches_tracked += 1``
  (``m = 1 / num_batches_tracked`` for the cumulative average);
* :func:`bn_apply_kernel`, grid ``(N * S blocks, C blocks)``: ``y = act(((x - K) - md) * scale +
  b (+ residual))`` with ``scale = w * rstd``; eval runs only this, on the running stats.

Backward, two launches: :func:`bn_bwd_reduce_kernel` writes per-slice partial sums of ``dz`` and
``dz * xhat`` (``dz = dy * act'(z)``); :func:`bn_bwd_apply_kernel` merges them in a fixed order
(every program for its channels; the first row of programs stores them as ``db``/``dw`` in the
parameters' dtype) and writes ``dx = w * rstd * (dz - mean(dz) - xhat * mean(dz * xhat))``
(eval: ``dz * w * rstd``) and ``d residual = dz``. No atomics anywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, sm_count, split_constexprs
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
def _offsets(n, s, c, sn, sc, ss):
    return (n * sn + s * ss)[:, None] + (c * sc)[None, :]


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
    n_lo = r_lo // S  # (one scalar division per program)
    n_hi = (r_hi - 1) // S + 1
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for n in range(n_lo, n_hi):
        s_hi = tl.minimum(r_hi - n * S, S)
        for s0 in range(tl.maximum(r_lo - n * S, 0), s_hi, BLOCK_R):
            s = s0 + rr
            mask = (s < s_hi)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + _offsets(n, s, c, sxn, sxc, sxs), mask=mask,
                        other=0.0).to(tl.float32)
            acc += tl.where(mask, x - K[None, :], 0.0)
    local_mean = pairwise_sum0(acc, BLOCK_R, BLOCK_C) / (r_hi - r_lo)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for n in range(n_lo, n_hi):
        s_hi = tl.minimum(r_hi - n * S, S)
        for s0 in range(tl.maximum(r_lo - n * S, 0), s_hi, BLOCK_R):
            s = s0 + rr
            mask = (s < s_hi)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + _offsets(n, s, c, sxn, sxc, sxs), mask=mask,
                        other=0.0).to(tl.float32)
            d = tl.where(mask, (x - K[None, :]) - local_mean[None, :], 0.0)
            acc += d * d
    tl.store(pmean_ptr + sp * C + c, local_mean, mask=cmask)
    tl.store(pm2_ptr + sp * C + c, pairwise_sum0(acc, BLOCK_R, BLOCK_C), mask=cmask)


@triton.jit
def _momentum(nbt_ptr, momentum, HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr):
    """``num_batches_tracked += 1`` (one program: no other reads the counter) and the update's
    factor: ``momentum``, or ``1 / num_batches_tracked`` (rounded from fp64, as torch's Python
    float) for the cumulative average."""
    m = momentum
    if HAS_NBT:
        nb = tl.load(nbt_ptr) + 1
        tl.store(nbt_ptr, nb)
        if CUMULATIVE:
            m = (1.0 / nb.to(tl.float64)).to(tl.float32)
    return m


@triton.jit
def _update_running(rm_ptr, rv_ptr, c, cmask, mean, var, m, unbias):
    """``running = (1 - m) * running + m * stat`` (unbiased variance), in the running dtype."""
    keep = 1.0 - m
    rm = tl.load(rm_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(rm_ptr + c, (rm * keep + mean * m).to(rm_ptr.dtype.element_ty), mask=cmask)
    tl.store(rv_ptr + c, (rv * keep + (var * unbias) * m).to(rv_ptr.dtype.element_ty),
             mask=cmask)


@triton.jit
def bn_finalize_kernel(pmean_ptr, pm2_ptr, k_ptr, md_ptr, var_ptr, mean_ptr, rm_ptr, rv_ptr,
                       nbt_ptr, C, R, SPLIT, R_PER, momentum, unbias,
                       HAS_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr,
                       CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: Chan's merge (the formulas and order of the former torch-op merge: ``md =
    sum(pmean * cnt) / R``, ``var = sum((pmean - md) ** 2 * cnt + pm2) / R``), the running-stat
    update and ``num_batches_tracked += 1``."""
    r_f = R.to(tl.float32)
    m = _momentum(nbt_ptr, momentum, HAS_NBT, CUMULATIVE)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        acc = tl.zeros((BLOCK_C,), tl.float32)
        for sp in range(0, SPLIT):
            cnt = tl.minimum(R_PER, R - sp * R_PER).to(tl.float32)
            acc += tl.load(pmean_ptr + sp * C + c, mask=cmask, other=0.0) * cnt
        md = acc / r_f
        acc = tl.zeros((BLOCK_C,), tl.float32)
        for sp in range(0, SPLIT):
            cnt = tl.minimum(R_PER, R - sp * R_PER).to(tl.float32)
            d = tl.load(pmean_ptr + sp * C + c, mask=cmask, other=0.0) - md
            acc += d * d * cnt + tl.load(pm2_ptr + sp * C + c, mask=cmask, other=0.0)
        var = acc / r_f
        mean = tl.load(k_ptr + c, mask=cmask, other=0.0) + md
        tl.store(md_ptr + c, md, mask=cmask)
        tl.store(var_ptr + c, var, mask=cmask)
        tl.store(mean_ptr + c, mean, mask=cmask)
        if HAS_RUNNING:
            _update_running(rm_ptr, rv_ptr, c, cmask, mean, var, m, unbias)


@triton.jit
def bn_running_kernel(mean_ptr, var_ptr, rm_ptr, rv_ptr, nbt_ptr, C, momentum, unbias,
                      HAS_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr,
                      CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr):
    """The finalize kernel's running-stat update alone, from stored batch stats (the traced
    path, where the forward op is functional): the same arithmetic, the same bits."""
    m = _momentum(nbt_ptr, momentum, HAS_NBT, CUMULATIVE)
    if HAS_RUNNING:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            _update_running(rm_ptr, rv_ptr, c, cmask, tl.load(mean_ptr + c, mask=cmask),
                            tl.load(var_ptr + c, mask=cmask), m, unbias)


@triton.jit
def _row_run(S, BLOCK_R: tl.constexpr):
    """(n, s, mask) of an apply program: pid 0 enumerates (sample, run of BLOCK_R in S)."""
    sb = tl.cdiv(S, BLOCK_R)
    pid = tl.program_id(0).to(tl.int64)
    n = pid // sb  # (one scalar division per program)
    s = (pid - n * sb) * BLOCK_R + tl.arange(0, BLOCK_R)
    return n, s, s < S


@triton.jit
def bn_apply_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, k_ptr, md_ptr, var_ptr,
                    C, R, S, sxn, sxc, sxs, srn, src, srs, syn, syc, sys_, eps,
                    HAS_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    n, s, smask = _row_run(S, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = smask[:, None] & cmask[None, :]
    md = tl.load(md_ptr + c, mask=cmask, other=0.0)
    scale = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cmask, other=1.0) + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + _offsets(n, s, c, sxn, sxc, sxs), mask=mask, other=0.0).to(tl.float32)
    if HAS_K:  # ((x - K) - (mean - K)): no cancellation for large means
        x = x - tl.load(k_ptr + c, mask=cmask, other=0.0)[None, :]
    z = (x - md[None, :]) * scale[None, :]
    if HAS_B:
        z += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        z += tl.load(r_ptr + _offsets(n, s, c, srn, src, srs), mask=mask,
                     other=0.0).to(tl.float32)
    if ACTIVATION != 0:  # (skipping the call keeps the interpreter fast)
        z = apply_activation(z, ACTIVATION, ACT_PARAM)
    tl.store(y_ptr + _offsets(n, s, c, syn, syc, sys_), z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(dy_ptr, x_ptr, r_ptr, w, b, mean, rstd, n, s, c, mask,
              sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
              HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr):
    """(xhat, dz = dy * act'(z)) for one tile, zero outside ``mask``."""
    x = tl.load(x_ptr + _offsets(n, s, c, sxn, sxc, sxs), mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    dz = tl.load(dy_ptr + _offsets(n, s, c, sdn, sdc, sds), mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        z = xhat * w[None, :] + b[None, :]
        if HAS_RESIDUAL:
            z += tl.load(r_ptr + _offsets(n, s, c, srn, src, srs), mask=mask,
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
    for n in range(r_lo // S, (r_hi - 1) // S + 1):
        s_hi = tl.minimum(r_hi - n * S, S)
        for s0 in range(tl.maximum(r_lo - n * S, 0), s_hi, BLOCK_R):
            s = s0 + tl.arange(0, BLOCK_R)
            mask = (s < s_hi)[:, None] & cmask[None, :]
            xhat, dz = _bwd_tile(dy_ptr, x_ptr, r_ptr, w, b, mean, rstd, n, s, c, mask,
                                 sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
                                 HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
            a1 += dz
            a2 += dz * xhat
    tl.store(p1_ptr + sp * C + c, pairwise_sum0(a1, BLOCK_R, BLOCK_C), mask=cmask)
    tl.store(p2_ptr + sp * C + c, pairwise_sum0(a2, BLOCK_R, BLOCK_C), mask=cmask)


@triton.jit
def bn_bwd_apply_kernel(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, p1_ptr, p2_ptr,
                        dx_ptr, dres_ptr, dw_ptr, db_ptr,
                        C, R, S, SPLIT, sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
                        son, soc, sos, eps,
                        TRAINING: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                        STORE_DRES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    n, s, smask = _row_run(S, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = smask[:, None] & cmask[None, :]
    mean, rstd, w, b = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, cmask, eps, HAS_W,
                                       HAS_B, BLOCK_C)
    s1 = tl.zeros((BLOCK_C,), tl.float32)  # the slices' partials, merged in a fixed order
    s2 = tl.zeros((BLOCK_C,), tl.float32)
    for sp in range(0, SPLIT):
        s1 += tl.load(p1_ptr + sp * C + c, mask=cmask, other=0.0)
        s2 += tl.load(p2_ptr + sp * C + c, mask=cmask, other=0.0)
    if tl.program_id(0) == 0:
        tl.store(db_ptr + c, s1.to(db_ptr.dtype.element_ty), mask=cmask)
        tl.store(dw_ptr + c, s2.to(dw_ptr.dtype.element_ty), mask=cmask)
    xhat, dz = _bwd_tile(dy_ptr, x_ptr, r_ptr, w, b, mean, rstd, n, s, c, mask,
                         sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
                         HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
    out_off = _offsets(n, s, c, son, soc, sos)
    if STORE_DRES:
        tl.store(dres_ptr + out_off, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        dz = dz - (s1 / R)[None, :] - xhat * (s2 / R)[None, :]
    dx = dz * (w * rstd)[None, :]
    tl.store(dx_ptr + out_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _geometry(N: int, S: int, *tensors) -> tuple[int, int]:
    """(N, S) as the kernels walk them: ``(1, N * S)`` when every tensor's ``(n, s)`` collapses
    to one stride (one run per slice), else ``(N, S)``."""
    if N == 1 or S == 1 or all(t.stride(0) == S * t.stride(2) for t in tensors):
        return 1, N * S
    return N, S


def _strides(t, flat: bool, S: int) -> tuple[int, int, int]:
    """(n, c, s) strides of an ``(N, C, S)`` tensor for the kernels' (n, s) walk."""
    sn, sc, ss = t.stride()
    if flat:
        return 0, sc, (sn if S == 1 else ss)
    return sn, sc, ss


def _tiles(x, S: int | None = None) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): wide channel tiles when channels are innermost, else one channel;
    ``BLOCK_R`` covers at most one run of ``S`` (the kernels' walk, :func:`_geometry`)."""
    N, C, S0 = x.shape
    R = N * S0
    run = S if S is not None else _geometry(N, S0, x)[1]
    block_c = min(next_pow2(C), 64) if (x.stride(1) == 1 or S0 == 1) else 1
    tile = TILE
    if interpreter_enabled():  # the interpreter pays per program: few, large tiles
        tile = INTERP_TILE
        block_c = min(next_pow2(C), max(block_c, tile // max(1, min(next_pow2(R), tile))))
    block_r = min(next_pow2(run), max(1, tile // block_c))
    return block_r, block_c


def _split(R: int, c_blocks: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT, R_PER): slices of R (multiples of BLOCK_R) so that the reduction grid has about
    4 programs per SM (2 slices in the interpreter, so the merge is exercised by the tests)."""
    max_split = triton.cdiv(R, block_r)
    if interpreter_enabled() or device.type != "cuda":
        want = 2
    else:
        want = max(1, (4 * sm_count(device)) // c_blocks)
    split = max(1, min(want, max_split))
    r_per = triton.cdiv(triton.cdiv(R, split), block_r) * block_r
    return triton.cdiv(R, r_per), r_per


_FWD_LAUNCH = launch_cache()
_BWD_LAUNCH = launch_cache()
_APPLY_RUNTIME = bn_apply_kernel.arg_names.index("HAS_K")
_FINALIZE_RUNTIME = bn_finalize_kernel.arg_names.index("HAS_RUNNING")
_BWD_REDUCE_RUNTIME = bn_bwd_reduce_kernel.arg_names.index("HAS_RESIDUAL")
_BWD_APPLY_RUNTIME = bn_bwd_apply_kernel.arg_names.index("TRAINING")


def _fwd_launch(x, flat, Ne, Se, training, has_res, has_w, has_b, activation, act_param,
                running, has_nbt, cumulative):
    """(stats launch or None, apply launch) for one forward signature. The stats launch is
    (grid, SPLIT, R_PER, R / (R - 1), stats options, finalize constexprs, finalize options); the
    apply one (grid, constexprs, options)."""
    N, C, S = x.shape
    R = N * S
    br, bc = _tiles(x, Se)
    cb = triton.cdiv(C, bc)
    stats = None
    if training:
        split, r_per = _split(R, cb, br, x.device)
        fconsts, fopts = split_constexprs(bn_finalize_kernel, _FINALIZE_RUNTIME, dict(
            HAS_RUNNING=running, HAS_NBT=has_nbt, CUMULATIVE=cumulative,
            BLOCK_C=min(next_pow2(C), 1024), num_warps=4))
        stats = ((cb, split), split, r_per, R / (R - 1) if R > 1 else 1.0,
                 dict(BLOCK_R=br, BLOCK_C=bc, num_warps=4), fconsts, fopts)
    consts, opts = split_constexprs(bn_apply_kernel, _APPLY_RUNTIME, dict(
        HAS_K=training, HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
        ACT_PARAM=float(act_param), BLOCK_R=br, BLOCK_C=bc, num_warps=4))
    return stats, ((Ne * triton.cdiv(Se, br), cb), consts, opts)


def launch_batch_norm_fwd(x, residual, weight, bias, y, mean, var, training: bool, eps: float,
                          activation: int, act_param: float, running_mean=None,
                          running_var=None, momentum: float = 0.0, num_batches_tracked=None,
                          cumulative: bool = False):
    """x, residual, y: (N, C, S) any strides. Eval: ``mean``/``var`` are the (C,) fp32
    contiguous running stats, read; returns them. Training (pass None for both): returns new
    (C,) fp32 batch ``mean`` and biased ``var``, and updates ``running_mean``/``running_var``
    (contiguous (C,), any float dtype; ``momentum``, or ``1 / num_batches_tracked`` with
    ``cumulative``) and increments ``num_batches_tracked`` when given, all in the finalize
    kernel: three launches. Launch parameters are computed once per signature
    (:func:`tilefuse.kernels.launch_cache`)."""
    N, C, S = x.shape
    R = N * S
    if C == 0 or R == 0:
        if training:
            mean = torch.empty(C, device=x.device, dtype=torch.float32)
            var = torch.empty(C, device=x.device, dtype=torch.float32)
        return mean, var
    has_res = residual is not None
    Ne, Se = _geometry(N, S, x, y) if not has_res else _geometry(N, S, x, y, residual)
    flat = Ne == 1
    running = training and running_mean is not None
    has_nbt = training and num_batches_tracked is not None
    sig = (N, C, S, x.stride(1) == 1, flat, x.device, training, has_res, weight is not None,
           bias is not None, activation, act_param, running, has_nbt, cumulative)
    launch = _FWD_LAUNCH.get(sig)
    if launch is None:
        launch = _FWD_LAUNCH[sig] = _fwd_launch(x, flat, Ne, Se, training, has_res, sig[8],
                                                sig[9], activation, act_param, running, has_nbt,
                                                cumulative)
    stats, (grid, consts, opts) = launch
    sx = _strides(x, flat, S)
    if training:
        sgrid, split, r_per, unbias, sopts, fconsts, fopts = stats
        dev = x.device
        pmean = torch.empty(split, C, device=dev, dtype=torch.float32)
        pm2 = torch.empty(split, C, device=dev, dtype=torch.float32)
        k = torch.empty(C, device=dev, dtype=torch.float32)  # K: each channel's first value
        md = torch.empty(C, device=dev, dtype=torch.float32)  # mean - K
        mean = torch.empty(C, device=dev, dtype=torch.float32)
        var = torch.empty(C, device=dev, dtype=torch.float32)
        bn_stats_kernel[sgrid](x, pmean, pm2, k, C, R, Se, r_per, *sx, **sopts)
        bn_finalize_kernel[(1,)](
            pmean, pm2, k, md, var, mean, running_mean if running else k,
            running_var if running else k, num_batches_tracked if has_nbt else k,
            C, R, split, r_per, float(momentum), unbias, *fconsts, **fopts)
    else:
        k = md = mean
    res = residual if has_res else x
    bn_apply_kernel[grid](
        x, res, weight if weight is not None else x, bias if bias is not None else x, y,
        k, md, var, C, R, Se, *sx, *_strides(res, flat, S), *_strides(y, flat, S), float(eps),
        *consts, **opts)
    return mean, var


def _bwd_launch(x, Ne, Se, training, has_res, has_w, has_b, activation, act_param, store_dres):
    """(reduce grid, SPLIT, R_PER, reduce constexprs, apply grid, apply constexprs, options)."""
    N, C, S = x.shape
    R = N * S
    br, bc = _tiles(x, Se)
    cb = triton.cdiv(C, bc)
    split, r_per = _split(R, cb, br, x.device)
    rconsts, opts = split_constexprs(bn_bwd_reduce_kernel, _BWD_REDUCE_RUNTIME, dict(
        HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
        ACT_PARAM=float(act_param), BLOCK_R=br, BLOCK_C=bc, num_warps=4))
    aconsts, _ = split_constexprs(bn_bwd_apply_kernel, _BWD_APPLY_RUNTIME, dict(
        TRAINING=training, HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b,
        ACTIVATION=activation, ACT_PARAM=float(act_param), STORE_DRES=store_dres,
        BLOCK_R=br, BLOCK_C=bc, num_warps=4))
    return (cb, split), split, r_per, rconsts, (Ne * triton.cdiv(Se, br), cb), aconsts, opts


def launch_batch_norm_bwd(dy, x, residual, weight, bias, mean, var, dx, dres, training: bool,
                          eps: float, activation: int, act_param: float):
    """Writes dx (and dres = dy * act'(z) when given); returns (dw, db), both (C,), in the
    dtype of ``weight``/``bias`` (fp32 without them): two launches."""
    N, C, S = x.shape
    R = N * S
    dev = x.device
    dw = torch.empty(C, device=dev, dtype=weight.dtype if weight is not None else torch.float32)
    db = torch.empty(C, device=dev, dtype=bias.dtype if bias is not None else torch.float32)
    if C == 0 or R == 0:
        return dw.zero_(), db.zero_()
    has_res = residual is not None
    ts = (x, dy, dx) + ((residual,) if has_res else ()) + ((dres,) if dres is not None else ())
    Ne, Se = _geometry(N, S, *ts)
    flat = Ne == 1
    sig = (N, C, S, x.stride(1) == 1, flat, dev, training, has_res, weight is not None,
           bias is not None, activation, act_param, dres is not None)
    launch = _BWD_LAUNCH.get(sig)
    if launch is None:
        launch = _BWD_LAUNCH[sig] = _bwd_launch(x, Ne, Se, training, has_res, sig[8], sig[9],
                                                activation, act_param, sig[12])
    rgrid, split, r_per, rconsts, agrid, aconsts, opts = launch
    p1 = torch.empty(split, C, device=dev, dtype=torch.float32)
    p2 = torch.empty(split, C, device=dev, dtype=torch.float32)
    res = residual if has_res else x
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    sd, sx, sr = _strides(dy, flat, S), _strides(x, flat, S), _strides(res, flat, S)
    bn_bwd_reduce_kernel[rgrid](dy, x, res, w, b, mean, var, p1, p2, C, R, Se, r_per,
                                *sd, *sx, *sr, float(eps), *rconsts, **opts)
    bn_bwd_apply_kernel[agrid](
        dy, x, res, w, b, mean, var, p1, p2, dx, dres if dres is not None else dx, dw, db,
        C, R, Se, split, *sd, *sx, *sr, *_strides(dx, flat, S), float(eps), *aconsts, **opts)
    return dw, db


def launch_batch_norm_running(mean, var, running_mean, running_var, num_batches_tracked,
                              momentum: float, count: int, cumulative: bool) -> None:
    """Update the running stats from (C,) fp32 batch ``mean``/biased ``var`` (and increment
    ``num_batches_tracked``) as the finalize kernel does: one single-program launch."""
    C = mean.shape[0]
    running = running_mean is not None and count > 0
    has_nbt = num_batches_tracked is not None
    bn_running_kernel[(1,)](
        mean, var, running_mean if running else mean, running_var if running else mean,
        num_batches_tracked if has_nbt else mean, C, float(momentum),
        count / (count - 1) if count > 1 else 1.0, HAS_RUNNING=running, HAS_NBT=has_nbt,
        CUMULATIVE=cumulative, BLOCK_C=min(next_pow2(C), 1024), num_warps=4)

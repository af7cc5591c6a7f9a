"""The Triton kernels of BatchNorm + residual + activation (the design, grids and launch
parameters: :mod:`tilefuse.kernels.norm_bn`, which launches them)."""
from __future__ import annotations

import triton
import triton.language as tl

from tilefuse.kernels.activations import activation_grad, apply_activation


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
def _run_tile(x_ptr, n, s, s_hi, c, cmask, sxn, sxc, sxs):
    """The fp32 [BLOCK_R, BLOCK_C] tile of sample ``n`` at positions ``s`` (masked to the run's
    end ``s_hi``) and channels ``c``, and its mask."""
    mask = (s < s_hi)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + _offsets(n, s, c, sxn, sxc, sxs), mask=mask, other=0.0).to(tl.float32)
    return x, mask


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
            x, mask = _run_tile(x_ptr, n, s0 + rr, s_hi, c, cmask, sxn, sxc, sxs)
            acc += tl.where(mask, x - K[None, :], 0.0)
    local_mean = pairwise_sum0(acc, BLOCK_R, BLOCK_C) / (r_hi - r_lo)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for n in range(n_lo, n_hi):
        s_hi = tl.minimum(r_hi - n * S, S)
        for s0 in range(tl.maximum(r_lo - n * S, 0), s_hi, BLOCK_R):
            x, mask = _run_tile(x_ptr, n, s0 + rr, s_hi, c, cmask, sxn, sxc, sxs)
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
def _finish(z, r_ptr, b_ptr, y_ptr, n, s, c, cmask, mask, srn, src, srs, syn, syc, sys_,
            HAS_RESIDUAL: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
            ACT_PARAM: tl.constexpr):
    """``y = act(z + b (+ residual))`` for a tile of normalised, scaled values ``z``."""
    if HAS_B:
        z += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        z += tl.load(r_ptr + _offsets(n, s, c, srn, src, srs), mask=mask,
                     other=0.0).to(tl.float32)
    if ACTIVATION != 0:  # (skipping the call keeps the interpreter fast)
        z = apply_activation(z, ACTIVATION, ACT_PARAM)
    tl.store(y_ptr + _offsets(n, s, c, syn, syc, sys_), z.to(y_ptr.dtype.element_ty), mask=mask)


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
    _finish((x - md[None, :]) * scale[None, :], r_ptr, b_ptr, y_ptr, n, s, c, cmask, mask,
            srn, src, srs, syn, syc, sys_, HAS_RESIDUAL, HAS_B, ACTIVATION, ACT_PARAM)


@triton.jit
def _small_rows(R, S, BLOCK_R: tl.constexpr):
    """(n, s, mask) of every row ``r = n * S + s`` of a one-program problem (``R <= BLOCK_R``;
    the one per-element division of the BatchNorm kernels, in a single small program)."""
    r = tl.arange(0, BLOCK_R).to(tl.int64)
    n = r // S
    return n, r - n * S, r < R


@triton.jit
def bn_small_fwd_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, var_ptr, rm_ptr, rv_ptr,
                        nbt_ptr, C, R, S, sxn, sxc, sxs, srn, src, srs, syn, syc, sys_, eps,
                        momentum, unbias,
                        HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                        HAS_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr,
                        CUMULATIVE: tl.constexpr, STORE_STATS: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Training forward of a problem whose whole ``(N * S, C)`` fits one tile, in one program:
    the statistics kernel's shifted two-pass mean and variance (one slice), the finalize
    kernel's running-stat update and ``num_batches_tracked += 1``, and the apply kernel's
    ``act(((x - K) - md) * scale + b (+ residual))``, with x read once."""
    # (first, while no tile is live: the cumulative factor's fp64 division spilled after)
    m = _momentum(nbt_ptr, momentum, HAS_NBT, CUMULATIVE)
    n, s, smask = _small_rows(R, S, BLOCK_R)
    c = tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    mask = smask[:, None] & cmask[None, :]
    K = tl.load(x_ptr + c * sxc, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + _offsets(n, s, c, sxn, sxc, sxs), mask=mask, other=0.0).to(tl.float32)
    d = tl.where(mask, x - K[None, :], 0.0)
    md = pairwise_sum0(d, BLOCK_R, BLOCK_C) / R
    d = tl.where(mask, d - md[None, :], 0.0)
    var = pairwise_sum0(d * d, BLOCK_R, BLOCK_C) / R
    mean = K + md
    if STORE_STATS:
        tl.store(mean_ptr + c, mean, mask=cmask)
        tl.store(var_ptr + c, var, mask=cmask)
    if HAS_RUNNING:
        _update_running(rm_ptr, rv_ptr, c, cmask, mean, var, m, unbias)
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    _finish(d * scale[None, :], r_ptr, b_ptr, y_ptr, n, s, c, cmask, mask,
            srn, src, srs, syn, syc, sys_, HAS_RESIDUAL, HAS_B, ACTIVATION, ACT_PARAM)


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
    _bwd_out(dz, xhat, s1, s2, w, rstd, R, dx_ptr, dres_ptr, n, s, c, mask, son, soc, sos,
             TRAINING, STORE_DRES)


@triton.jit
def _bwd_out(dz, xhat, s1, s2, w, rstd, R, dx_ptr, dres_ptr, n, s, c, mask, son, soc, sos,
             TRAINING: tl.constexpr, STORE_DRES: tl.constexpr):
    """``d residual = dz`` and ``dx = w * rstd * (dz - s1 / R - xhat * s2 / R)`` (eval:
    ``dz * w * rstd``) from the channel sums ``s1 = sum(dz)``, ``s2 = sum(dz * xhat)``."""
    out_off = _offsets(n, s, c, son, soc, sos)
    if STORE_DRES:
        tl.store(dres_ptr + out_off, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        dz = dz - (s1 / R)[None, :] - xhat * (s2 / R)[None, :]
    dx = dz * (w * rstd)[None, :]
    tl.store(dx_ptr + out_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_small_bwd_kernel(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, var_ptr,
                        dx_ptr, dres_ptr, dw_ptr, db_ptr,
                        C, R, S, sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
                        son, soc, sos, eps,
                        TRAINING: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                        STORE_DRES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The backward of a problem whose whole ``(N * S, C)`` fits one tile, in one program: the
    reduction kernel's sums of ``dz`` and ``dz * xhat`` (one slice), stored as ``db``/``dw``,
    and the apply kernel's ``dx`` (and ``d residual``), with dy and x read once."""
    n, s, smask = _small_rows(R, S, BLOCK_R)
    c = tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    mask = smask[:, None] & cmask[None, :]
    mean, rstd, w, b = _channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, cmask, eps, HAS_W,
                                       HAS_B, BLOCK_C)
    xhat, dz = _bwd_tile(dy_ptr, x_ptr, r_ptr, w, b, mean, rstd, n, s, c, mask,
                         sdn, sdc, sds, sxn, sxc, sxs, srn, src, srs,
                         HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
    s1 = pairwise_sum0(dz, BLOCK_R, BLOCK_C)
    s2 = pairwise_sum0(dz * xhat, BLOCK_R, BLOCK_C)
    tl.store(db_ptr + c, s1.to(db_ptr.dtype.element_ty), mask=cmask)
    tl.store(dw_ptr + c, s2.to(dw_ptr.dtype.element_ty), mask=cmask)
    _bwd_out(dz, xhat, s1, s2, w, rstd, R, dx_ptr, dres_ptr, n, s, c, mask, son, soc, sos,
             TRAINING, STORE_DRES)

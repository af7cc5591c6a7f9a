"""The Triton kernels of GroupNorm / InstanceNorm + activation (the design, grids and launch
parameters: :mod:`tilefuse.kernels.norm_group`, which launches them)."""
from __future__ import annotations

import triton
import triton.language as tl

from tilefuse.kernels.activations import activation_grad, apply_activation
from tilefuse.kernels.norm_bn_jit import _update_running


@triton.jit
def _slab(pid, G, Cg, sn, sc):
    """(n, first channel, base offset) of the group of program ``pid`` (``n * G + g``)."""
    n = pid // G  # (one scalar division per program)
    c_first = (pid - n * G) * Cg
    return n, c_first, n * sn + c_first * sc


@triton.jit
def _slice_tile(x_ptr, xo, c, s, Cg, s_hi, sxc, sxs):
    """The fp32 [BLOCK_C, BLOCK_S] tile of a group's channels ``c`` and positions ``s`` (masked
    to the group's ``Cg`` channels and the slice's end ``s_hi``) and its mask."""
    mask = (c < Cg)[:, None] & (s < s_hi)[None, :]
    x = tl.load(x_ptr + xo + c[:, None].to(tl.int64) * sxc + s[None, :].to(tl.int64) * sxs,
                mask=mask, other=0.0).to(tl.float32)
    return x, mask


@triton.jit
def gn_stats_kernel(x_ptr, pmean_ptr, pm2_ptr, S, G, Cg, S_PER, SPLIT, sxn, sxc, sxs,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    n, c_first, xo = _slab(pid, G, Cg, sxn, sxc)
    s_lo = sp * S_PER
    s_hi = tl.minimum(s_lo + S_PER, S)
    K = tl.load(x_ptr + xo).to(tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            x, mask = _slice_tile(x_ptr, xo, c0 + offs_c, s0 + offs_s, Cg, s_hi, sxc, sxs)
            acc += tl.where(mask, x - K, 0.0)
    count = tl.cast(Cg * (s_hi - s_lo), tl.float32)
    local_mean = tl.sum(acc) / count
    acc = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            x, mask = _slice_tile(x_ptr, xo, c0 + offs_c, s0 + offs_s, Cg, s_hi, sxc, sxs)
            d = tl.where(mask, (x - K) - local_mean, 0.0)
            acc += d * d
    tl.store(pmean_ptr + pid * SPLIT + sp, local_mean)
    tl.store(pm2_ptr + pid * SPLIT + sp, tl.sum(acc))


@triton.jit
def _group_stats(x_ptr, pmean_ptr, pm2_ptr, pid, xo, S, Cg, S_PER, SPLIT, eps):
    """Chan's merge of a group's SPLIT partials, in a fixed order: (mean, rstd)."""
    total = tl.cast(Cg * S, tl.float32)
    acc = 0.0
    for sp in range(0, SPLIT):
        cnt = tl.cast(Cg * tl.minimum(S_PER, S - sp * S_PER), tl.float32)
        acc += tl.load(pmean_ptr + pid * SPLIT + sp) * cnt
    md = acc / total
    acc = 0.0
    for sp in range(0, SPLIT):
        cnt = tl.cast(Cg * tl.minimum(S_PER, S - sp * S_PER), tl.float32)
        d = tl.load(pmean_ptr + pid * SPLIT + sp) - md
        acc += d * d * cnt + tl.load(pm2_ptr + pid * SPLIT + sp)
    mean = tl.load(x_ptr + xo).to(tl.float32) + md
    return mean, 1.0 / tl.sqrt(acc / total + eps)


@triton.jit
def _tile_stats(x, mask, K, count, eps):
    """(mean, rstd) of a whole group held in one fp32 tile (``mask``: its ``count`` elements),
    as :func:`gn_stats_kernel` computes a slice's: the mean of ``x - K`` (``K`` the group's
    first value), then the sum of squared deviations from it (two passes over registers)."""
    d = tl.where(mask, x - K, 0.0)
    total = tl.cast(count, tl.float32)
    md = tl.sum(d) / total
    e = tl.where(mask, d - md, 0.0)
    return K + md, 1.0 / tl.sqrt(tl.sum(e * e) / total + eps)


@triton.jit
def _apply_tile(x, mean, rstd, w, b, y_ptr, yo, c64, s64, mask, syc, sys_,
                ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr):
    z = (x - mean) * rstd * w[:, None] + b[:, None]
    if ACTIVATION != 0:  # (skipping the call keeps the interpreter fast)
        z = apply_activation(z, ACTIVATION, ACT_PARAM)
    tl.store(y_ptr + yo + c64[:, None] * syc + s64[None, :] * sys_,
             z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gn_apply_kernel(x_ptr, w_ptr, b_ptr, y_ptr, pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr,
                    S, G, Cg, S_PER, SPLIT, sxn, sxc, sxs, syn, syc, sys_, eps,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_STATS: tl.constexpr,
                    FUSED: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """``FUSED``: the group is one ``[BLOCK_C, BLOCK_S]`` tile (grid ``(N * G, 1)``): the
    program computes its statistics in registers and normalises the tile it holds (one launch,
    no partials); else the group's ``SPLIT`` partials are merged and a run of ``S`` written."""
    pid = tl.program_id(0).to(tl.int64)
    n, c_first, xo = _slab(pid, G, Cg, sxn, sxc)
    yo = n * syn + c_first * syc
    if FUSED:
        c = tl.arange(0, BLOCK_C)
        s = tl.arange(0, BLOCK_S)
        x, mask = _slice_tile(x_ptr, xo, c, s, Cg, S, sxc, sxs)
        mean, rstd = _tile_stats(x, mask, tl.load(x_ptr + xo).to(tl.float32), Cg * S, eps)
        if STORE_STATS:
            tl.store(mean_ptr + pid, mean)
            tl.store(rstd_ptr + pid, rstd)
        w, b = _wb(w_ptr, b_ptr, c_first, c, c < Cg, HAS_W, HAS_B, BLOCK_C)
        _apply_tile(x, mean, rstd, w, b, y_ptr, yo, c.to(tl.int64), s.to(tl.int64), mask, syc,
                    sys_, ACTIVATION, ACT_PARAM)
    else:
        mean, rstd = _group_stats(x_ptr, pmean_ptr, pm2_ptr, pid, xo, S, Cg, S_PER, SPLIT, eps)
        if STORE_STATS:
            if tl.program_id(1) == 0:
                tl.store(mean_ptr + pid, mean)
                tl.store(rstd_ptr + pid, rstd)
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = s < S
        s64 = s.to(tl.int64)
        for c0 in range(0, Cg, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < Cg
            w, b = _wb(w_ptr, b_ptr, c_first, c, cmask, HAS_W, HAS_B, BLOCK_C)
            mask = cmask[:, None] & smask[None, :]
            c64 = c.to(tl.int64)
            x = tl.load(x_ptr + xo + c64[:, None] * sxc + s64[None, :] * sxs, mask=mask,
                        other=0.0).to(tl.float32)
            _apply_tile(x, mean, rstd, w, b, y_ptr, yo, c64, s64, mask, syc, sys_, ACTIVATION,
                        ACT_PARAM)


@triton.jit
def _bwd_tile(dy_ptr, x_ptr, w, b, mean, rstd, dyo, xo, c64, s64, mask, sdc, sds, sxc, sxs,
              ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr):
    """(xhat, dz = dy * act'(z)) of one tile, zero outside ``mask``."""
    x = tl.load(x_ptr + xo + c64[:, None] * sxc + s64[None, :] * sxs, mask=mask,
                other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dz = tl.load(dy_ptr + dyo + c64[:, None] * sdc + s64[None, :] * sds, mask=mask,
                 other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        dz = tl.where(mask, dz * activation_grad(xhat * w[:, None] + b[:, None], ACTIVATION,
                                                 ACT_PARAM), 0.0)
    return xhat, dz


@triton.jit
def _wb(w_ptr, b_ptr, c_first, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        BLOCK_C: tl.constexpr):
    w = tl.full((BLOCK_C,), 1.0, tl.float32)
    b = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c_first + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c_first + c, mask=cmask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def gn_bwd_reduce_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, pc1_ptr, pc2_ptr,
                         dwp_ptr, dbp_ptr, C, S, G, Cg, S_PER, SPLIT,
                         sdn, sdc, sds, sxn, sxc, sxs,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
                         ACT_PARAM: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    n, c_first, xo = _slab(pid, G, Cg, sxn, sxc)
    dyo = n * sdn + c_first * sdc
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    s_lo = sp * S_PER
    s_hi = tl.minimum(s_lo + S_PER, S)
    a1 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    a2 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    row = (n * SPLIT + sp) * C + c_first  # this program's (N * SPLIT, C) partial row
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < Cg
        c64 = c.to(tl.int64)
        w, b = _wb(w_ptr, b_ptr, c_first, c, cmask, HAS_W, HAS_B, BLOCK_C)
        pw = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        pb = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = cmask[:, None] & (s < s_hi)[None, :]
            xhat, dz = _bwd_tile(dy_ptr, x_ptr, w, b, mean, rstd, dyo, xo, c64,
                                 s.to(tl.int64), mask, sdc, sds, sxc, sxs, ACTIVATION, ACT_PARAM)
            g = dz * w[:, None]
            a1 += g
            a2 += g * xhat
            pw += dz * xhat
            pb += dz
        if NEED_DW:
            tl.store(dwp_ptr + row + c, tl.sum(pw, axis=1), mask=cmask)
        if NEED_DB:
            tl.store(dbp_ptr + row + c, tl.sum(pb, axis=1), mask=cmask)
    tl.store(pc1_ptr + pid * SPLIT + sp, tl.sum(a1))
    tl.store(pc2_ptr + pid * SPLIT + sp, tl.sum(a2))


@triton.jit
def gn_bwd_apply_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, pc1_ptr, pc2_ptr, dx_ptr,
                        S, G, Cg, SPLIT, sdn, sdc, sds, sxn, sxc, sxs, son, soc, sos,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
                        ACT_PARAM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n, c_first, xo = _slab(pid, G, Cg, sxn, sxc)
    dyo = n * sdn + c_first * sdc
    dxo = n * son + c_first * soc
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    c1 = 0.0
    c2 = 0.0
    for sp in range(0, SPLIT):  # the slices' group sums, in a fixed order
        c1 += tl.load(pc1_ptr + pid * SPLIT + sp)
        c2 += tl.load(pc2_ptr + pid * SPLIT + sp)
    total = tl.cast(Cg * S, tl.float32)
    c1 = c1 / total
    c2 = c2 / total
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    s64 = s.to(tl.int64)
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < Cg
        c64 = c.to(tl.int64)
        w, b = _wb(w_ptr, b_ptr, c_first, c, cmask, HAS_W, HAS_B, BLOCK_C)
        mask = cmask[:, None] & smask[None, :]
        xhat, dz = _bwd_tile(dy_ptr, x_ptr, w, b, mean, rstd, dyo, xo, c64, s64, mask,
                             sdc, sds, sxc, sxs, ACTIVATION, ACT_PARAM)
        dx = (dz * w[:, None] - c1 - xhat * c2) * rstd
        tl.store(dx_ptr + dxo + c64[:, None] * soc + s64[None, :] * sos,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def param_grad_block(dwp_ptr, dbp_ptr, dw_ptr, db_ptr, C, ROWS, block, NEED_DW: tl.constexpr,
                     NEED_DB: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels ``block * BLOCK_C ..`` of ``dw``/``db``: the ``(ROWS, C)`` fp32 partials summed
    in a fixed order, stored in the parameters' dtype."""
    c = block * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    aw = tl.zeros((BLOCK_C,), tl.float32)
    ab = tl.zeros((BLOCK_C,), tl.float32)
    for r in range(0, ROWS):  # fixed order
        if NEED_DW:
            aw += tl.load(dwp_ptr + r * C + c, mask=cmask, other=0.0)
        if NEED_DB:
            ab += tl.load(dbp_ptr + r * C + c, mask=cmask, other=0.0)
    if NEED_DW:
        tl.store(dw_ptr + c, aw.to(dw_ptr.dtype.element_ty), mask=cmask)
    if NEED_DB:
        tl.store(db_ptr + c, ab.to(db_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def gn_param_grad_kernel(dwp_ptr, dbp_ptr, dw_ptr, db_ptr, C, ROWS, NEED_DW: tl.constexpr,
                         NEED_DB: tl.constexpr, BLOCK_C: tl.constexpr):
    param_grad_block(dwp_ptr, dbp_ptr, dw_ptr, db_ptr, C, ROWS, tl.program_id(0), NEED_DW,
                     NEED_DB, BLOCK_C)


@triton.jit
def instance_running_kernel(mean_ptr, rstd_ptr, rm_ptr, rv_ptr, N, C, eps, momentum, unbias,
                            BLOCK_C: tl.constexpr):
    """InstanceNorm running statistics from the forward's saved per-instance ``mean``/``rstd``
    (``(N, C)`` fp32): ``running = (1 - m) * running + m * stat`` with ``stat`` the mean over
    samples of the instance means and unbiased variances (``1 / rstd^2 - eps``, times
    ``S / (S - 1)``), as ``F.instance_norm``; samples summed in a fixed order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    am = tl.zeros((BLOCK_C,), tl.float32)
    av = tl.zeros((BLOCK_C,), tl.float32)
    for n in range(0, N):
        am += tl.load(mean_ptr + n * C + c, mask=cmask, other=0.0)
        r = tl.load(rstd_ptr + n * C + c, mask=cmask, other=1.0)
        av += 1.0 / (r * r) - eps
    _update_running(rm_ptr, rv_ptr, c, cmask, am / N, av / N, momentum, unbias)

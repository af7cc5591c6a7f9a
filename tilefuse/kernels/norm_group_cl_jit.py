"""The Triton kernels of GroupNorm + activation for channels-innermost (channels_last) inputs (the
design, grids and launch parameters: :mod:`tilefuse.kernels.norm_group`, which launches them).

A group's channels are not a contiguous run here (``Cg`` channels, strided by ``C`` along ``S``),
so no kernel walks one group: every program takes ``[BLOCK_C, BLOCK_S]`` tiles of a block of
``BLOCK_C`` consecutive channels (contiguous, 128-bit accesses; the channel axis is the tile's
axis 0, as in :mod:`tilefuse.kernels.norm_group_jit`, whose tile helpers these reuse) and works
per channel; per-channel results are combined per group by a small merge kernel.

Forward, three launches: :func:`gn_cl_stats_kernel` (grid ``(N, SPLIT, C blocks)``: per channel
and slice of ``S``, the local mean of ``x - K`` with ``K`` the channel's group's first value, and
the sum of squared deviations, from one pass of shifted sums ``sum(x - K)``, ``sum((x - K)^2)``:
``x - K`` is exact near the mean and of the order of the deviations, so the difference
``sum((x - K)^2) - n * mean(x - K)^2`` does not cancel unless ``K`` is an outlier many standard
deviations out; a second pass would add half the input's traffic again, the per-channel
partials already cost ``10 / S`` of it), :func:`gn_cl_merge_kernel` (one program per ``(n, g)``: Chan's
merge of the group's ``SPLIT * Cg`` partials as one tile, mean/rstd stored) and
:func:`gn_cl_apply_kernel` (grid ``(N * S blocks, C blocks)``; mean/rstd gathered per channel).
Backward, three launches: :func:`gn_cl_bwd_reduce_kernel` (per channel and slice: sums of ``dz``
and ``dz * xhat``: they are the ``db``/``dw`` partials, and ``w``-weighted they give the group
sums), :func:`gn_cl_merge_kernel` with ``BWD`` (the group sums, and the ``dw``/``db`` column sums
in the parameters' dtype in the same launch) and :func:`gn_cl_bwd_apply_kernel`. Fixed orders,
no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tilefuse.kernels.activations import apply_activation
from tilefuse.kernels.norm_group_jit import _bwd_tile, _slice_tile, _wb, param_grad_block


@triton.jit
def _slice(S, S_PER):
    sp = tl.program_id(1)
    s_lo = sp * S_PER
    return sp, s_lo, tl.minimum(s_lo + S_PER, S)


@triton.jit
def _rows(S, BLOCK_S: tl.constexpr):
    """(n, positions s, mask) of a wide-grid program: axis 0 enumerates (n, block of S)."""
    sb = tl.cdiv(S, BLOCK_S)
    pid = tl.program_id(0).to(tl.int64)
    n = pid // sb  # (one scalar division per program)
    s = (pid - n * sb) * BLOCK_S + tl.arange(0, BLOCK_S)
    return n, s.to(tl.int64), s < S


@triton.jit
def _channel_stats(mean_ptr, rstd_ptr, n, c, cmask, G, Cg):
    """Per-channel ``[BLOCK_C, 1]`` mean/rstd of the channels' groups (one division per
    channel, not per element)."""
    gi = n * G + c // Cg
    mean = tl.load(mean_ptr + gi, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + gi, mask=cmask, other=0.0)
    return mean[:, None], rstd[:, None]


@triton.jit
def gn_cl_stats_kernel(x_ptr, pmean_ptr, pm2_ptr, C, S, Cg, S_PER, sxn, sxc, sxs,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    sp, s_lo, s_hi = _slice(S, S_PER)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xo = n * sxn
    K = tl.load(x_ptr + xo + ((c // Cg) * Cg).to(tl.int64) * sxc, mask=cmask,
                other=0.0).to(tl.float32)[:, None]  # each channel's group's first value
    c64 = c.to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    a1 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    a2 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):  # one pass: shifted sums (see the module docstring)
        x, mask = _slice_tile(x_ptr, xo, c64, s0 + offs_s, C, s_hi, sxc, sxs)
        d = tl.where(mask, x - K, 0.0)
        a1 += d
        a2 += d * d
    sum1 = tl.sum(a1, axis=1)
    local_mean = sum1 / (s_hi - s_lo).to(tl.float32)
    m2 = tl.maximum(tl.sum(a2, axis=1) - local_mean * sum1, 0.0)
    out = (n * tl.num_programs(1) + sp) * C + c
    tl.store(pmean_ptr + out, local_mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def gn_cl_merge_kernel(x_ptr, w_ptr, p1_ptr, p2_ptr, o1_ptr, o2_ptr, dw_ptr, db_ptr,
                       N, C, S, G, Cg, S_PER, SPLIT, sxn, sxc, eps,
                       BWD: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr,
                       NEED_DB: tl.constexpr, BLOCK_SP: tl.constexpr, BLOCK_J: tl.constexpr,
                       BLOCK_PC: tl.constexpr):
    """Programs ``0 .. N*G-1``: one group's ``[SPLIT, Cg]`` per-channel partials as
    ``[BLOCK_SP, BLOCK_J]`` tiles. Forward: Chan's merge -> ``o1 = mean``, ``o2 = rstd``.
    Backward (``BWD``): ``o1 = mean(dz * w)``, ``o2 = mean(dz * w * xhat)`` over the group, and
    programs ``N*G ..`` sum the ``(N * SPLIT, C)`` partials into ``dw``/``db``."""
    pid = tl.program_id(0)
    NG = N * G
    if pid < NG:
        n = (pid // G).to(tl.int64)
        first = (pid - n * G) * Cg
        sp = tl.arange(0, BLOCK_SP)
        spmask = sp < SPLIT
        cnt = tl.where(spmask, tl.minimum(S_PER, S - sp * S_PER), 0).to(tl.float32)[:, None]
        rows = (n * SPLIT + sp) * C + first
        total = (Cg * S).to(tl.float32)
        a1 = tl.zeros((BLOCK_SP, BLOCK_J), tl.float32)
        a2 = tl.zeros((BLOCK_SP, BLOCK_J), tl.float32)
        for j0 in range(0, Cg, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            mask = spmask[:, None] & (j < Cg)[None, :]
            off = rows[:, None] + j[None, :]
            p1 = tl.load(p1_ptr + off, mask=mask, other=0.0)
            if BWD:
                w = tl.full((BLOCK_J,), 1.0, tl.float32)
                if HAS_W:
                    w = tl.load(w_ptr + first + j, mask=j < Cg, other=0.0).to(tl.float32)
                a1 += p1 * w[None, :]
                a2 += tl.load(p2_ptr + off, mask=mask, other=0.0) * w[None, :]
            else:
                a1 += p1 * cnt
        if BWD:
            tl.store(o1_ptr + pid, tl.sum(a1) / total)
            tl.store(o2_ptr + pid, tl.sum(a2) / total)
        else:
            md = tl.sum(a1) / total
            for j0 in range(0, Cg, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                mask = spmask[:, None] & (j < Cg)[None, :]
                off = rows[:, None] + j[None, :]
                d = tl.load(p1_ptr + off, mask=mask, other=0.0) - md
                a2 += tl.where(mask, d * d * cnt + tl.load(p2_ptr + off, mask=mask, other=0.0),
                               0.0)
            K = tl.load(x_ptr + n * sxn + first.to(tl.int64) * sxc).to(tl.float32)
            tl.store(o1_ptr + pid, K + md)
            tl.store(o2_ptr + pid, 1.0 / tl.sqrt(tl.sum(a2) / total + eps))
    elif BWD:
        param_grad_block(p2_ptr, p1_ptr, dw_ptr, db_ptr, C, N * SPLIT, pid - NG, NEED_DW,
                         NEED_DB, BLOCK_PC)


@triton.jit
def gn_cl_apply_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, C, S, G, Cg,
                       sxn, sxc, sxs, syn, syc, sys_,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
                       ACT_PARAM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, s, smask = _rows(S, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, rstd = _channel_stats(mean_ptr, rstd_ptr, n, c, cmask, G, Cg)
    w, b = _wb(w_ptr, b_ptr, 0, c, cmask, HAS_W, HAS_B, BLOCK_C)
    mask = cmask[:, None] & smask[None, :]
    c64 = c.to(tl.int64)
    x = tl.load(x_ptr + n * sxn + c64[:, None] * sxc + s[None, :] * sxs, mask=mask,
                other=0.0).to(tl.float32)
    z = (x - mean) * rstd * w[:, None] + b[:, None]
    if ACTIVATION != 0:  # (skipping the call keeps the interpreter fast)
        z = apply_activation(z, ACTIVATION, ACT_PARAM)
    tl.store(y_ptr + n * syn + c64[:, None] * syc + s[None, :] * sys_,
             z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gn_cl_bwd_reduce_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, p1_ptr, p2_ptr,
                            C, S, G, Cg, S_PER, sdn, sdc, sds, sxn, sxc, sxs,
                            HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
                            ACT_PARAM: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    sp, s_lo, s_hi = _slice(S, S_PER)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    c64 = c.to(tl.int64)
    mean, rstd = _channel_stats(mean_ptr, rstd_ptr, n, c, cmask, G, Cg)
    w, b = _wb(w_ptr, b_ptr, 0, c, cmask, HAS_W, HAS_B, BLOCK_C)
    a1 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    a2 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < s_hi)[None, :]
        xhat, dz = _bwd_tile(dy_ptr, x_ptr, w, b, mean, rstd, n * sdn, n * sxn, c64,
                             s.to(tl.int64), mask, sdc, sds, sxc, sxs, ACTIVATION, ACT_PARAM)
        a1 += dz
        a2 += dz * xhat
    out = (n * tl.num_programs(1) + sp) * C + c
    tl.store(p1_ptr + out, tl.sum(a1, axis=1), mask=cmask)
    tl.store(p2_ptr + out, tl.sum(a2, axis=1), mask=cmask)


@triton.jit
def gn_cl_bwd_apply_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr,
                           dx_ptr, C, S, G, Cg, sdn, sdc, sds, sxn, sxc, sxs, son, soc, sos,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
                           ACT_PARAM: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_S: tl.constexpr):
    n, s, smask = _rows(S, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    c64 = c.to(tl.int64)
    mean, rstd = _channel_stats(mean_ptr, rstd_ptr, n, c, cmask, G, Cg)
    c1, c2 = _channel_stats(c1_ptr, c2_ptr, n, c, cmask, G, Cg)
    w, b = _wb(w_ptr, b_ptr, 0, c, cmask, HAS_W, HAS_B, BLOCK_C)
    mask = cmask[:, None] & smask[None, :]
    xhat, dz = _bwd_tile(dy_ptr, x_ptr, w, b, mean, rstd, n * sdn, n * sxn, c64, s, mask,
                         sdc, sds, sxc, sxs, ACTIVATION, ACT_PARAM)
    dx = (dz * w[:, None] - c1 - xhat * c2) * rstd
    tl.store(dx_ptr + n * son + c64[:, None] * soc + s[None, :] * sos,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)

"""The Triton kernels of GroupNorm + activation for channels-innermost (channels_last) inputs (the
design, grids and launch parameters: :mod:`tilefuse.kernels.norm_group`, which launches them).

A group's channels are not a contiguous run here (``Cg`` channels, strided by ``C`` along ``S``),
so no kernel walks one group: every program takes ``[BLOCK_C, BLOCK_S]`` tiles of a block of
``BLOCK_C`` consecutive channels (contiguous, 128-bit accesses; the channel axis is the tile's
axis 0, as in :mod:`tilefuse.kernels.norm_group_jit`, whose tile helpers these reuse) and works
per channel; per-channel results are combined per group by a small merge kernel.

Forward, three launches: :func:`gn_cl_stats_kernel` (grid ``(N, SPLIT, C blocks)``: per channel
and slice of ``S``, the local mean of ``x - K`` with ``K`` the channel's first value (re-based on
the group's first value in the merge), and
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
    channel, not per element; gathered: the reduction, before any per-channel copy exists)."""
    gi = n * G + c // Cg
    mean = tl.load(mean_ptr + gi, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + gi, mask=cmask, other=0.0)
    return mean[:, None], rstd[:, None]


@triton.jit
def _per_channel(ch_ptr, k: tl.constexpr, N, C, n, c, cmask):
    """Row ``k`` of the merge kernel's ``(rows, N, C)`` fp32 per-channel values at sample ``n``,
    channels ``c``, as ``[BLOCK_C, 1]`` (contiguous: vector loads, no gather)."""
    return tl.load(ch_ptr + (k * N + n) * C + c, mask=cmask, other=0.0)[:, None]


@triton.jit
def _shift(x_ptr, xo, first, j, jmask, sxc):
    """``K_c - K_g``: the statistics kernel's per-channel shift (the channel's first value)
    relative to the group's (its first channel's): local means are re-based on ``K_g`` in the
    merge (exact in fp32 for 16-bit inputs whose exponents differ by less than 16)."""
    kg = tl.load(x_ptr + xo + first.to(tl.int64) * sxc).to(tl.float32)
    kc = tl.load(x_ptr + xo + (first + j).to(tl.int64) * sxc, mask=jmask, other=0.0)
    return tl.where(jmask, kc.to(tl.float32) - kg, 0.0)[None, :], kg


@triton.jit
def gn_cl_stats_kernel(x_ptr, pmean_ptr, pm2_ptr, C, S, Cg, S_PER, sxn, sxc, sxs,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    sp, s_lo, s_hi = _slice(S, S_PER)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xo = n * sxn
    c64 = c.to(tl.int64)
    K = tl.load(x_ptr + xo + c64 * sxc, mask=cmask, other=0.0).to(tl.float32)[:, None]
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
def gn_cl_merge_kernel(x_ptr, w_ptr, p1_ptr, p2_ptr, mean_ptr, rstd_ptr, ch_ptr, dw_ptr, db_ptr,
                       N, C, S, G, Cg, S_PER, SPLIT, sxn, sxc, eps,
                       BWD: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr,
                       NEED_DB: tl.constexpr, BLOCK_SP: tl.constexpr, BLOCK_J: tl.constexpr,
                       BLOCK_PC: tl.constexpr):
    """Programs ``0 .. N*G-1``: one group's ``[SPLIT, Cg]`` per-channel partials as
    ``[BLOCK_SP, BLOCK_J]`` tiles. Forward: Chan's merge -> the group's ``mean``/``rstd``
    (stored for the backward) and per channel ``ch = (mean, rstd * w)``, ``(2, N, C)``.
    Backward (``BWD``): ``c1 = mean(dz * w)``, ``c2 = mean(dz * w * xhat)`` over the group ->
    per channel ``ch = (mean, rstd, c1, c2)``, ``(4, N, C)`` (``mean``/``rstd`` read); programs
    ``N*G ..`` sum the ``(N * SPLIT, C)`` partials into ``dw``/``db``. The apply kernels then
    load contiguous per-channel rows instead of gathering per group."""
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
            if not BWD:
                p1 += _shift(x_ptr, n * sxn, first, j, j < Cg, sxc)[0]
            if BWD:
                w = tl.full((BLOCK_J,), 1.0, tl.float32)
                if HAS_W:
                    w = tl.load(w_ptr + first + j, mask=j < Cg, other=0.0).to(tl.float32)
                a1 += p1 * w[None, :]
                a2 += tl.load(p2_ptr + off, mask=mask, other=0.0) * w[None, :]
            else:
                a1 += p1 * cnt
        if BWD:
            mean = tl.load(mean_ptr + pid)
            rstd = tl.load(rstd_ptr + pid)
            c1 = tl.sum(a1) / total
            c2 = tl.sum(a2) / total
            for j0 in range(0, Cg, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                jmask = j < Cg
                out = ch_ptr + n * C + first + j
                zero = tl.zeros((BLOCK_J,), tl.float32)
                tl.store(out, zero + mean, mask=jmask)
                tl.store(out + N * C, zero + rstd, mask=jmask)
                tl.store(out + 2 * N * C, zero + c1, mask=jmask)
                tl.store(out + 3 * N * C, zero + c2, mask=jmask)
        else:
            md = tl.sum(a1) / total
            for j0 in range(0, Cg, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                mask = spmask[:, None] & (j < Cg)[None, :]
                off = rows[:, None] + j[None, :]
                shift, _ = _shift(x_ptr, n * sxn, first, j, j < Cg, sxc)
                d = (tl.load(p1_ptr + off, mask=mask, other=0.0) + shift) - md
                a2 += tl.where(mask, d * d * cnt + tl.load(p2_ptr + off, mask=mask, other=0.0),
                               0.0)
            mean = tl.load(x_ptr + n * sxn + first.to(tl.int64) * sxc).to(tl.float32) + md
            rstd = 1.0 / tl.sqrt(tl.sum(a2) / total + eps)
            tl.store(mean_ptr + pid, mean)
            tl.store(rstd_ptr + pid, rstd)
            for j0 in range(0, Cg, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                jmask = j < Cg
                a = tl.full((BLOCK_J,), 1.0, tl.float32)
                if HAS_W:
                    a = tl.load(w_ptr + first + j, mask=jmask, other=0.0).to(tl.float32)
                out = ch_ptr + n * C + first + j
                tl.store(out, tl.zeros((BLOCK_J,), tl.float32) + mean, mask=jmask)
                tl.store(out + N * C, a * rstd, mask=jmask)
    elif BWD:
        param_grad_block(p2_ptr, p1_ptr, dw_ptr, db_ptr, C, N * SPLIT, pid - NG, NEED_DW,
                         NEED_DB, BLOCK_PC)


@triton.jit
def gn_cl_apply_kernel(x_ptr, b_ptr, y_ptr, ch_ptr, N, C, S,
                       sxn, sxc, sxs, syn, syc, sys_,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
                       ACT_PARAM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, s, smask = _rows(S, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = _per_channel(ch_ptr, 0, N, C, n, c, cmask)
    scale = _per_channel(ch_ptr, 1, N, C, n, c, cmask)  # rstd * w
    _, b = _wb(b_ptr, b_ptr, 0, c, cmask, False, HAS_B, BLOCK_C)
    mask = cmask[:, None] & smask[None, :]
    c64 = c.to(tl.int64)
    x = tl.load(x_ptr + n * sxn + c64[:, None] * sxc + s[None, :] * sxs, mask=mask,
                other=0.0).to(tl.float32)
    z = (x - mean) * scale + b[:, None]
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
def gn_cl_bwd_apply_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, ch_ptr,
                           dx_ptr, N, C, S, sdn, sdc, sds, sxn, sxc, sxs, son, soc, sos,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACTIVATION: tl.constexpr,
                           ACT_PARAM: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_S: tl.constexpr):
    n, s, smask = _rows(S, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    c64 = c.to(tl.int64)
    mean = _per_channel(ch_ptr, 0, N, C, n, c, cmask)
    rstd = _per_channel(ch_ptr, 1, N, C, n, c, cmask)
    c1 = _per_channel(ch_ptr, 2, N, C, n, c, cmask)
    c2 = _per_channel(ch_ptr, 3, N, C, n, c, cmask)
    w, b = _wb(w_ptr, b_ptr, 0, c, cmask, HAS_W, HAS_B, BLOCK_C)
    mask = cmask[:, None] & smask[None, :]
    xhat, dz = _bwd_tile(dy_ptr, x_ptr, w, b, mean, rstd, n * sdn, n * sxn, c64, s, mask,
                         sdc, sds, sxc, sxs, ACTIVATION, ACT_PARAM)
    dx = (dz * w[:, None] - c1 - xhat * c2) * rstd
    tl.store(dx_ptr + n * son + c64[:, None] * soc + s[None, :] * sos,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)

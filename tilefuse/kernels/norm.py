"""Row-wise LayerNorm / RMSNorm with a fused residual add (before the norm) and activation (after).

Forward::

    h = x (+ residual)            # pre-norm residual add, fp32
    z = (h - mean) * rstd * w + b # RMSNorm: mean = 0, no bias
    y = act(z)

Statistics are fp32 and two-pass (mean, then the mean of squared deviations), so large means do
not cancel. When a row fits one block (``ONE_BLOCK``, N <= ``MAX_BLOCK``) it is loaded once and
kept in registers, and short rows are packed ``BLOCK_M`` to a program (a 2-D tile), so a
program is never a handful of active lanes. Wider rows take one program each and loop over
``BLOCK_N`` chunks (re-reading the row, which then mostly hits L2).
``mean``/``rstd`` are saved for backward; ``z`` is not: backward recomputes it from ``h``.

Backward is persistent: ``G`` (about 2x the SM count) programs each take row blocks
``pid, pid + G, ...``, write ``dx`` in one pass and accumulate ``dw``/``db`` partial sums for
their rows in fp32 registers (for wide rows: in their own row of the partial buffer). The
``(G, N)`` partials are then reduced in a fixed order: a deterministic two-stage reduction, no
atomics (the Liger / Fast-LLM design noted in shared/perf-notes.md).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, sm_count, split_constexprs
from tilefuse.kernels.activations import activation_grad, apply_activation

MAX_BLOCK = 32768  # widest row kept on chip (32 warps: 32 fp32 elements a thread); wider loop
# ... with a residual or an activation the extra live values spill at 32K (tools/aot_check.py:
# fp32 RMSNorm + residual + GELU), and the backward keeps ~6 row-sized values live: lower caps
FUSED_MAX_BLOCK = 16384
BWD_MAX_BLOCK = 8192
ROW_CHUNK = 4096  # wide backward, statistics pass: columns per loop step


@triton.jit
def _load_h(x_ptr, r_ptr, row, cols, mask, sxm, sxn, srm, srn, HAS_RESIDUAL: tl.constexpr,
            ROUND_H: tl.constexpr = False):
    """``x (+ residual)`` in fp32; ``ROUND_H``: the sum rounded to x's dtype (the stored
    pre-norm stream ``h``, which the norm then normalizes, as eager ``norm(x + residual)``)."""
    h = tl.load(x_ptr + row * sxm + cols * sxn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(r_ptr + row * srm + cols * srn, mask=mask, other=0.0).to(tl.float32)
    if ROUND_H:
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    return h


@triton.jit
def norm_fwd_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, h_ptr,
                    M, N, sxm, sxn, srm, srn, eps,
                    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                    ONE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    STORE_STATS: tl.constexpr, STORE_H: tl.constexpr = False):
    """``STORE_H`` (pre-norm residual stream): also write ``h = x + residual`` (x's dtype,
    (M, N) contiguous) and normalize that rounded ``h``."""
    offs = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        # BLOCK_M whole rows per program, kept in registers
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        cols = offs.to(tl.int64)
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        h = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxn, mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(r_ptr + rows[:, None] * srm + cols[None, :] * srn, mask=mask,
                         other=0.0).to(tl.float32)
        if STORE_H:
            hq = h.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rows[:, None] * N + cols[None, :], hq, mask=mask)
            h = hq.to(tl.float32)
        if IS_RMS:
            hc = h
        else:
            mean_v = tl.sum(h, axis=1) / N
            hc = tl.where(mask, h - mean_v[:, None], 0.0)
            if STORE_STATS:
                tl.store(mean_ptr + rows, mean_v, mask=rmask)
        rstd_v = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=1) / N + eps)
        if STORE_STATS:
            tl.store(rstd_ptr + rows, rstd_v, mask=rmask)
        z = hc * rstd_v[:, None]
        if HAS_W:
            z = z * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            z = z + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION != 0:  # (skipping the call keeps the interpreter fast)
            z = apply_activation(z, ACTIVATION, ACT_PARAM)
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], z.to(y_ptr.dtype.element_ty),
                 mask=mask)
    else:
        row = tl.program_id(0).to(tl.int64)
        y_row = y_ptr + row * N
        # one statistics pass: each chunk's mean and squared deviations are exact in
        # registers, then merged into the running ones (Chan et al.): two passes over the row
        # in all (statistics, apply), no cancellation from a large mean
        mean = 0.0
        m2 = 0.0
        for n0 in range(0, N, BLOCK_N):
            cols = (n0 + offs).to(tl.int64)
            mask = cols < N
            h = _load_h(x_ptr, r_ptr, row, cols, mask, sxm, sxn, srm, srn, HAS_RESIDUAL,
                        STORE_H)
            if IS_RMS:
                m2 += tl.sum(h * h, axis=0)
            else:
                n_c = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
                mean_c = tl.sum(h, axis=0) / n_c
                dev = tl.where(mask, h - mean_c, 0.0)
                n_prev = n0 * 1.0
                delta = mean_c - mean
                mean += delta * (n_c / (n_prev + n_c))
                m2 += tl.sum(dev * dev, axis=0) + delta * delta * (n_prev * n_c / (n_prev + n_c))
        acc2 = m2
        rstd = 1.0 / tl.sqrt(acc2 / N + eps)
        for n0 in range(0, N, BLOCK_N):
            cols = (n0 + offs).to(tl.int64)
            mask = cols < N
            h = _load_h(x_ptr, r_ptr, row, cols, mask, sxm, sxn, srm, srn, HAS_RESIDUAL,
                        STORE_H)
            if STORE_H:
                tl.store(h_ptr + row * N + cols, h.to(h_ptr.dtype.element_ty), mask=mask)
            z = (h - mean) * rstd
            if HAS_W:
                z = z * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                z = z + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = apply_activation(z, ACTIVATION, ACT_PARAM)
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        if STORE_STATS:
            if not IS_RMS:
                tl.store(mean_ptr + row, mean)
            tl.store(rstd_ptr + row, rstd)


@triton.jit
def _dz_with(dy_ptr, x_ptr, r_ptr, w, b, row, cols, mask, mean, rstd, sdm, sdn, sxm, sxn, srm,
             srn, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
             ACT_PARAM: tl.constexpr):
    """(xhat, dz = dy * act'(z), g = dz * w) for one chunk of a row, given the chunk's
    weight ``w`` and bias ``b`` values (1 and 0 when absent); zero outside ``mask``."""
    h = _load_h(x_ptr, r_ptr, row, cols, mask, sxm, sxn, srm, srn, HAS_RESIDUAL)
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    dz = tl.load(dy_ptr + row * sdm + cols * sdn, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        dz = dz * activation_grad(xhat * w + b, ACTIVATION, ACT_PARAM)
    return xhat, dz, dz * w


@triton.jit
def _wb_chunk(w_ptr, b_ptr, cols, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              ACTIVATION: tl.constexpr):
    """The weight and bias values of a chunk (the bias only matters under an activation)."""
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = 0.0
    if HAS_B and ACTIVATION != 0:
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _dz_chunk(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, row, cols, mask, mean, rstd,
              sdm, sdn, sxm, sxn, srm, srn,
              HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr):
    """:func:`_dz_with` loading the chunk's weight and bias."""
    w, b = _wb_chunk(w_ptr, b_ptr, cols, mask, HAS_W, HAS_B, ACTIVATION)
    return _dz_with(dy_ptr, x_ptr, r_ptr, w, b, row, cols, mask, mean, rstd, sdm, sdn, sxm, sxn,
                    srm, srn, HAS_RESIDUAL, ACTIVATION, ACT_PARAM)


@triton.jit
def _bwd_block(dy_ptr, x_ptr, r_ptr, rstd_ptr, mean_ptr, dh_ptr, rb, M, cols, cmask, sdm, sdn,
               sxm, sxn, srm, srn, shm, shn, IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
               HAS_DH: tl.constexpr, BLOCK_M: tl.constexpr):
    """The loads of row block ``rb`` (all masked off past the last block), in the tensors'
    dtypes: converted at their first use, one loop iteration later, so the loads are in flight
    during the previous block's arithmetic. (x, residual, dy, dh, rstd, mean); absent tensors
    are a [1, 1] placeholder (rstd for mean)."""
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxn, mask=mask, other=0.0)
    r = tl.zeros((1, 1), tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * srm + cols[None, :] * srn, mask=mask, other=0.0)
    dy = tl.load(dy_ptr + rows[:, None] * sdm + cols[None, :] * sdn, mask=mask, other=0.0)
    dh = tl.zeros((1, 1), tl.float32)
    if HAS_DH:
        dh = tl.load(dh_ptr + rows[:, None] * shm + cols[None, :] * shn, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    mean = rstd
    if not IS_RMS:
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    return x, r, dy, dh, rstd, mean


@triton.jit
def norm_bwd_kernel(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr,
                    dw_part_ptr, db_part_ptr, dh_ptr,
                    M, N, sdm, sdn, sxm, sxn, srm, srn, shm, shn,
                    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DH: tl.constexpr = False,
                    PREFETCH: tl.constexpr = True):
    """Rows that fit one block: persistent programs take row blocks ``pid, pid + G, ...`` (the
    next one prefetched, :func:`_bwd_block`), write ``dx`` and keep their rows' ``dw``/``db``
    sums in registers, stored once to row
    ``pid`` of ``dw_part``/``db_part`` (the result itself when G == 1). ``HAS_DH``: ``dx``
    also gets ``dh``, the gradient of the stored pre-norm stream (strides ``shm``, ``shn``)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_N)
    pid64 = pid.to(tl.int64)
    part_row = pid64 * N
    cols = offs.to(tl.int64)
    cmask = cols < N
    w = tl.full((BLOCK_N,), 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # PREFETCH (software pipelined): the next row block's loads are issued before this block's
    # arithmetic; off where the second set of tiles would not fit the registers
    if PREFETCH:
        xn, rn, dyn, dhn, rstdn, meann = _bwd_block(dy_ptr, x_ptr, r_ptr, rstd_ptr, mean_ptr,
                                                    dh_ptr, pid64, M, cols, cmask, sdm, sdn, sxm,
                                                    sxn, srm, srn, shm, shn, IS_RMS,
                                                    HAS_RESIDUAL, HAS_DH, BLOCK_M)
    for rb in range(pid64, tl.cdiv(M, BLOCK_M), G):
        if PREFETCH:
            xr, rr, dyr, dhr, rstd, mean = xn, rn, dyn, dhn, rstdn, meann
            xn, rn, dyn, dhn, rstdn, meann = _bwd_block(dy_ptr, x_ptr, r_ptr, rstd_ptr,
                                                        mean_ptr, dh_ptr, rb + G, M, cols,
                                                        cmask, sdm, sdn, sxm, sxn, srm, srn,
                                                        shm, shn, IS_RMS, HAS_RESIDUAL, HAS_DH,
                                                        BLOCK_M)
        else:
            xr, rr, dyr, dhr, rstd, mean = _bwd_block(dy_ptr, x_ptr, r_ptr, rstd_ptr, mean_ptr,
                                                      dh_ptr, rb, M, cols, cmask, sdm, sdn, sxm,
                                                      sxn, srm, srn, shm, shn, IS_RMS,
                                                      HAS_RESIDUAL, HAS_DH, BLOCK_M)
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        h = xr.to(tl.float32)
        if HAS_RESIDUAL:
            h += rr.to(tl.float32)
        if IS_RMS:
            xhat = h * rstd[:, None]
        else:
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        dz = dyr.to(tl.float32)
        if ACTIVATION != 0:
            dz = dz * activation_grad(xhat * w[None, :] + b[None, :], ACTIVATION,
                                      ACT_PARAM)
        g = dz * w[None, :]
        c2 = tl.sum(g * xhat, axis=1) / N
        if IS_RMS:
            dx = (g - xhat * c2[:, None]) * rstd[:, None]
        else:
            c1 = tl.sum(g, axis=1) / N
            dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += dhr.to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        if NEED_DW:
            dw_acc += dz * xhat
        if NEED_DB:
            db_acc += dz
    if NEED_DW:
        tl.store(dw_part_ptr + part_row + cols, tl.sum(dw_acc, axis=0).to(
            dw_part_ptr.dtype.element_ty), mask=cmask)
    if NEED_DB:
        tl.store(db_part_ptr + part_row + cols, tl.sum(db_acc, axis=0).to(
            db_part_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def norm_bwd_row_kernel(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, c_ptr,
                        M, N, sdm, sdn, sxm, sxn, srm, srn,
                        HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        IS_RMS: tl.constexpr, ACTIVATION: tl.constexpr,
                        ACT_PARAM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Wide rows, pass one: the row's two reductions ``c1 = mean(g)``, ``c2 = mean(g * xhat)``
    (``g = dy * act'(z) * w``) into ``c`` (2, M) fp32. One program per row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    a1 = tl.zeros((BLOCK_N,), tl.float32)
    a2 = tl.zeros((BLOCK_N,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = (n0 + offs).to(tl.int64)
        mask = cols < N
        xhat, dz, g = _dz_chunk(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, row, cols, mask, mean, rstd,
                                sdm, sdn, sxm, sxn, srm, srn, HAS_RESIDUAL, HAS_W, HAS_B,
                                ACTIVATION, ACT_PARAM)
        a1 += g
        a2 += g * xhat
    tl.store(c_ptr + row, tl.sum(a1, axis=0) / N)
    tl.store(c_ptr + M + row, tl.sum(a2, axis=0) / N)


@triton.jit
def norm_bwd_col_kernel(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, c_ptr, dx_ptr,
                        dw_ptr, db_ptr, dh_ptr, M, N, sdm, sdn, sxm, sxn, srm, srn, shm, shn,
                        HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        IS_RMS: tl.constexpr, ACTIVATION: tl.constexpr,
                        ACT_PARAM: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                        BLOCK_N: tl.constexpr, HAS_DH: tl.constexpr = False):
    """Wide rows, pass two: program (column block, row group) writes ``dx`` for its columns of
    rows ``group, group + RB, ...`` and keeps their ``dw``/``db`` sums in registers, stored
    once to row ``group`` of ``dw``/``db`` (the result itself when RB == 1, else fp32
    partials reduced by :func:`partial_sum_kernel`): no partial read-modify-write in memory."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    group = tl.program_id(1).to(tl.int64)
    RB = tl.num_programs(1)
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)
    w, b = _wb_chunk(w_ptr, b_ptr, cols, mask, HAS_W, HAS_B, ACTIVATION)  # once per program
    for row in range(group, M, RB):
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat, dz, g = _dz_with(dy_ptr, x_ptr, r_ptr, w, b, row, cols, mask, mean, rstd, sdm, sdn,
                               sxm, sxn, srm, srn, HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
        c2 = tl.load(c_ptr + M + row)
        if IS_RMS:
            dx = (g - xhat * c2) * rstd
        else:
            dx = (g - tl.load(c_ptr + row) - xhat * c2) * rstd
        if HAS_DH:
            dx += tl.load(dh_ptr + row * shm + cols * shn, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += dz * xhat
        if NEED_DB:
            db_acc += dz
    if NEED_DW:
        tl.store(dw_ptr + group * N + cols, dw_acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if NEED_DB:
        tl.store(db_ptr + group * N + cols, db_acc.to(db_ptr.dtype.element_ty), mask=mask)


def _block(N: int, max_block: int | None) -> tuple[int, bool]:
    cap = max_block or MAX_BLOCK
    block = min(next_pow2(N), next_pow2(cap))
    return block, block >= N


def _rows_per_program(M: int, block_n: int, one: bool) -> int:
    """Whole short rows are packed BLOCK_M to a program (a ~4K-element tile; 16K in the
    interpreter, which pays per program)."""
    if not one:
        return 1
    tile = 16384 if interpreter_enabled() else 4096
    return max(1, min(next_pow2(M), tile // block_n))


def _warps(elements: int) -> int:
    return max(1, min(32 if elements > 8192 else 16, elements // 256))


def heuristic_fwd_config(M: int, N: int, max_block: int | None = None) -> dict:
    """Forward config: ``BLOCK_N`` (whole row when N <= MAX_BLOCK, else the loop chunk),
    ``BLOCK_M`` rows per program (1 on the looping path) and ``num_warps``."""
    block, one = _block(N, max_block)
    bm = _rows_per_program(M, block, one)
    return dict(BLOCK_M=bm, BLOCK_N=block, num_warps=_warps(bm * block))


def get_fwd_config(M: int, N: int, dtype: torch.dtype, is_rms: bool) -> dict:
    """Tuned DB entry (``tilefuse.autotune``, family ``layer_norm``) if any, else the heuristic."""
    default = heuristic_fwd_config(M, N)
    try:
        from tilefuse.autotune import lookup
    except ImportError:  # pragma: no cover
        return default
    return lookup("layer_norm", dict(M=M, N=N, dtype=str(dtype).replace("torch.", ""),
                                     rms=bool(is_rms)), default)


_FWD_LAUNCH = launch_cache()


def _fwd_launch(M, N, dtype, is_rms, has_res, has_w, has_b, activation, act_param, stats,
                max_block, config, store_h=False):
    """(grid, constexprs, launch options) of the forward launch for one problem signature."""
    if config is None:
        config = (heuristic_fwd_config(M, N, max_block) if max_block is not None
                  else get_fwd_config(M, N, dtype, is_rms))
    # a stored config is valid for any N of its bucket: clamp to this row and to MAX_BLOCK
    # (FUSED_MAX_BLOCK with a residual or an activation); rows wider than the block loop, one
    # row per program
    cap = max_block or (MAX_BLOCK if not has_res and activation == 0 else FUSED_MAX_BLOCK)
    block = min(int(config["BLOCK_N"]), next_pow2(N), next_pow2(cap))
    one = block >= N
    bm = int(config.get("BLOCK_M", 1)) if one else 1
    warps = int(config.get("num_warps", _warps(bm * block)))
    consts, opts = split_constexprs(norm_fwd_kernel, _FWD_RUNTIME, dict(
        IS_RMS=is_rms, HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
        ACT_PARAM=float(act_param), ONE_BLOCK=one, BLOCK_M=bm, BLOCK_N=block, STORE_STATS=stats,
        STORE_H=store_h, num_warps=warps))
    return (triton.cdiv(M, bm),), consts, opts


_FWD_RUNTIME = norm_fwd_kernel.arg_names.index("IS_RMS")


def launch_norm_fwd(x, residual, weight, bias, y, mean, rstd, eps: float, is_rms: bool,
                    activation: int, act_param: float, max_block: int | None = None,
                    config: dict | None = None, h=None):
    """x, residual: (M, N) any strides; y: (M, N) contiguous; mean/rstd: (M,) fp32, or both
    None (inference: the statistics are not stored). ``h`` ((M, N) contiguous, x's dtype; only
    with a residual): also store the pre-norm sum ``x + residual`` there, and normalize it.

    ``config`` (``BLOCK_M``, ``BLOCK_N``, ``num_warps``) overrides the tuned/heuristic choice;
    ``max_block`` forces the heuristic with that row-block cap. The launch parameters of a
    signature are computed once (:func:`tilefuse.kernels.launch_cache`)."""
    bound = _fwd_bound(x, residual, weight is not None, bias is not None, eps, is_rms,
                       activation, act_param, rstd is not None, h is not None, max_block, config)
    if bound is not None:
        _launch_fwd(bound, x, residual, weight, bias, y, mean, rstd, h)
    return y


def bind_norm_fwd(x, residual, has_w: bool, has_b: bool, eps: float, is_rms: bool,
                  activation: int, act_param: float, stats: bool, store_h: bool = False):
    """``launch(x, residual, weight, bias, y, mean, rstd, h)``: :func:`launch_norm_fwd`'s launch
    for (M, N) inputs with the shapes, strides and dtype of ``x`` and ``residual``, everything
    but the tensors computed here once. The tensors are read through the bound strides, so any
    tensor with the same first element (an N-D ``x`` whose rows are these) may be passed: the
    per-signature plans of :mod:`tilefuse.fused.norm` keep the launch."""
    bound = _fwd_bound(x, residual, has_w, has_b, eps, is_rms, activation, act_param, stats,
                       store_h, None, None)
    if bound is None:
        return _no_launch
    return functools.partial(_launch_fwd, bound)


def _no_launch(x, residual, weight, bias, y, mean, rstd, h):
    pass


def _fwd_bound(x, residual, has_w, has_b, eps, is_rms, activation, act_param, stats, store_h,
               max_block, config):
    """The launch of one forward signature bar its tensors: ``(arguments after the 8 pointers,
    launch keywords)``, or None for no rows."""
    M, N = x.shape
    if M == 0:
        return None
    has_res = residual is not None
    sig = (M, N, x.dtype, is_rms, has_res, has_w, has_b, activation, act_param, stats, store_h)
    launch = _FWD_LAUNCH.get(sig) if max_block is None and config is None else None
    if launch is None:
        launch = _fwd_launch(M, N, x.dtype, is_rms, has_res, has_w, has_b, activation,
                             act_param, stats, max_block, config, store_h)
        if max_block is None and config is None:
            _FWD_LAUNCH[sig] = launch
    grid, consts, opts = launch
    sx0, sx1 = x.stride()
    sr0, sr1 = residual.stride() if has_res else (sx0, sx1)
    return (M, N, sx0, sx1, sr0, sr1, float(eps), *consts), dict(grid=grid, warmup=False, **opts)


def _launch_fwd(bound, x, residual, weight, bias, y, mean, rstd, h):
    args, kw = bound
    norm_fwd_kernel.run(x, x if residual is None else residual, x if weight is None else weight,
                        x if bias is None else bias, y, y if mean is None else mean,
                        y if rstd is None else rstd, y if h is None else h, *args, **kw)


@triton.jit
def partial_sum_kernel(part_ptr, dw_ptr, db_ptr, G, N,
                       NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stage two of the weight/bias gradient: column block ``pid`` of the (2 or 1, G, N) fp32
    partials summed over G in a fixed order (deterministic), written in the parameters' dtype.
    The dw partials come first when both are present."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    if NEED_DW:
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for g in range(0, G):
            acc += tl.load(part_ptr + g * N + cols, mask=mask, other=0.0)
        tl.store(dw_ptr + cols, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    if NEED_DB:
        base = part_ptr + G * N if NEED_DW else part_ptr
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for g in range(0, G):
            acc += tl.load(base + g * N + cols, mask=mask, other=0.0)
        tl.store(db_ptr + cols, acc.to(db_ptr.dtype.element_ty), mask=mask)


def _num_partials(units: int, device: torch.device) -> int:
    """Persistent programs of the narrow backward: ~2 per SM (the interpreter's pseudo-device
    has a few SMs: the same rule, a smaller machine)."""
    return max(1, min(units, 2 * sm_count(device)))


_BWD_LAUNCH = launch_cache()
_BWD_RUNTIME = norm_bwd_kernel.arg_names.index("IS_RMS")
_COL_BLOCK = 256   # wide rows, pass two: columns per program
_RED_BLOCK = 1024  # partial_sum_kernel: columns per program


def _row_groups(M: int, col_blocks: int, device) -> int:
    """Row groups of the wide pass two: enough programs to fill the GPU (~2 per SM), each
    group's dw/db partial row costing 8N bytes against its share of the 6MN-byte stream."""
    return max(1, min(M // 16 or 1, triton.cdiv(2 * sm_count(device), col_blocks)))


PREFETCH_BYTES = 16384  # narrow backward: prefetch the next row block up to this tile size
# (x's bytes; an fp32 8192-wide row prefetched spills at 16 warps' 128 registers on sm_90)


def _bwd_launch(M, N, device, is_rms, has_res, has_w, has_b, activation, act_param, need_dw,
                need_db, max_block, has_dh=False, elsize=2):
    """Launch plan of one backward signature: ("one", G, consts, opts) for rows that fit a
    block, ("wide", row_consts, col_grid, col_consts) for wider rows."""
    block, one = _block(N, max_block or BWD_MAX_BLOCK)
    common = dict(HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
                  ACT_PARAM=float(act_param))
    bm = _rows_per_program(M, block, one)
    G = _num_partials(triton.cdiv(M, bm), device)
    # rows in registers, unless few rows would make the (G, N) fp32 partials a real share of
    # the traffic (8 bytes a partial element against ~6 per row element): then the column pass
    if one and (G == 1 or 32 * G <= M):
        consts, opts = split_constexprs(norm_bwd_kernel, _BWD_RUNTIME, dict(
            IS_RMS=is_rms, **common, NEED_DW=need_dw, NEED_DB=need_db, BLOCK_M=bm,
            BLOCK_N=block, HAS_DH=has_dh, PREFETCH=bm * block * elsize <= PREFETCH_BYTES,
            num_warps=_warps(bm * block)))
        return "one", G, consts, opts
    row_block = min(block, ROW_CHUNK)
    row = dict(common, IS_RMS=is_rms, BLOCK_N=row_block, num_warps=_warps(row_block))
    col_block = min(_COL_BLOCK, block)
    col_blocks = triton.cdiv(N, col_block)
    groups = _row_groups(M, col_blocks, device)
    col = dict(common, IS_RMS=is_rms, NEED_DW=need_dw, NEED_DB=need_db, BLOCK_N=col_block,
               HAS_DH=has_dh, num_warps=_warps(col_block))
    return "wide", groups, row, (col_blocks, groups), col


def _reduce(part, n_part, G, N, weight, bias, need_dw, need_db):
    """dw/db in the parameters' dtypes from (n_part, G, N) fp32 partials (one launch)."""
    dw = torch.empty(N, device=part.device, dtype=weight.dtype) if need_dw else None
    db = torch.empty(N, device=part.device, dtype=bias.dtype) if need_db else None
    partial_sum_kernel[(triton.cdiv(N, _RED_BLOCK),)](
        part, dw if need_dw else part, db if need_db else part, G, N,
        NEED_DW=need_dw, NEED_DB=need_db, BLOCK_N=_RED_BLOCK)
    return dw, db


def _outputs(G, N, x, weight, bias, need_dw, need_db):
    """(part, n_part, dw_arg, db_arg): with one partial row (G == 1) the kernels write dw/db
    in the parameters' dtypes directly; otherwise into (n_part, G, N) fp32 partials."""
    n_part = int(need_dw) + int(need_db)
    if G == 1:
        dw = torch.empty(N, device=x.device, dtype=weight.dtype) if need_dw else None
        db = torch.empty(N, device=x.device, dtype=bias.dtype) if need_db else None
        return None, n_part, dw, db
    part = torch.empty(n_part, G, N, device=x.device, dtype=torch.float32) if n_part else None
    return part, n_part, (part if need_dw else None), (part[n_part - 1] if need_db else None)


def launch_norm_bwd(dy, x, residual, weight, bias, mean, rstd, dx, is_rms: bool,
                    activation: int, act_param: float, need_dw: bool, need_db: bool,
                    max_block: int | None = None, dh=None):
    """Writes dx (M, N contiguous; plus ``dh`` when given: the gradient of the stored pre-norm
    stream, any strides); returns (dw, db) reduced over rows in the dtypes of
    ``weight`` and ``bias`` (or None where not needed). At most three launches: the row
    kernel (wide rows: the row-statistics and column passes), then the fixed-order reduction
    of the partial rows when there is more than one (deterministic, no atomics)."""
    M, N = x.shape
    if M == 0:
        return (torch.zeros(N, device=x.device, dtype=weight.dtype) if need_dw else None,
                torch.zeros(N, device=x.device, dtype=bias.dtype) if need_db else None)
    has_res = residual is not None
    sig = (M, N, x.device, is_rms, has_res, weight is not None, bias is not None, activation,
           act_param, need_dw, need_db, max_block, dh is not None, x.element_size())
    plan = _BWD_LAUNCH.get(sig)
    if plan is None:
        plan = _BWD_LAUNCH[sig] = _bwd_launch(*sig)
    res = residual if has_res else x
    sx0, sx1 = x.stride()
    strides = (dy.stride(0), dy.stride(1), sx0, sx1) + (res.stride() if has_res else (sx0, sx1))
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    mean_arg = mean if mean is not None else rstd
    G = plan[1]
    part, n_part, dw_arg, db_arg = _outputs(G, N, x, weight, bias, need_dw, need_db)
    dh_args = (dh, *dh.stride()) if dh is not None else (dx, 0, 0)
    if plan[0] == "one":
        _, _, consts, opts = plan
        norm_bwd_kernel[(G,)](dy, x, res, w_arg, b_arg, mean_arg, rstd, dx,
                              dw_arg if need_dw else rstd, db_arg if need_db else rstd,
                              dh_args[0], M, N, *strides, *dh_args[1:], *consts, **opts)
    else:
        _, _, row, col_grid, col = plan
        c = torch.empty(2, M, device=x.device, dtype=torch.float32)
        norm_bwd_row_kernel[(M,)](dy, x, res, w_arg, b_arg, mean_arg, rstd, c, M, N, *strides,
                                  **row)
        norm_bwd_col_kernel[col_grid](dy, x, res, w_arg, b_arg, mean_arg, rstd, c, dx,
                                      dw_arg if need_dw else rstd, db_arg if need_db else rstd,
                                      dh_args[0], M, N, *strides, *dh_args[1:], **col)
    if part is None:
        return dw_arg, db_arg
    return _reduce(part, n_part, G, N, weight, bias, need_dw, need_db)

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

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, split_constexprs
from tilefuse.kernels.activations import activation_grad, apply_activation

MAX_BLOCK = 8192  # widest row kept in registers; wider rows loop


@triton.jit
def _load_h(x_ptr, r_ptr, row, cols, mask, sxm, sxn, srm, srn, HAS_RESIDUAL: tl.constexpr):
    h = tl.load(x_ptr + row * sxm + cols * sxn, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(r_ptr + row * srm + cols * srn, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def norm_fwd_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                    M, N, sxm, sxn, srm, srn, eps,
                    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                    ONE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    STORE_STATS: tl.constexpr):
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
        mean = 0.0
        if not IS_RMS:
            acc = tl.zeros((BLOCK_N,), tl.float32)
            for n0 in range(0, N, BLOCK_N):
                cols = (n0 + offs).to(tl.int64)
                acc += _load_h(x_ptr, r_ptr, row, cols, cols < N, sxm, sxn, srm, srn,
                               HAS_RESIDUAL)
            mean = tl.sum(acc, axis=0) / N
        acc2 = tl.zeros((BLOCK_N,), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = (n0 + offs).to(tl.int64)
            mask = cols < N
            h = _load_h(x_ptr, r_ptr, row, cols, mask, sxm, sxn, srm, srn, HAS_RESIDUAL)
            hc = tl.where(mask, h - mean, 0.0)
            acc2 += hc * hc
        rstd = 1.0 / tl.sqrt(tl.sum(acc2, axis=0) / N + eps)
        for n0 in range(0, N, BLOCK_N):
            cols = (n0 + offs).to(tl.int64)
            mask = cols < N
            h = _load_h(x_ptr, r_ptr, row, cols, mask, sxm, sxn, srm, srn, HAS_RESIDUAL)
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
def _dz_chunk(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, row, cols, mask, mean, rstd,
              sdm, sdn, sxm, sxn, srm, srn,
              HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr):
    """(xhat, dz = dy * act'(z), g = dz * w) for one chunk of a row; zero outside ``mask``."""
    h = _load_h(x_ptr, r_ptr, row, cols, mask, sxm, sxn, srm, srn, HAS_RESIDUAL)
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    dz = tl.load(dy_ptr + row * sdm + cols * sdn, mask=mask, other=0.0).to(tl.float32)
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        z = xhat * w
        if HAS_B:
            z += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dz = dz * activation_grad(z, ACTIVATION, ACT_PARAM)
    return xhat, dz, dz * w


@triton.jit
def norm_bwd_kernel(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr,
                    dw_part_ptr, db_part_ptr,
                    M, N, sdm, sdn, sxm, sxn, srm, srn,
                    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                    ONE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_N)
    pid64 = pid.to(tl.int64)
    part_row = pid64 * N
    if ONE_BLOCK:
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
        for rb in range(pid64, tl.cdiv(M, BLOCK_M), G):
            rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            h = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :] * sxn, mask=mask,
                        other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                h += tl.load(r_ptr + rows[:, None] * srm + cols[None, :] * srn, mask=mask,
                             other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            if IS_RMS:
                xhat = h * rstd[:, None]
            else:
                mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
                xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
            dz = tl.load(dy_ptr + rows[:, None] * sdm + cols[None, :] * sdn, mask=mask,
                         other=0.0).to(tl.float32)
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
            tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)
            if NEED_DW:
                dw_acc += dz * xhat
            if NEED_DB:
                db_acc += dz
        if NEED_DW:
            tl.store(dw_part_ptr + part_row + cols, tl.sum(dw_acc, axis=0), mask=cmask)
        if NEED_DB:
            tl.store(db_part_ptr + part_row + cols, tl.sum(db_acc, axis=0), mask=cmask)
    else:
        # wide rows: partials live in this program's own row of the (G, N) buffers (zeroed by
        # the launcher), so the read-modify-write below is race-free and deterministic
        for row in range(pid64, M, G):  # int64 row index
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            a1 = tl.zeros((BLOCK_N,), tl.float32)
            a2 = tl.zeros((BLOCK_N,), tl.float32)
            for n0 in range(0, N, BLOCK_N):
                cols = (n0 + offs).to(tl.int64)
                mask = cols < N
                xhat, dz, g = _dz_chunk(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, row, cols, mask,
                                        mean, rstd, sdm, sdn, sxm, sxn, srm, srn, HAS_RESIDUAL,
                                        HAS_W, HAS_B, ACTIVATION, ACT_PARAM)
                a1 += g
                a2 += g * xhat
            c1 = tl.sum(a1, axis=0) / N
            c2 = tl.sum(a2, axis=0) / N
            for n0 in range(0, N, BLOCK_N):
                cols = (n0 + offs).to(tl.int64)
                mask = cols < N
                xhat, dz, g = _dz_chunk(dy_ptr, x_ptr, r_ptr, w_ptr, b_ptr, row, cols, mask,
                                        mean, rstd, sdm, sdn, sxm, sxn, srm, srn, HAS_RESIDUAL,
                                        HAS_W, HAS_B, ACTIVATION, ACT_PARAM)
                if IS_RMS:
                    dx = (g - xhat * c2) * rstd
                else:
                    dx = (g - c1 - xhat * c2) * rstd
                tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                if NEED_DW:
                    p = dw_part_ptr + part_row + cols
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dz * xhat, mask=mask)
                if NEED_DB:
                    p = db_part_ptr + part_row + cols
                    tl.store(p, tl.load(p, mask=mask, other=0.0) + dz, mask=mask)


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
    return max(1, min(16, elements // 256))


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
                max_block, config):
    """(grid, constexprs, launch options) of the forward launch for one problem signature."""
    if config is None:
        config = (heuristic_fwd_config(M, N, max_block) if max_block is not None
                  else get_fwd_config(M, N, dtype, is_rms))
    # a stored config is valid for any N of its bucket: clamp to this row and to MAX_BLOCK;
    # rows wider than the block loop, one row per program
    block = min(int(config["BLOCK_N"]), next_pow2(N), next_pow2(max_block or MAX_BLOCK))
    one = block >= N
    bm = int(config.get("BLOCK_M", 1)) if one else 1
    warps = int(config.get("num_warps", _warps(bm * block)))
    consts, opts = split_constexprs(norm_fwd_kernel, _FWD_RUNTIME, dict(
        IS_RMS=is_rms, HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
        ACT_PARAM=float(act_param), ONE_BLOCK=one, BLOCK_M=bm, BLOCK_N=block, STORE_STATS=stats,
        num_warps=warps))
    return (triton.cdiv(M, bm),), consts, opts


_FWD_RUNTIME = norm_fwd_kernel.arg_names.index("IS_RMS")


def launch_norm_fwd(x, residual, weight, bias, y, mean, rstd, eps: float, is_rms: bool,
                    activation: int, act_param: float, max_block: int | None = None,
                    config: dict | None = None):
    """x, residual: (M, N) any strides; y: (M, N) contiguous; mean/rstd: (M,) fp32, or both
    None (inference: the statistics are not stored).

    ``config`` (``BLOCK_M``, ``BLOCK_N``, ``num_warps``) overrides the tuned/heuristic choice;
    ``max_block`` forces the heuristic with that row-block cap. The launch parameters of a
    signature are computed once (:func:`tilefuse.kernels.launch_cache`)."""
    M, N = x.shape
    if M == 0:
        return y
    has_res = residual is not None
    sig = (M, N, x.dtype, is_rms, has_res, weight is not None, bias is not None, activation,
           act_param, rstd is not None)
    launch = _FWD_LAUNCH.get(sig) if max_block is None and config is None else None
    if launch is None:
        launch = _fwd_launch(M, N, x.dtype, is_rms, has_res, sig[5], sig[6], activation,
                             act_param, sig[9], max_block, config)
        if max_block is None and config is None:
            _FWD_LAUNCH[sig] = launch
    grid, consts, opts = launch
    res = residual if has_res else x
    sx0, sx1 = x.stride()
    sr0, sr1 = res.stride() if has_res else (sx0, sx1)
    norm_fwd_kernel[grid](
        x, res, weight if weight is not None else x, bias if bias is not None else x,
        y, mean if mean is not None else y, rstd if rstd is not None else y,
        M, N, sx0, sx1, sr0, sr1, float(eps), *consts, **opts)
    return y


def _num_partials(units: int, device: torch.device) -> int:
    if interpreter_enabled() or device.type != "cuda":
        return max(1, min(units, 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(units, 2 * sms))


def launch_norm_bwd(dy, x, residual, weight, bias, mean, rstd, dx, is_rms: bool,
                    activation: int, act_param: float, need_dw: bool, need_db: bool,
                    max_block: int | None = None):
    """Writes dx (M, N contiguous); returns fp32 (dw, db) reduced over rows (or None)."""
    M, N = x.shape
    block, one = _block(N, max_block)
    bm = _rows_per_program(M, block, one)
    G = _num_partials(triton.cdiv(M, bm), x.device)
    alloc = torch.empty if one else torch.zeros
    dw_part = alloc((G, N), device=x.device, dtype=torch.float32) if need_dw else None
    db_part = alloc((G, N), device=x.device, dtype=torch.float32) if need_db else None
    if M > 0:
        res = residual if residual is not None else x
        norm_bwd_kernel[(G,)](
            dy, x, res, weight if weight is not None else x, bias if bias is not None else x,
            mean if mean is not None else rstd, rstd, dx,
            dw_part if need_dw else rstd, db_part if need_db else rstd,
            M, N, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            res.stride(0), res.stride(1),
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, ACTIVATION=activation, ACT_PARAM=float(act_param),
            NEED_DW=need_dw, NEED_DB=need_db, ONE_BLOCK=one, BLOCK_M=bm, BLOCK_N=block,
            num_warps=_warps(bm * block))
    else:
        if dw_part is not None:
            dw_part.zero_()
        if db_part is not None:
            db_part.zero_()
    # stage two: a fixed-order reduction of G partial rows (deterministic)
    dw = dw_part.sum(0) if need_dw else None
    db = db_part.sum(0) if need_db else None
    return dw, db

"""GroupNorm (and InstanceNorm: ``num_groups == C``) with a fused activation.

The input is viewed as ``(N, C, S)`` with arbitrary strides, ``S`` the flattened spatial dims:
contiguous NCHW has strides ``(C*S, S, 1)``, channels_last ``(S*C, 1, C)``; both are read in place.
One program normalises one ``(n, group)`` slab, walking it in ``[BLOCK_C, BLOCK_S]`` tiles:
pass 1 the mean, pass 2 the mean squared deviation (two-pass fp32: stable for large means),
pass 3 ``y = act(xhat * w[c] + b[c])``, written with the strides of ``y`` (same memory format).

Backward, same grid: pass 1 reduces ``sum(g)`` and ``sum(g * xhat)`` (``g = dy * act'(z) * w``)
and writes per-``(n, c)`` partials of ``dw``/``db``; pass 2 writes ``dx``. The caller sums the
``(N, C)`` partials over ``n`` (a deterministic two-stage reduction, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse.kernels import launch_cache, next_pow2, split_constexprs
from tilefuse.kernels.activations import activation_grad, apply_activation

TILE = 4096  # elements per [BLOCK_C, BLOCK_S] tile


@triton.jit
def group_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                          C, S, G, Cg, sxn, sxc, sxs, syn, syc, sys_, eps,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // G
    c_first = (pid % G) * Cg
    x_base = x_ptr + n * sxn + c_first * sxc
    y_base = y_ptr + n * syn + c_first * syc
    count = Cg * S
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        for s0 in range(0, S, BLOCK_S):
            c = (c0 + offs_c).to(tl.int64)
            s = (s0 + offs_s).to(tl.int64)
            mask = (c < Cg)[:, None] & (s < S)[None, :]
            acc += tl.load(x_base + c[:, None] * sxc + s[None, :] * sxs, mask=mask,
                           other=0.0).to(tl.float32)
    mean = tl.sum(acc) / count
    acc = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        for s0 in range(0, S, BLOCK_S):
            c = (c0 + offs_c).to(tl.int64)
            s = (s0 + offs_s).to(tl.int64)
            mask = (c < Cg)[:, None] & (s < S)[None, :]
            x = tl.load(x_base + c[:, None] * sxc + s[None, :] * sxs, mask=mask,
                        other=0.0).to(tl.float32)
            d = tl.where(mask, x - mean, 0.0)
            acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc) / count + eps)
    for c0 in range(0, Cg, BLOCK_C):
        c = (c0 + offs_c).to(tl.int64)
        w = tl.full((BLOCK_C,), 1.0, tl.float32)
        b = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + c_first + c, mask=c < Cg, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(b_ptr + c_first + c, mask=c < Cg, other=0.0).to(tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = (s0 + offs_s).to(tl.int64)
            mask = (c < Cg)[:, None] & (s < S)[None, :]
            x = tl.load(x_base + c[:, None] * sxc + s[None, :] * sxs, mask=mask,
                        other=0.0).to(tl.float32)
            z = (x - mean) * rstd * w[:, None] + b[:, None]
            y = z
            if ACTIVATION != 0:  # (skipping the call keeps the interpreter fast)
                y = apply_activation(z, ACTIVATION, ACT_PARAM)
            tl.store(y_base + c[:, None] * syc + s[None, :] * sys_,
                     y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)


@triton.jit
def group_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr,
                          dw_part_ptr, db_part_ptr,
                          C, S, G, Cg, sdn, sdc, sds, sxn, sxc, sxs, son, soc, sos,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
                          NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // G
    c_first = (pid % G) * Cg
    x_base = x_ptr + n * sxn + c_first * sxc
    dy_base = dy_ptr + n * sdn + c_first * sdc
    dx_base = dx_ptr + n * son + c_first * soc
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    count = Cg * S
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    a1 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    a2 = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
    for phase in tl.static_range(2):
        if phase == 1:
            c1 = tl.sum(a1) / count
            c2 = tl.sum(a2) / count
        for c0 in range(0, Cg, BLOCK_C):
            c = (c0 + offs_c).to(tl.int64)
            w = tl.full((BLOCK_C,), 1.0, tl.float32)
            b = tl.zeros((BLOCK_C,), tl.float32)
            if HAS_W:
                w = tl.load(w_ptr + c_first + c, mask=c < Cg, other=0.0).to(tl.float32)
            if HAS_B:
                b = tl.load(b_ptr + c_first + c, mask=c < Cg, other=0.0).to(tl.float32)
            pw = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
            pb = tl.zeros((BLOCK_C, BLOCK_S), tl.float32)
            for s0 in range(0, S, BLOCK_S):
                s = (s0 + offs_s).to(tl.int64)
                mask = (c < Cg)[:, None] & (s < S)[None, :]
                x = tl.load(x_base + c[:, None] * sxc + s[None, :] * sxs, mask=mask,
                            other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                dz = tl.load(dy_base + c[:, None] * sdc + s[None, :] * sds, mask=mask,
                             other=0.0).to(tl.float32)
                if ACTIVATION != 0:
                    dz = dz * activation_grad(xhat * w[:, None] + b[:, None], ACTIVATION,
                                              ACT_PARAM)
                    dz = tl.where(mask, dz, 0.0)
                g = dz * w[:, None]
                if phase == 0:
                    a1 += g
                    a2 += g * xhat
                    pw += dz * xhat
                    pb += dz
                else:
                    dx = (g - c1 - xhat * c2) * rstd
                    tl.store(dx_base + c[:, None] * soc + s[None, :] * sos,
                             dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if phase == 0:
                part = n * C + c_first + c
                if NEED_DW:
                    tl.store(dw_part_ptr + part, tl.sum(pw, axis=1), mask=c < Cg)
                if NEED_DB:
                    tl.store(db_part_ptr + part, tl.sum(pb, axis=1), mask=c < Cg)


def _blocks(Cg: int, S: int) -> tuple[int, int]:
    block_s = min(next_pow2(S), TILE)
    block_c = min(next_pow2(Cg), max(1, TILE // block_s))
    return block_c, block_s


_FWD_LAUNCH = launch_cache()
_BWD_LAUNCH = launch_cache()
_FWD_RUNTIME = group_norm_fwd_kernel.arg_names.index("HAS_W")
_BWD_RUNTIME = group_norm_bwd_kernel.arg_names.index("HAS_W")


def _launch(kernel, n_runtime, N, C, S, num_groups, **constexprs):
    """(grid, Cg, constexprs, options) of one launch signature."""
    Cg = C // num_groups
    bc, bs = _blocks(Cg, S)
    consts, opts = split_constexprs(kernel, n_runtime, dict(
        constexprs, BLOCK_C=bc, BLOCK_S=bs, num_warps=4))
    return (N * num_groups,), Cg, consts, opts


def launch_group_norm_fwd(x, weight, bias, y, mean, rstd, num_groups: int, eps: float,
                          activation: int, act_param: float):
    """x, y: (N, C, S) any strides; mean/rstd: (N * num_groups,) fp32. Launch parameters are
    computed once per signature (:func:`tilefuse.kernels.launch_cache`)."""
    N, C, S = x.shape
    if N == 0:
        return y
    sig = (N, C, S, num_groups, weight is not None, bias is not None, activation, act_param)
    launch = _FWD_LAUNCH.get(sig)
    if launch is None:
        launch = _FWD_LAUNCH[sig] = _launch(
            group_norm_fwd_kernel, _FWD_RUNTIME, N, C, S, num_groups, HAS_W=sig[4],
            HAS_B=sig[5], ACTIVATION=activation, ACT_PARAM=float(act_param))
    grid, Cg, consts, opts = launch
    group_norm_fwd_kernel[grid](
        x, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
        C, S, num_groups, Cg, *x.stride(), *y.stride(), float(eps), *consts, **opts)
    return y


def launch_group_norm_bwd(dy, x, weight, bias, mean, rstd, dx, num_groups: int,
                          activation: int, act_param: float, need_dw: bool, need_db: bool):
    """Writes dx (strided like x's output layout); returns fp32 (dw, db) over C, or None."""
    N, C, S = x.shape
    dw_part = torch.empty((N, C), device=x.device, dtype=torch.float32) if need_dw else None
    db_part = torch.empty((N, C), device=x.device, dtype=torch.float32) if need_db else None
    if N > 0:
        sig = (N, C, S, num_groups, weight is not None, bias is not None, activation, act_param,
               need_dw, need_db)
        launch = _BWD_LAUNCH.get(sig)
        if launch is None:
            launch = _BWD_LAUNCH[sig] = _launch(
                group_norm_bwd_kernel, _BWD_RUNTIME, N, C, S, num_groups, HAS_W=sig[4],
                HAS_B=sig[5], ACTIVATION=activation, ACT_PARAM=float(act_param),
                NEED_DW=need_dw, NEED_DB=need_db)
        grid, Cg, consts, opts = launch
        group_norm_bwd_kernel[grid](
            dy, x, weight if weight is not None else x, bias if bias is not None else x,
            mean, rstd, dx, dw_part if need_dw else rstd, db_part if need_db else rstd,
            C, S, num_groups, Cg, *dy.stride(), *x.stride(), *dx.stride(), *consts, **opts)
    dw = dw_part.sum(0) if need_dw else None
    db = db_part.sum(0) if need_db else None
    return dw, db

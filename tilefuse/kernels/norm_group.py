"""GroupNorm (and InstanceNorm: ``num_groups == C``) with a fused activation.

The input is viewed as ``(N, C, S)`` with arbitrary strides, ``S`` the flattened spatial dims:
contiguous NCHW has strides ``(C*S, S, 1)``, channels_last ``(S*C, 1, C)``; both are read in place
and the output is written with the strides of ``y`` (same memory format). Channels-innermost
inputs (``stride(1) == 1``) take the kernels of :mod:`tilefuse.kernels.norm_group_cl_jit`
(``[64-channel, BLOCK_S]`` tiles, per-channel partials merged per group; three launches each
way, see there). Otherwise a group is a ``[Cg, S]`` slab walked in ``[BLOCK_C, BLOCK_S]`` tiles
(a 2-D walk: no per-element division):

Forward of a small group (:func:`small_group`: ``Cg x S`` fits one tile of ``SMALL_TILE``
elements, any layout), one launch: :func:`gn_apply_kernel` with ``FUSED``, one program per
``(n, group)`` computing the statistics of the tile it holds (as the statistics kernel does for
one slice) and writing ``y`` from it. Otherwise, two launches:

* :func:`gn_stats_kernel`, grid ``(N * G, SPLIT)``: ``SPLIT`` slices of ``S`` per group, sized so
  the grid has about 4 programs per SM (:func:`tilefuse.kernels.sm_count`; a small pseudo-device
  in the interpreter, so the same rule runs there; slices shrink to ``MIN_S`` positions when the
  groups are few: batch 1): each program computes, in fp32, the local mean
  of ``x - K`` (``K`` the group's first value: exact near the mean) and the local sum of squared
  deviations (two passes over a slice small enough to stay in cache);
* :func:`gn_apply_kernel`, grid ``(N * G, S blocks)``, the wide pass: every program merges its
  group's ``SPLIT`` partials with Chan's formula in a fixed order (the same bits in every
  program; the first one stores mean/rstd for the backward) and writes
  ``y = act(xhat * w[c] + b[c])``.

Backward, three launches: :func:`gn_bwd_reduce_kernel` (same grid as the statistics) writes per
slice the group sums of ``g = dz * w`` and ``g * xhat`` (``dz = dy * act'(z)``) and per-channel
partials of ``dw``/``db``; :func:`gn_bwd_apply_kernel` (the wide grid) merges the group sums and
writes ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``; :func:`gn_param_grad_kernel` sums
the ``(N * SPLIT, C)`` parameter partials in a fixed order into ``dw``/``db`` in the parameters'
dtype. No atomics. InstanceNorm's running statistics: :func:`launch_instance_running`.
"""
from __future__ import annotations

import torch
import triton

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, sm_count, split_constexprs
from tilefuse.kernels.norm_group_cl_jit import (  # noqa: F401  (channels_last kernels)
    gn_cl_stats_kernel, gn_cl_merge_kernel, gn_cl_apply_kernel, gn_cl_bwd_reduce_kernel,
    gn_cl_bwd_apply_kernel)
from tilefuse.kernels.norm_group_jit import (  # noqa: F401  (the kernels, launched here)
    gn_stats_kernel, gn_apply_kernel, gn_bwd_reduce_kernel, gn_bwd_apply_kernel,
    gn_param_grad_kernel, instance_running_kernel)

TILE = 4096         # elements per [BLOCK_C, BLOCK_S] tile on a GPU
INTERP_TILE = 16384  # the interpreter pays per program (tests shrink it)
MIN_S = 512         # NCHW statistics slices at batch 1: at least this many positions per row
SMALL_TILE = 4096   # a group of at most this many elements (padded): a one-launch forward
CL_BLOCK_C = 64     # channels_last: channels per tile (128 contiguous bytes of bf16)
CL_SLICE_BYTES = 160  # channels_last: input bytes per channel per slice at least (the 8 bytes
                      # of per-channel partials then add at most 5% to the traffic)


def _blocks(Cg: int, S: int, tile: int) -> tuple[int, int]:
    block_s = min(next_pow2(S), tile)
    block_c = min(next_pow2(Cg), max(1, tile // block_s))
    return block_c, block_s


def _cl_stats(x, G: int) -> bool:
    """Whether the channels-innermost kernels (:mod:`tilefuse.kernels.norm_group_cl_jit`) serve
    this ``(N, C, S)`` input (``G`` is not needed: any grouping)."""
    N, C, S = x.shape
    return S > 1 and C > 1 and x.stride(1) == 1


def _geometry(N: int, C: int, S: int, G: int, device, cl: bool = False,
              elsize: int = 4, bwd: bool = False) -> tuple:
    """(statistics blocks, SPLIT, S_PER, apply blocks, apply S blocks).

    NCHW: SPLIT slices of S (a multiple of BLOCK_S each) so that the (N * G, SPLIT) statistics
    grid has about 4 programs per SM (the slices shrink to ``MIN_S`` positions for that: batch 1
    with 32 groups); the apply pass takes [BLOCK_C, BLOCK_S] tiles of TILE elements over
    (N * G, runs of S), looping over the group's channels.
    channels_last: [CL_BLOCK_C, BLOCK_S] tiles of consecutive channels; the statistics grid
    (N, SPLIT, C blocks) with about 4 programs per SM, at most one slice per ``CL_SLICE_BYTES``
    of a channel's input; the apply grid (N * S blocks, C blocks). ``bwd``: the NCHW reduction
    (four accumulator tiles) takes tiles of TILE / 2 elements (no register spills on sm_90)."""
    Cg = C // G
    tile = INTERP_TILE if interpreter_enabled() else TILE
    sms = sm_count(device)
    if cl:
        bc = min(next_pow2(C), CL_BLOCK_C)
        bs = max(1, min(next_pow2(S), tile // bc))
        want = triton.cdiv(4 * sms, N * triton.cdiv(C, bc))
        split = max(1, min(want, S * elsize // CL_SLICE_BYTES, S))
        s_per = triton.cdiv(S, split)
        return ((bc, min(bs, next_pow2(s_per))), triton.cdiv(S, s_per), s_per, (bc, bs),
                triton.cdiv(S, bs))
    stile = tile // 2 if bwd else tile
    sbc, sbs = _blocks(Cg, S, stile)
    want = max(1, triton.cdiv(4 * sms, N * G))
    if triton.cdiv(S, sbs) < want:  # few groups: shorter slices, more of them
        sbs = min(sbs, max(MIN_S, next_pow2(triton.cdiv(S, want))))
        sbc = min(next_pow2(Cg), max(1, stile // sbs))
    split = max(1, min(want, triton.cdiv(S, sbs)))
    s_per = triton.cdiv(triton.cdiv(S, split), sbs) * sbs
    split = triton.cdiv(S, s_per)
    # the wide pass: runs of S short enough that the grid has about 4 programs per SM
    runs = triton.cdiv(4 * sms, N * G)
    abs_ = min(next_pow2(S), tile, max(128, next_pow2(triton.cdiv(S, runs))))
    abc = min(next_pow2(Cg), max(1, tile // abs_))
    return (sbc, sbs), split, s_per, (abc, abs_), triton.cdiv(S, abs_)


_FWD_BOUND = launch_cache()
_BWD_LAUNCH = launch_cache()
_APPLY_RUNTIME = gn_apply_kernel.arg_names.index("HAS_W")
_BWD_REDUCE_RUNTIME = gn_bwd_reduce_kernel.arg_names.index("HAS_W")
_BWD_APPLY_RUNTIME = gn_bwd_apply_kernel.arg_names.index("HAS_W")


def small_group(Cg: int, S: int) -> bool:
    """Whether a group (``Cg`` channels x ``S`` positions, padded to powers of two) fits one
    ``[BLOCK_C, BLOCK_S]`` tile of ``SMALL_TILE`` elements: the forward is then one launch,
    one program per ``(n, group)`` (statistics in registers). By shape only: the GPU and the
    interpreter take the same path."""
    return next_pow2(Cg) * next_pow2(S) <= SMALL_TILE


def _noop(*args):
    return None


def launch_group_norm_fwd(x, weight, bias, y, mean, rstd, num_groups: int, eps: float,
                          activation: int, act_param: float):
    """x, y: (N, C, S) any strides; mean/rstd: (N * num_groups,) fp32 (written when given; None
    when no backward will need them). One launch for small groups (:func:`small_group`), else
    two (channels_last: three); the launch is bound once per signature
    (:func:`bind_group_norm_fwd`)."""
    sig = (x.shape, x.stride(), y.stride(), x.dtype, x.device, num_groups, eps,
           weight is not None, bias is not None, activation, act_param, mean is not None)
    launch = _FWD_BOUND.get(sig)
    if launch is None:
        launch = _FWD_BOUND[sig] = bind_group_norm_fwd(x, y.stride(), num_groups, eps, *sig[7:])
    launch(x, weight, bias, y, mean, rstd)
    return y


def bind_group_norm_fwd(x, y_stride, G: int, eps: float, has_w: bool, has_b: bool,
                        activation: int, act_param: float, store: bool):
    """``launch(x, weight, bias, y, mean, rstd)`` for inputs with the (N, C, S) shape, strides,
    dtype and device of ``x`` and outputs ``y`` with strides ``y_stride``: grids, constexprs,
    strides and scalar arguments computed here, once; a call allocates the partials and
    launches (the per-call path and the per-signature plans of :mod:`tilefuse.fused.norm_group`
    share it: the same launches, the same bits). ``x`` and ``y`` may be passed as any view of
    the same memory (the strides are bound). ``store``: mean/rstd are given and written."""
    N, C, S = x.shape
    if N == 0:
        return _noop
    sx, NG, Cg = tuple(x.stride()), N * G, C // G
    if small_group(Cg, S):
        bc, bs = next_pow2(Cg), next_pow2(S)
        consts, opts = split_constexprs(gn_apply_kernel, _APPLY_RUNTIME, dict(
            HAS_W=has_w, HAS_B=has_b, STORE_STATS=store, FUSED=True, ACTIVATION=activation,
            ACT_PARAM=float(act_param), BLOCK_C=bc, BLOCK_S=bs,
            num_warps=max(1, min(8, bc * bs // 512))))
        args = (S, G, Cg, S, 1, *sx, *y_stride, float(eps), *consts)
        grid = (NG, 1)

        def launch(x, weight, bias, y, mean, rstd):
            gn_apply_kernel.run(x, x if weight is None else weight, x if bias is None else bias,
                                y, x, x, x if mean is None else mean, x if rstd is None else rstd,
                                *args, grid=grid, warmup=False, **opts)
        return launch
    if _cl_stats(x, G):
        return _bind_cl_fwd(x, y_stride, G, eps, has_w, has_b, activation, act_param)
    (sbc, sbs), split, s_per, (abc, abs_), sblocks = _geometry(N, C, S, G, x.device)
    consts, opts = split_constexprs(gn_apply_kernel, _APPLY_RUNTIME, dict(
        HAS_W=has_w, HAS_B=has_b, STORE_STATS=store, FUSED=False, ACTIVATION=activation,
        ACT_PARAM=float(act_param), BLOCK_C=abc, BLOCK_S=abs_, num_warps=4))
    warps = max(1, min(8, sbc * sbs // 512))  # 8 for 4K tiles: no spill on sm_90 (bf16)
    sopts = dict(BLOCK_C=sbc, BLOCK_S=sbs, num_warps=warps)
    sargs = (S, G, Cg, s_per, split, *sx)
    aargs = (S, G, Cg, s_per, split, *sx, *y_stride, float(eps), *consts)
    sgrid, agrid, parts = (NG, split), (NG, sblocks), NG * split
    f32 = torch.float32

    def launch(x, weight, bias, y, mean, rstd):
        pmean = x.new_empty(parts, dtype=f32)
        pm2 = x.new_empty(parts, dtype=f32)
        gn_stats_kernel.run(x, pmean, pm2, *sargs, grid=sgrid, warmup=False, **sopts)
        gn_apply_kernel.run(x, x if weight is None else weight, x if bias is None else bias, y,
                            pmean, pm2, pmean if mean is None else mean,
                            pmean if rstd is None else rstd, *aargs, grid=agrid, warmup=False,
                            **opts)
    return launch


def launch_group_norm_bwd(dy, x, weight, bias, mean, rstd, dx, num_groups: int,
                          activation: int, act_param: float, need_dw: bool, need_db: bool):
    """Writes dx (strided like x's output layout); returns (dw, db) over C in the parameters'
    dtype (None where not needed). At most three launches."""
    N, C, S = x.shape
    dw = torch.empty(C, device=x.device, dtype=weight.dtype) if need_dw else None
    db = torch.empty(C, device=x.device, dtype=bias.dtype) if need_db else None
    if N == 0:
        return (dw.zero_() if need_dw else None), (db.zero_() if need_db else None)
    if _cl_stats(x, num_groups):
        _cl_bwd(dy, x, weight, bias, mean, rstd, dx, dw, db, num_groups, activation, act_param)
        return dw, db
    sig = (N, C, S, num_groups, x.device, weight is not None, bias is not None, activation,
           act_param, need_dw, need_db)
    launch = _BWD_LAUNCH.get(sig)
    if launch is None:
        (sbc, sbs), split, s_per, (abc, abs_), sblocks = _geometry(N, C, S, num_groups, x.device,
                                                                   bwd=True)
        rconsts, ropts = split_constexprs(gn_bwd_reduce_kernel, _BWD_REDUCE_RUNTIME, dict(
            HAS_W=sig[5], HAS_B=sig[6], ACTIVATION=activation, ACT_PARAM=float(act_param),
            NEED_DW=need_dw, NEED_DB=need_db, BLOCK_C=sbc, BLOCK_S=sbs,
            # 4 warps on a 512-element tile spill 8 bytes under triton 3.6's ptxas (SiLU)
            num_warps=8 if sbc * sbs <= 512 else 4))
        aconsts, aopts = split_constexprs(gn_bwd_apply_kernel, _BWD_APPLY_RUNTIME, dict(
            HAS_W=sig[5], HAS_B=sig[6], ACTIVATION=activation, ACT_PARAM=float(act_param),
            BLOCK_C=abc, BLOCK_S=abs_, num_warps=4))
        launch = _BWD_LAUNCH[sig] = (split, s_per, rconsts, ropts, (N * num_groups, sblocks),
                                     aconsts, aopts, min(next_pow2(C), 1024))
    split, s_per, rconsts, ropts, agrid, aconsts, aopts, pbc = launch
    NG = N * num_groups
    Cg = C // num_groups
    dev = x.device
    pc1 = torch.empty(NG * split, device=dev, dtype=torch.float32)
    pc2 = torch.empty(NG * split, device=dev, dtype=torch.float32)
    rows = N * split
    dwp = torch.empty(rows, C, device=dev, dtype=torch.float32) if need_dw else pc1
    dbp = torch.empty(rows, C, device=dev, dtype=torch.float32) if need_db else pc1
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    sd, sx = dy.stride(), x.stride()
    gn_bwd_reduce_kernel[(NG, split)](dy, x, w, b, mean, rstd, pc1, pc2, dwp, dbp, C, S,
                                      num_groups, Cg, s_per, split, *sd, *sx, *rconsts, **ropts)
    gn_bwd_apply_kernel[agrid](dy, x, w, b, mean, rstd, pc1, pc2, dx, S, num_groups, Cg, split,
                               *sd, *sx, *dx.stride(), *aconsts, **aopts)
    if need_dw or need_db:
        gn_param_grad_kernel[(triton.cdiv(C, pbc),)](
            dwp, dbp, dw if need_dw else pc1, db if need_db else pc1, C, rows,
            NEED_DW=need_dw, NEED_DB=need_db, BLOCK_C=pbc, num_warps=4)
    return dw, db


_CL_BWD = launch_cache()
_CL_APPLY_RUNTIME = gn_cl_apply_kernel.arg_names.index("HAS_W")
_CL_REDUCE_RUNTIME = gn_cl_bwd_reduce_kernel.arg_names.index("HAS_W")
_CL_BWD_APPLY_RUNTIME = gn_cl_bwd_apply_kernel.arg_names.index("HAS_W")
_CL_MERGE_RUNTIME = gn_cl_merge_kernel.arg_names.index("BWD")


def _cl_plan(x, G: int, act: tuple, has_wb: tuple, bwd: bool = False, need: tuple = ()):
    """(stats/reduce grid, S_PER, SPLIT, stats options, merge grid, merge constexprs, apply grid,
    apply constexprs, options) of the channels_last path, per signature."""
    N, C, S = x.shape
    (bc, sbs), split, s_per, (_, abs_), sblocks = _geometry(N, C, S, G, x.device, True,
                                                            x.element_size())
    cb = triton.cdiv(C, bc)
    bsp = next_pow2(split)
    pbc = min(next_pow2(C), 1024)
    mconsts, _ = split_constexprs(gn_cl_merge_kernel, _CL_MERGE_RUNTIME, dict(
        BWD=bwd, HAS_W=has_wb[0], NEED_DW=bwd and need[0], NEED_DB=bwd and need[1],
        BLOCK_SP=bsp, BLOCK_J=max(1, min(next_pow2(C // G), 4096 // bsp)), BLOCK_PC=pbc))
    mgrid = (N * G + (triton.cdiv(C, pbc) if bwd and any(need) else 0),)
    kernel, first = ((gn_cl_bwd_apply_kernel, _CL_BWD_APPLY_RUNTIME) if bwd
                     else (gn_cl_apply_kernel, _CL_APPLY_RUNTIME))
    aconsts, opts = split_constexprs(kernel, first, dict(
        HAS_W=has_wb[0], HAS_B=has_wb[1], ACTIVATION=act[0], ACT_PARAM=float(act[1]),
        BLOCK_C=bc, BLOCK_S=abs_, num_warps=4))
    return ((N, split, cb), s_per, split, dict(BLOCK_C=bc, BLOCK_S=sbs), mgrid, mconsts,
            (N * sblocks, cb), aconsts, opts)


def _bind_cl_fwd(x, y_stride, G, eps, has_w, has_b, activation, act_param):
    """channels_last forward, bound (:func:`bind_group_norm_fwd`): statistics, merge, apply
    (three launches)."""
    N, C, S = x.shape
    sgrid, s_per, split, sopts, mgrid, mconsts, agrid, aconsts, opts = _cl_plan(
        x, G, (activation, act_param), (has_w, has_b))
    sx = tuple(x.stride())
    sargs = (C, S, C // G, s_per, *sx)
    margs = (N, C, S, G, C // G, s_per, split, sx[0], sx[1], float(eps), *mconsts)
    aargs = (N, C, S, *sx, *y_stride, *aconsts)
    NG, parts, f32 = N * G, N * split * C, torch.float32

    def launch(x, weight, bias, y, mean, rstd):
        if mean is None:
            mean = x.new_empty(NG, dtype=f32)
            rstd = x.new_empty(NG, dtype=f32)
        pmean = x.new_empty(parts, dtype=f32)
        pm2 = x.new_empty(parts, dtype=f32)
        ch = x.new_empty(2, N, C, dtype=f32)  # per channel: mean, rstd * w
        gn_cl_stats_kernel.run(x, pmean, pm2, *sargs, grid=sgrid, warmup=False, **sopts, **opts)
        gn_cl_merge_kernel.run(x, x if weight is None else weight, pmean, pm2, mean, rstd, ch,
                               mean, mean, *margs, grid=mgrid, warmup=False, **opts)
        gn_cl_apply_kernel.run(x, x if bias is None else bias, y, ch, *aargs, grid=agrid,
                               warmup=False, **opts)
    return launch


def _cl_bwd(dy, x, weight, bias, mean, rstd, dx, dw, db, G, activation, act_param):
    """channels_last backward: per-channel reduction, merge (group sums + dw/db), apply."""
    N, C, S = x.shape
    need = (dw is not None, db is not None)
    sig = (N, C, S, G, x.device, x.dtype, weight is not None, bias is not None, activation,
           act_param, need)
    plan = _CL_BWD.get(sig)
    if plan is None:
        plan = _CL_BWD[sig] = _cl_plan(x, G, (activation, act_param), sig[6:8], True, need)
    rgrid, s_per, split, ropts, mgrid, mconsts, agrid, aconsts, opts = plan
    dev = x.device
    p1 = torch.empty(N * split * C, device=dev, dtype=torch.float32)
    p2 = torch.empty(N * split * C, device=dev, dtype=torch.float32)
    ch = torch.empty(4, N, C, device=dev, dtype=torch.float32)  # mean, rstd, c1, c2
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    sd, sx = dy.stride(), x.stride()
    gn_cl_bwd_reduce_kernel[rgrid](dy, x, w, b, mean, rstd, p1, p2, C, S, G, C // G, s_per,
                                   *sd, *sx, *aconsts[:4], **ropts, **opts)
    gn_cl_merge_kernel[mgrid](x, w, p1, p2, mean, rstd, ch, dw if need[0] else ch,
                              db if need[1] else ch, N, C, S, G, C // G, s_per, split, sx[0],
                              sx[1], 0.0, *mconsts, **opts)
    gn_cl_bwd_apply_kernel[agrid](dy, x, w, b, ch, dx, N, C, S, *sd, *sx, *dx.stride(),
                                  *aconsts, **opts)


def launch_instance_running(mean, rstd, running_mean, running_var, N: int, S: int, eps: float,
                            momentum: float) -> None:
    """InstanceNorm running stats (contiguous (C,), any float dtype) updated from the forward's
    ``(N * C,)`` fp32 mean/rstd: one launch, no re-read of the input."""
    C = running_mean.shape[0]
    block = min(next_pow2(C), 1024)
    instance_running_kernel[(triton.cdiv(C, block),)](
        mean, rstd, running_mean, running_var, N, C, float(eps), float(momentum),
        S / (S - 1) if S > 1 else float("nan"), BLOCK_C=block, num_warps=4)

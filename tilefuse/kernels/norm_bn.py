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

Small problems (the padded ``(N * S, C)`` tile at most :data:`SMALL_TILE` elements, chosen by the
shape alone): the training forward is one program, :func:`bn_small_fwd_kernel` (x read once into
registers: the same shifted two-pass statistics, the finalize's running-stat update and counter,
the apply), and the backward one program, :func:`bn_small_bwd_kernel` (the sums, ``dw``/``db``
and ``dx``). :func:`bind_batch_norm_fwd` computes a forward's launch arguments once per
signature (:class:`FwdLaunch`); the launcher and ``batch_norm_act``'s per-signature plans
(:mod:`tilefuse.fused.norm_bn_plan`) launch through it.
"""
from __future__ import annotations

import torch
import triton

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, sm_count, split_constexprs
from tilefuse.kernels.norm_bn_jit import (  # noqa: F401  (the kernels, launched here)
    bn_stats_kernel, bn_finalize_kernel, bn_running_kernel, bn_apply_kernel,
    bn_bwd_reduce_kernel, bn_bwd_apply_kernel, bn_small_fwd_kernel, bn_small_bwd_kernel,
    pairwise_sum0)

TILE = 4096           # elements per [BLOCK_R, BLOCK_C] tile on a GPU
INTERP_TILE = 16384   # in the interpreter, which pays per program (tests shrink it)


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


MIN_TILE = 1024  # elements: 8 per thread at 4 warps (128-bit accesses for 16-bit dtypes)


def _tiles(x, S: int | None = None) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): wide channel tiles when channels are innermost, else one channel;
    ``BLOCK_R`` covers at most one run of ``S`` (the kernels' walk, :func:`_geometry`) and is
    halved (down to ``MIN_TILE`` elements a tile) while the apply grid has fewer than 2 programs
    per SM: BatchNorm at batch 1 (1x64x56x56: 64 channels of 3136) still fills a GPU. (The
    interpreter, which pays per program, takes few large tiles.)"""
    N, C, S0 = x.shape
    R = N * S0
    run = S if S is not None else _geometry(N, S0, x)[1]
    block_c = min(next_pow2(C), 64) if (x.stride(1) == 1 or S0 == 1) else 1
    if interpreter_enabled():  # the interpreter pays per program: few, large tiles
        tile = INTERP_TILE
        block_c = min(next_pow2(C), max(block_c, tile // max(1, min(next_pow2(R), tile))))
        return min(next_pow2(run), max(1, tile // block_c)), block_c
    block_r = min(next_pow2(run), max(1, TILE // block_c))
    programs = (R // run) * triton.cdiv(C, block_c)  # times the row blocks of one run
    want = 2 * sm_count(x.device)
    while block_r * block_c > MIN_TILE and programs * triton.cdiv(run, block_r) < want:
        block_r //= 2
    return block_r, block_c


def _warps(block_r: int, block_c: int) -> int:
    """Warps of a [BLOCK_R, BLOCK_C] program: 4; one-channel (NCHW) tiles of >= 1024 rows take
    32 elements a thread (four 128-bit loads of a 16-bit tensor, eight of fp32), so the
    channel's scalars (mean, var, weight, ...) stay a minority of the loads in the small tiles
    of batch 1 (the same bytes in flight per SM). (Shorter runs keep 4 warps: one warp on a
    256-row tile spilled on sm_90.)"""
    if block_c > 1 or block_r < 1024:
        return 4
    return min(4, block_r // 1024)


def _split(R: int, c_blocks: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT, R_PER): slices of R (multiples of BLOCK_R) so that the reduction grid has about
    4 programs per SM (2 slices in the interpreter, so the merge is exercised by the tests)."""
    max_split = triton.cdiv(R, block_r)
    if interpreter_enabled():
        want = 2
    else:
        want = max(1, (4 * sm_count(device)) // c_blocks)
    split = max(1, min(want, max_split))
    r_per = triton.cdiv(triton.cdiv(R, split), block_r) * block_r
    return triton.cdiv(R, r_per), r_per


SMALL_TILE = 4096  # elements: a problem whose padded (N * S, C) tile fits is one program


def _small(R: int, C: int):
    """(BLOCK_R, BLOCK_C, num_warps) of the one-program path of a problem of ``R = N * S``
    rows and ``C`` channels (training forward, backward), or None: chosen by the shape alone,
    the same on a GPU and in the interpreter. 8 elements a thread, 1 to 16 warps (16 a thread
    spilled a few bytes on sm_90 under triton 3.6: GELU backward, cumulative forward)."""
    br, bc = next_pow2(R), next_pow2(C)
    if br * bc > SMALL_TILE:
        return None
    return br, bc, max(1, min(16, br * bc // 256))


_FWD_LAUNCH = launch_cache()
_BWD_LAUNCH = launch_cache()
_APPLY_RUNTIME = bn_apply_kernel.arg_names.index("HAS_K")
_FINALIZE_RUNTIME = bn_finalize_kernel.arg_names.index("HAS_RUNNING")
_SMALL_FWD_RUNTIME = bn_small_fwd_kernel.arg_names.index("HAS_RESIDUAL")
_BWD_REDUCE_RUNTIME = bn_bwd_reduce_kernel.arg_names.index("HAS_RESIDUAL")
_BWD_APPLY_RUNTIME = bn_bwd_apply_kernel.arg_names.index("TRAINING")
_SMALL_BWD_RUNTIME = bn_small_bwd_kernel.arg_names.index("TRAINING")


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
                 dict(BLOCK_R=br, BLOCK_C=bc, num_warps=_warps(br, bc)), fconsts, fopts)
    consts, opts = split_constexprs(bn_apply_kernel, _APPLY_RUNTIME, dict(
        HAS_K=training, HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
        ACT_PARAM=float(act_param), BLOCK_R=br, BLOCK_C=bc, num_warps=_warps(br, bc)))
    return stats, ((Ne * triton.cdiv(Se, br), cb), consts, opts)


def _small_fwd_launch(R, C, has_res, has_w, has_b, activation, act_param, running, has_nbt,
                      cumulative, store_stats):
    """(constexprs, options) of the one-program training forward."""
    br, bc, warps = _small(R, C)
    return split_constexprs(bn_small_fwd_kernel, _SMALL_FWD_RUNTIME, dict(
        HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
        ACT_PARAM=float(act_param), HAS_RUNNING=running, HAS_NBT=has_nbt, CUMULATIVE=cumulative,
        STORE_STATS=store_stats, BLOCK_R=br, BLOCK_C=bc, num_warps=warps))


class FwdLaunch:
    """A forward signature's launches with every argument but the tensors bound
    (:func:`bind_batch_norm_fwd`); calling it allocates the temporaries and launches. The
    launcher and the per-signature plans of :func:`tilefuse.ops.batch_norm_act` both launch
    through it (the same arguments, the same bits)."""

    __slots__ = ("kind", "C", "split", "stats", "finalize", "apply")

    def __init__(self, kind, C, split, stats, finalize, apply):
        self.kind, self.C, self.split = kind, C, split  # kind: "eval", "small" or "split"
        self.stats, self.finalize, self.apply = stats, finalize, apply

    def __call__(self, x, residual, weight, bias, y, mean=None, var=None, running_mean=None,
                 running_var=None, num_batches_tracked=None):
        """Eval: ``mean``/``var`` are the fp32 contiguous running stats. Training: returns the
        (C,) fp32 batch mean and biased var (None when bound without ``store_stats``)."""
        res = residual if residual is not None else x
        w = weight if weight is not None else x
        b = bias if bias is not None else x
        kind = self.kind
        if kind == "eval":
            grid, tail, opts = self.apply
            bn_apply_kernel.run(x, res, w, b, y, mean, mean, var, *tail, grid=grid,
                                warmup=False, **opts)
            return mean, var
        rm = running_mean if running_mean is not None else x
        rv = running_var if running_var is not None else x
        nbt = num_batches_tracked if num_batches_tracked is not None else x
        if kind == "small":
            tail, opts = self.apply
            if self.split:  # (store_stats)
                mean, var = x.new_empty(self.C, dtype=_F32), x.new_empty(self.C, dtype=_F32)
                bn_small_fwd_kernel.run(x, res, w, b, y, mean, var, rm, rv, nbt, *tail,
                                        grid=(1,), warmup=False, **opts)
                return mean, var
            bn_small_fwd_kernel.run(x, res, w, b, y, x, x, rm, rv, nbt, *tail, grid=(1,),
                                    warmup=False, **opts)
            return None, None
        C, split = self.C, self.split
        pmean = x.new_empty(split, C, dtype=_F32)
        pm2 = x.new_empty(split, C, dtype=_F32)
        k = x.new_empty(C, dtype=_F32)  # K: each channel's first value
        md = x.new_empty(C, dtype=_F32)  # mean - K
        mean = x.new_empty(C, dtype=_F32)
        var = x.new_empty(C, dtype=_F32)
        grid, tail, opts = self.stats
        bn_stats_kernel.run(x, pmean, pm2, k, *tail, grid=grid, warmup=False, **opts)
        tail, opts = self.finalize
        bn_finalize_kernel.run(pmean, pm2, k, md, var, mean,
                               running_mean if running_mean is not None else k,
                               running_var if running_var is not None else k,
                               num_batches_tracked if num_batches_tracked is not None else k,
                               *tail, grid=(1,), warmup=False, **opts)
        grid, tail, opts = self.apply
        bn_apply_kernel.run(x, res, w, b, y, k, md, var, *tail, grid=grid, warmup=False,
                            **opts)
        return mean, var


_F32 = torch.float32


def bind_batch_norm_fwd(x, residual, y, has_w: bool, has_b: bool, training: bool, eps: float,
                        activation: int, act_param: float, running: bool = False,
                        has_nbt: bool = False, cumulative: bool = False, momentum: float = 0.0,
                        store_stats: bool = True) -> FwdLaunch:
    """The :class:`FwdLaunch` of a forward over non-empty (N, C, S) ``x``, ``residual`` (or
    None) and ``y`` (strides, geometry, grids, constexprs: the tensors' shapes and strides
    alone decide them). ``running``/``has_nbt``: training updates the running stats and
    increments ``num_batches_tracked``; ``store_stats=False``: the one-program training path
    need not store the batch statistics. Launch parameters are computed once per signature
    (:func:`tilefuse.kernels.launch_cache`)."""
    N, C, S = x.shape
    R = N * S
    has_res = residual is not None
    Ne, Se = _geometry(N, S, x, y) if not has_res else _geometry(N, S, x, y, residual)
    flat = Ne == 1
    small = training and _small(R, C) is not None
    sig = (N, C, S, x.stride(1) == 1, flat, x.device, training, has_res, has_w, has_b,
           activation, act_param, running, has_nbt, cumulative, small and store_stats)
    launch = _FWD_LAUNCH.get(sig)
    if launch is None:
        if small:
            launch = _small_fwd_launch(R, C, has_res, has_w, has_b, activation, act_param,
                                       running, has_nbt, cumulative, sig[15])
        else:
            launch = _fwd_launch(x, flat, Ne, Se, training, has_res, has_w, has_b, activation,
                                 act_param, running, has_nbt, cumulative)
        _FWD_LAUNCH[sig] = launch
    sx = _strides(x, flat, S)
    srs = _strides(residual if has_res else x, flat, S) + _strides(y, flat, S)
    unbias = R / (R - 1) if R > 1 else 1.0
    if small:
        consts, opts = launch
        return FwdLaunch("small", C, sig[15], None, None, (
            (C, R, Se, *sx, *srs, float(eps), float(momentum), unbias, *consts), opts))
    stats, (grid, consts, opts) = launch
    apply = (grid, (C, R, Se, *sx, *srs, float(eps), *consts), opts)
    if not training:
        return FwdLaunch("eval", C, 0, None, None, apply)
    sgrid, split, r_per, unbias, sopts, fconsts, fopts = stats
    return FwdLaunch("split", C, split, (sgrid, (C, R, Se, r_per, *sx), sopts),
                     ((C, R, split, r_per, float(momentum), unbias, *fconsts), fopts), apply)


def launch_batch_norm_fwd(x, residual, weight, bias, y, mean, var, training: bool, eps: float,
                          activation: int, act_param: float, running_mean=None,
                          running_var=None, momentum: float = 0.0, num_batches_tracked=None,
                          cumulative: bool = False):
    """x, residual, y: (N, C, S) any strides. Eval: ``mean``/``var`` are the (C,) fp32
    contiguous running stats, read; returns them. Training (pass None for both): returns new
    (C,) fp32 batch ``mean`` and biased ``var``, and updates ``running_mean``/``running_var``
    (contiguous (C,), any float dtype; ``momentum``, or ``1 / num_batches_tracked`` with
    ``cumulative``) and increments ``num_batches_tracked`` when given: in the finalize kernel
    (three launches: statistics, finalize, apply), or, when the whole problem fits one tile
    (:func:`_small`), in one program."""
    N, C, S = x.shape
    if C == 0 or N * S == 0:
        if training:
            mean = torch.empty(C, device=x.device, dtype=torch.float32)
            var = torch.empty(C, device=x.device, dtype=torch.float32)
        return mean, var
    running = training and running_mean is not None
    has_nbt = training and num_batches_tracked is not None
    launch = bind_batch_norm_fwd(x, residual, y, weight is not None, bias is not None, training,
                                 eps, activation, act_param, running, has_nbt, cumulative,
                                 momentum)
    return launch(x, residual, weight, bias, y, mean, var, running_mean if running else None,
                  running_var if running else None, num_batches_tracked if has_nbt else None)


def _bwd_launch(x, Ne, Se, training, has_res, has_w, has_b, activation, act_param, store_dres):
    """(reduce grid, SPLIT, R_PER, reduce constexprs, apply grid, apply constexprs, options)."""
    N, C, S = x.shape
    R = N * S
    br, bc = _tiles(x, Se)
    cb = triton.cdiv(C, bc)
    split, r_per = _split(R, cb, br, x.device)
    rconsts, opts = split_constexprs(bn_bwd_reduce_kernel, _BWD_REDUCE_RUNTIME, dict(
        HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b, ACTIVATION=activation,
        ACT_PARAM=float(act_param), BLOCK_R=br, BLOCK_C=bc, num_warps=_warps(br, bc)))
    aconsts, _ = split_constexprs(bn_bwd_apply_kernel, _BWD_APPLY_RUNTIME, dict(
        TRAINING=training, HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b,
        ACTIVATION=activation, ACT_PARAM=float(act_param), STORE_DRES=store_dres,
        BLOCK_R=br, BLOCK_C=bc, num_warps=_warps(br, bc)))
    return (cb, split), split, r_per, rconsts, (Ne * triton.cdiv(Se, br), cb), aconsts, opts


def _small_bwd_launch(R, C, training, has_res, has_w, has_b, activation, act_param,
                      store_dres):
    """(constexprs, options) of the one-program backward."""
    br, bc, warps = _small(R, C)
    return split_constexprs(bn_small_bwd_kernel, _SMALL_BWD_RUNTIME, dict(
        TRAINING=training, HAS_RESIDUAL=has_res, HAS_W=has_w, HAS_B=has_b,
        ACTIVATION=activation, ACT_PARAM=float(act_param), STORE_DRES=store_dres,
        BLOCK_R=br, BLOCK_C=bc, num_warps=warps))


def launch_batch_norm_bwd(dy, x, residual, weight, bias, mean, var, dx, dres, training: bool,
                          eps: float, activation: int, act_param: float):
    """Writes dx (and dres = dy * act'(z) when given); returns (dw, db), both (C,), in the
    dtype of ``weight``/``bias`` (fp32 without them): two launches (reduction, apply), or one
    when the whole problem fits one tile (:func:`_small`)."""
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
    small = _small(R, C) is not None
    sig = (N, C, S, x.stride(1) == 1, flat, dev, training, has_res, weight is not None,
           bias is not None, activation, act_param, dres is not None)
    launch = _BWD_LAUNCH.get(sig)
    if launch is None:
        if small:
            launch = _small_bwd_launch(R, C, training, has_res, sig[8], sig[9], activation,
                                       act_param, sig[12])
        else:
            launch = _bwd_launch(x, Ne, Se, training, has_res, sig[8], sig[9], activation,
                                 act_param, sig[12])
        _BWD_LAUNCH[sig] = launch
    res = residual if has_res else x
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    sd, sx, sr = _strides(dy, flat, S), _strides(x, flat, S), _strides(res, flat, S)
    if small:
        consts, opts = launch
        bn_small_bwd_kernel.run(dy, x, res, w, b, mean, var, dx, dres if dres is not None else dx,
                                dw, db, C, R, Se, *sd, *sx, *sr, *_strides(dx, flat, S),
                                float(eps), *consts, grid=(1,), warmup=False, **opts)
        return dw, db
    rgrid, split, r_per, rconsts, agrid, aconsts, opts = launch
    p1 = torch.empty(split, C, device=dev, dtype=torch.float32)
    p2 = torch.empty(split, C, device=dev, dtype=torch.float32)
    bn_bwd_reduce_kernel.run(dy, x, res, w, b, mean, var, p1, p2, C, R, Se, r_per,
                             *sd, *sx, *sr, float(eps), *rconsts, grid=rgrid, warmup=False,
                             **opts)
    bn_bwd_apply_kernel.run(
        dy, x, res, w, b, mean, var, p1, p2, dx, dres if dres is not None else dx, dw, db,
        C, R, Se, split, *sd, *sx, *sr, *_strides(dx, flat, S), float(eps), *aconsts,
        grid=agrid, warmup=False, **opts)
    return dw, db


def launch_batch_norm_running(mean, var, running_mean, running_var, num_batches_tracked,
                              momentum: float, count: int, cumulative: bool) -> None:
    """Update the running stats from (C,) fp32 batch ``mean``/biased ``var`` (and increment
    ``num_batches_tracked``) as the finalize kernel does: one single-program launch."""
    C = mean.shape[0]
    running = running_mean is not None and count > 0
    has_nbt = num_batches_tracked is not None
    bn_running_kernel.run(
        mean, var, running_mean if running else mean, running_var if running else mean,
        num_batches_tracked if has_nbt else mean, C, float(momentum),
        count / (count - 1) if count > 1 else 1.0, HAS_RUNNING=running, HAS_NBT=has_nbt,
        CUMULATIVE=cumulative, BLOCK_C=min(next_pow2(C), 1024), num_warps=4, grid=(1,),
        warmup=False)

"""Aligned-row NCHW paths of the depthwise kernels (:mod:`tilefuse.kernels.depthwise`,
:mod:`tilefuse.kernels.depthwise_wgrad`): 128-bit loads where the per-tap loads are scalar.

A tap at ``kw != pad`` starts mid-vector, so the per-tap loads of an NCHW tile cannot be 16-byte
accesses. Instead, per kernel row, a program loads one *window* of whole aligned 16-byte groups
covering every tap of its tile (:func:`row_window`) and forms each tap as an in-register shift of
it (``tl.gather`` along the window's columns; on the GPU Triton stages the window in shared
memory). The host (:func:`row_plan`) turns the path on only where it is exact and aligned: unit
column stride, the row width, every stride and the tile's first column multiples of ``ROW_VEC``
(16 bytes of elements, or fewer), the base 16-byte aligned; a pure function of shapes, strides
and alignment, so the interpreter takes the same path as the GPU. Small maps, whose rows are
not 16-byte aligned (28x28 fp16, 14x14, 7x7) but whose tile covers the whole plane, load the
tile's planes as one flat aligned vector instead and gather every tap from it (``FLAT_N``:
:mod:`tilefuse.kernels.depthwise_planes`; the plans here pick between the two). The weights (and
the bias) of the tile's channels come as one ``(taps, channels)`` tile (``tap_weights``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from tilefuse.kernels import next_pow2
from tilefuse.kernels.activations import activation_grad
from tilefuse.kernels.depthwise_planes import band_plan, flat_plan, tap, tap_weights


@triton.jit
def row_window(x_ptr, n, ci, c_mask, ih, row_ok, iw0, W, sxn, sxc, sxh,
               ROW_VEC: tl.constexpr, WIN_A: tl.constexpr, WIN_W: tl.constexpr):
    """The ``(rows, WIN_W, channels)`` input window of an NCHW tile: columns
    ``[iw0 - WIN_A, iw0 - WIN_A + WIN_W)`` of rows ``ih``, zero outside the image. ``iw0`` and
    ``WIN_A`` are multiples of ``ROW_VEC`` and the host checked that ``W`` and the row, channel
    and image strides are too (unit column stride), so every ``ROW_VEC`` group is 16-byte
    aligned and wholly in or out of the image: the load compiles to 128-bit accesses."""
    # (v // R) * R == v for the host-checked values: the op result carries the divisibility
    W = (W // ROW_VEC) * ROW_VEC
    sxh = (sxh // ROW_VEC) * ROW_VEC
    sxc = (sxc // ROW_VEC) * ROW_VEC
    sxn = (sxn // ROW_VEC) * ROW_VEC
    iw = tl.max_contiguous(tl.multiple_of(iw0 - WIN_A, ROW_VEC) + tl.arange(0, WIN_W), WIN_W)
    off = (n * sxn + ih[:, None, None] * sxh + iw[None, :, None]
           + ci[None, None, :] * sxc)
    m = (row_ok[:, None, None] & ((iw >= 0) & (iw < W))[None, :, None]
         & c_mask[None, None, :])
    return tl.load(x_ptr + off, mask=m, other=0.0)


@triton.jit
def row_taps_fwd(x_ptr, w_base, bias_base, n, ci, c_mask, pid_p, TILES_W, H, W, OH, PAD_H,
                 PAD_W, sxn, sxc, sxh, swh, sww, HAS_BIAS: tl.constexpr,
                 STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr,
                 DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, ROW_VEC: tl.constexpr, WIN_A: tl.constexpr,
                 WIN_W: tl.constexpr, TAPS: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward taps of an NCHW tile from aligned row windows: per kernel row one window load
    (:func:`row_window`), then each tap ``kw`` is an in-register shift of it (``tl.gather``
    along the window's columns) instead of a misaligned shifted load. Returns the
    ``(BLOCK_H * BLOCK_W, BLOCK_C)`` accumulator of the scalar path, bias added."""
    oh = (pid_p // TILES_W) * BLOCK_H + tl.arange(0, BLOCK_H)
    ow0 = (pid_p % TILES_W) * BLOCK_W
    col = tl.arange(0, BLOCK_W) * STRIDE_W + WIN_A - PAD_W
    taps = tap_weights(w_base, bias_base, c_mask, swh, sww, KH, KW, TAPS, HAS_BIAS)
    acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=ACC_DTYPE)
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        win = row_window(x_ptr, n, ci, c_mask, ih, (oh < OH) & (ih >= 0) & (ih < H),
                         ow0 * STRIDE_W, W, sxn, sxc, sxh, ROW_VEC, WIN_A, WIN_W)
        for kw in tl.static_range(KW):
            xv = shifted(win, col + kw * DIL_W, BLOCK_W)
            acc += xv.to(ACC_DTYPE) * tap(taps, kh * KW + kw, ACC_DTYPE)[None, None, :]
    if HAS_BIAS:
        acc += tap(taps, KH * KW, ACC_DTYPE)[None, None, :]
    return tl.reshape(acc, (BLOCK_H * BLOCK_W, BLOCK_C))


@triton.jit
def shifted(win, col, BLOCK_W: tl.constexpr):
    """``win[:, col[j], :]`` for the ``BLOCK_W`` columns ``col`` (a tap's shift of a window)."""
    idx = tl.broadcast_to(col[None, :, None], (win.shape[0], BLOCK_W, win.shape[2]))
    return tl.gather(win, idx, axis=1)


@triton.jit
def dz_window(dy_ptr, s_ptr, n, co, c_mask, oh, row_ok, ow0, OW, sdn, sdc, sdh, ssn, ssc, ssh,
              ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
              ROW_VEC: tl.constexpr, WIN_A: tl.constexpr, WIN_W: tl.constexpr):
    """``dz = dy * act'(saved)`` over a row window of the output (:func:`row_window` of ``dy``
    and of ``saved``: both 128-bit loads), zero outside it."""
    dz = row_window(dy_ptr, n, co, c_mask, oh, row_ok, ow0, OW, sdn, sdc, sdh,
                    ROW_VEC, WIN_A, WIN_W).to(ACC_DTYPE)
    if ACTIVATION != 0:
        sv = row_window(s_ptr, n, co, c_mask, oh, row_ok, ow0, OW, ssn, ssc, ssh,
                        ROW_VEC, WIN_A, WIN_W).to(ACC_DTYPE)
        dz = dz * activation_grad(sv, ACTIVATION, ACT_PARAM)
    return dz


@triton.jit
def row_taps_dgrad(dy_ptr, s_ptr, w_ptr, n, ci, c_mask, pid_p, TILES_W, H, OH, OW, PAD_H, PAD_W,
                   sdn, sdc, sdh, ssn, ssc, ssh, swc, swh, sww,
                   STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr,
                   DIL_W: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
                   ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   ROW_VEC: tl.constexpr, WIN_A: tl.constexpr, WIN_W: tl.constexpr,
                   TAPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """grad_input taps of an NCHW tile: per output row one ``dz`` window (:func:`dz_window`,
    columns from ``iw0 / STRIDE_W - WIN_A``), each tap a gather from it. With a column stride
    the tap ``kw`` of input column ``iw`` reads ``dz`` column ``(iw + PAD_W - kw*DIL_W) /
    STRIDE_W`` where divisible (the gather picks every ``STRIDE_W``-th column; the other phase
    is zeroed). Returns the ``(BLOCK_H * BLOCK_W, BLOCK_C)`` accumulator of the per-tap path."""
    ih = (pid_p // TILES_W) * BLOCK_H + tl.arange(0, BLOCK_H)
    iw0 = (pid_p % TILES_W) * BLOCK_W
    # iw - iw0 + PAD_W + STRIDE_W * WIN_A: >= 0 for every tap that hits (the host's WIN_A)
    col = tl.arange(0, BLOCK_W) + PAD_W + STRIDE_W * WIN_A
    acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=ACC_DTYPE)
    for m in range(MULT):
        co = ci * MULT + m
        taps = tap_weights(w_ptr + co * swc, w_ptr + co * swc, c_mask, swh, sww, KH, KW, TAPS,
                           False)
        for kh in range(KH):
            th = ih + PAD_H - kh * DIL_H
            oh = th // STRIDE_H
            ok = (ih < H) & (th >= 0) & (oh < OH)
            if STRIDE_H > 1:
                ok = ok & (th % STRIDE_H == 0)
            dz = dz_window(dy_ptr, s_ptr, n, co, c_mask, oh, ok, iw0 // STRIDE_W, OW, sdn, sdc,
                           sdh, ssn, ssc, ssh, ACTIVATION, ACT_PARAM, ACC_DTYPE, ROW_VEC, WIN_A,
                           WIN_W)
            for kw in tl.static_range(KW):
                tw = col - kw * DIL_W
                if STRIDE_W > 1:  # the other phases' columns take no tap kw (zeroed)
                    dv = shifted(dz, tl.maximum(tw, 0) // STRIDE_W, BLOCK_W)
                    dv = tl.where((tw % STRIDE_W == 0)[None, :, None], dv, 0.0)
                else:
                    dv = shifted(dz, tw, BLOCK_W)
                acc += dv * tap(taps, kh * KW + kw, ACC_DTYPE)[None, None, :]
    return tl.reshape(acc, (BLOCK_H * BLOCK_W, BLOCK_C))


@triton.jit
def row_tile_wgrad(dy_ptr, s_ptr, x_ptr, n, co, ci, c_mask, p, TILES_W, H, W, OH, OW, PAD_H,
                   PAD_W, sdn, sdc, sdh, ssn, ssc, ssh, sxn, sxc, sxh,
                   STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr,
                   DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   ROW_VEC: tl.constexpr, WIN_A: tl.constexpr, WIN_W: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr):
    """One output tile's contribution to grad_weight / grad_bias (``(BLOCK_T, channels)``: tap
    sums, then the ``dz`` sum in row ``KH*KW``) on the aligned-row path: the ``dz`` tile is one
    aligned window (no margin), each tap's ``x`` a shift of that kernel row's ``x`` window."""
    oh = (p // TILES_W) * BLOCK_H + tl.arange(0, BLOCK_H)
    ow0 = (p % TILES_W) * BLOCK_W
    t = tl.arange(0, BLOCK_T)
    dz = dz_window(dy_ptr, s_ptr, n, co, c_mask, oh, oh < OH, ow0, OW, sdn, sdc, sdh, ssn, ssc,
                   ssh, ACTIVATION, ACT_PARAM, ACC_DTYPE, ROW_VEC, 0, BLOCK_W)
    part = tl.where(t[:, None] == KH * KW, tl.sum(tl.sum(dz, axis=0), axis=0)[None, :], 0.0)
    col = tl.arange(0, BLOCK_W) * STRIDE_W + WIN_A - PAD_W
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        win = row_window(x_ptr, n, ci, c_mask, ih, (oh < OH) & (ih >= 0) & (ih < H),
                         ow0 * STRIDE_W, W, sxn, sxc, sxh, ROW_VEC, WIN_A, WIN_W)
        for kw in tl.static_range(KW):
            xs = shifted(win, col + kw * DIL_W, BLOCK_W).to(ACC_DTYPE)
            s = tl.sum(tl.sum(dz * xs, axis=0), axis=0)
            part += tl.where(t[:, None] == kh * KW + kw, s[None, :], 0.0)
    return part


def row_vec(tensors, start: int) -> int:
    """``ROW_VEC`` for row windows of the NCHW ``tensors`` (N, C, H, W; one element size) whose
    first column is a multiple of ``start``: 16 bytes of elements when that divides ``W``,
    ``start`` and every stride of a dim longer than 1, with a unit column stride and 16-byte
    aligned bases (every ``ROW_VEC`` group of a window is then one aligned 128-bit access,
    wholly in or out of the image); otherwise 1, the per-tap path (narrower groups would pay the
    window shifts for 32/64-bit accesses: not worth it)."""
    size = tensors[0].element_size()
    vec = 16 // size
    for t in tensors:
        N, C, H, W = t.shape
        sn, sc, sh, sw = t.stride()
        strides = [st for dim, st in ((N, sn), (C, sc), (H, sh)) if dim > 1]
        if (t.element_size() != size or not (sw == 1 or W == 1) or t.data_ptr() % 16
                or W % vec or start % vec or any(st % vec for st in strides)):
            return 1
    return vec


_OFF = dict(ROW_VEC=1, WIN_A=0, WIN_W=1, TAPS=1)


def _window(vec: int, left: int, span) -> dict:
    """Window constexprs: ``WIN_A`` = ``left`` (how far the taps reach left of the tile's first
    column) rounded up to ``vec``; ``WIN_W`` = ``span(WIN_A)`` columns as a power of two."""
    win_a = -(-left // vec) * vec
    return dict(ROW_VEC=vec, WIN_A=win_a, WIN_W=next_pow2(span(win_a)))


def row_plan(x, cfg: dict, stride_w: int, dil_w: int, pad_w: int, kh: int, kw: int,
             channels_last: bool, OH: int, OW: int, mult: int, stride_h: int,
             dil_h: int) -> dict:
    """Forward constexprs (``ROW_VEC``, ``WIN_A``, ``WIN_W``, ``TAPS``, ``FLAT_N``, ``BAND``;
    ``ROW_VEC == 1`` keeps the per-tap loads) for reading ``x`` in tiles of ``cfg``'s shape:
    whole planes (:func:`flat_plan`), aligned rows (:func:`row_vec`), or row bands
    (:func:`band_plan`: tiles spanning the width, any multiplier)."""
    bw = cfg["BLOCK_W"]
    flat = 0 if channels_last else flat_plan(x, cfg, OH, OW, mult)
    if flat:
        return dict(_OFF, ROW_VEC=16 // x.element_size(), FLAT_N=flat,
                    TAPS=next_pow2(kh * kw + 1))
    vec = 1 if channels_last else row_vec([x], bw * stride_w)
    if vec == 1:
        rows = (cfg["BLOCK_H"] - 1) * stride_h + (kh - 1) * dil_h + 1  # x rows a tile reaches
        band = 0 if channels_last else band_plan(x, cfg, rows, -(-OW // bw))
        if band:
            return dict(_OFF, ROW_VEC=16 // x.element_size(), FLAT_N=band, BAND=1,
                        TAPS=next_pow2(kh * kw + 1))
        return dict(_OFF, FLAT_N=0)
    return dict(_window(vec, pad_w, lambda a: a - pad_w + (bw - 1) * stride_w
                        + (kw - 1) * dil_w + 1), TAPS=next_pow2(kh * kw + 1), FLAT_N=0)


def row_plan_dgrad(dy, saved, cfg: dict, stride_w: int, dil_w: int, pad_w: int, kh: int,
                   kw: int, channels_last: bool, H: int, W: int, mult: int, stride_h: int,
                   dil_h: int) -> dict:
    """grad_input constexprs for ``dx`` tiles of ``cfg``'s shape over an ``H x W`` input: whole
    ``dz`` planes (:func:`flat_plan` of ``dy`` and ``saved``), else ``dz`` row windows starting
    at ``dz`` column ``iw0 / stride_w`` (so ``BLOCK_W / stride_w`` must be a multiple of
    ``ROW_VEC``; a strided transposed conv gathers every ``stride_w``-th column of it)."""
    bw = cfg["BLOCK_W"]
    if not channels_last:
        flat = [flat_plan(t, cfg, H, W, mult) for t in (dy, saved)]
        if flat[0] and flat[0] == flat[1]:
            return dict(_OFF, ROW_VEC=16 // dy.element_size(), FLAT_N=flat[0],
                        TAPS=next_pow2(kh * kw + 1))
    vec = 1 if channels_last or bw % stride_w else row_vec([dy, saved], bw // stride_w)
    if vec == 1:
        rows = (cfg["BLOCK_H"] - 1 + (kh - 1) * dil_h) // stride_h + 1  # dz rows a tile reaches
        band = 0 if channels_last else [band_plan(t, cfg, rows, -(-W // bw))
                                         for t in (dy, saved)]
        if band and band[0] and band[0] == band[1]:  # dz row bands
            return dict(_OFF, ROW_VEC=16 // dy.element_size(), FLAT_N=band[0], BAND=1,
                        TAPS=next_pow2(kh * kw + 1))
        return dict(_OFF, FLAT_N=0)
    left = ((kw - 1) * dil_w - pad_w) // stride_w  # dz columns read left of iw0 / stride_w
    return dict(_window(vec, left, lambda a: a + (bw - 1 + pad_w) // stride_w + 1),
                TAPS=next_pow2(kh * kw + 1), FLAT_N=0)


def row_plan_wgrad(x, dy, saved, cfg: dict, stride_w: int, dil_w: int, pad_w: int, kw: int,
                   channels_last: bool, mult: int, kh: int, stride_h: int, dil_h: int) -> dict:
    """grad_weight constexprs: whole planes of ``dy``, ``saved`` and ``x`` (``FLAT_N`` /
    ``FLAT_X``), else the forward's ``x`` windows plus aligned ``dz`` tiles of ``dy`` and
    ``saved`` (one ``ROW_VEC`` valid for all three; ``BLOCK_C`` lowered so that an x window
    holds at most ``ROW_WIN_BYTES``), else row bands of all three (``BAND=1``: output
    tiles spanning the width, any multiplier). The caller sizes its grid from the returned
    ``BLOCK_C`` when there is one."""
    bw = cfg["BLOCK_W"]
    if channels_last:
        return dict(_OFF, FLAT_N=0, FLAT_X=0)
    OH, OW = dy.shape[2], dy.shape[3]
    flat = [flat_plan(t, cfg, OH, OW, mult) for t in (dy, saved, x)]
    same = x.element_size() == dy.element_size() == saved.element_size()
    if same and flat[0] and flat[0] == flat[1] and flat[2]:
        return dict(_OFF, ROW_VEC=16 // x.element_size(), FLAT_N=flat[0], FLAT_X=flat[2])
    plan = _row_plan_wgrad(x, dy, saved, bw, stride_w, dil_w, pad_w, kw)
    bc = cfg["BLOCK_C"]  # a strided tile's x window per kernel row is wide: fewer channels
    while (plan["ROW_VEC"] > 1 and bc > 1
           and cfg["BLOCK_H"] * plan["WIN_W"] * bc * x.element_size() > ROW_WIN_BYTES):
        bc //= 2
    if bc != cfg["BLOCK_C"]:
        plan["BLOCK_C"] = bc
    if plan["ROW_VEC"] == 1 and same:
        bh, tiles_w = cfg["BLOCK_H"], -(-OW // bw)
        band = [band_plan(t, cfg, bh, tiles_w) for t in (dy, saved)]
        band_x = band_plan(x, cfg, (bh - 1) * stride_h + (kh - 1) * dil_h + 1, tiles_w)
        if band[0] and band[0] == band[1] and band_x:
            return dict(_OFF, ROW_VEC=16 // x.element_size(), FLAT_N=band[0], FLAT_X=band_x,
                        BAND=1)
    return dict(plan, FLAT_N=0, FLAT_X=0)


ROW_WIN_BYTES = 8192  # of a grad_weight x row window (16 KB fp32: 140-255 registers at s2)


def _row_plan_wgrad(x, dy, saved, bw: int, stride_w: int, dil_w: int, pad_w: int,
                    kw: int) -> dict:
    """The aligned-row part of :func:`row_plan_wgrad`."""
    vec = row_vec([x], bw * stride_w)
    if vec == 1 or row_vec([dy, saved], bw) != vec:
        return dict(_OFF)
    return dict(_window(vec, pad_w, lambda a: a - pad_w + (bw - 1) * stride_w
                        + (kw - 1) * dil_w + 1), TAPS=1)

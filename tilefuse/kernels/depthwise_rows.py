"""Aligned-row NCHW paths of the depthwise kernels (:mod:`tilefuse.kernels.depthwise`,
:mod:`tilefuse.kernels.depthwise_wgrad`): 128-bit loads where the per-tap loads are scalar.

A tap at ``kw != pad`` starts mid-vector, so the per-tap loads of an NCHW tile cannot be 16-byte
accesses. Instead, per kernel row, a program loads one *window* of whole aligned 16-byte groups
covering every tap of its tile (:func:`row_window`) and forms each tap as an in-register shift of
it (``tl.gather`` along the window's columns; on the GPU Triton stages the window in shared
memory). The host (:func:`row_plan`) turns the path on only where it is exact and aligned: unit
column stride, the row width, every stride and the tile's first column multiples of ``ROW_VEC``
(16 bytes of elements, or fewer), the base 16-byte aligned; a pure function of shapes, strides
and alignment, so the interpreter takes the same path as the GPU. The weights (and the bias) of
the tile's channels come as one ``(taps, channels)`` tile (:func:`tap_weights`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from tilefuse.kernels import next_pow2
from tilefuse.kernels.activations import activation_grad


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
def plane_window(ptr, n, c0, C, HW, sn, ROW_VEC: tl.constexpr, FLAT_N: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Planes ``c0 .. c0 + BLOCK_C`` of image ``n`` of a contiguous NCHW tensor as one flat
    ``FLAT_N`` vector (zero past the last channel); 128-bit loads: the host checked that the
    image stride, ``C*HW`` and ``BLOCK_C*HW`` are multiples of ``ROW_VEC`` and the base is
    16-byte aligned."""
    lim = ((tl.minimum(C - c0, BLOCK_C) * HW) // ROW_VEC) * ROW_VEC
    base = ((n * sn + c0 * HW) // ROW_VEC) * ROW_VEC
    f = tl.max_contiguous(tl.arange(0, FLAT_N), FLAT_N)
    return tl.load(ptr + base + f, mask=f < lim, other=0.0)


@triton.jit
def plane_gather(win, c0, co, c_mask, ih, iw, m, H, W):
    """``(pixels, channels)`` values of :func:`plane_window` ``win`` at rows ``ih`` and columns
    ``iw`` of channels ``co`` (zero where ``m`` or ``c_mask`` is false)."""
    mm = m[:, None] & c_mask[None, :]
    idx = tl.where(mm, (ih * W + iw)[:, None] + ((co - c0) * (H * W))[None, :], 0)
    v = tl.gather(win, tl.reshape(idx, (idx.shape[0] * idx.shape[1],)), axis=0)
    return tl.where(mm, tl.reshape(v, (idx.shape[0], idx.shape[1])), 0.0)


@triton.jit
def flat_taps_fwd(x_ptr, w_base, bias_base, n, c0, co, c_mask, oh, ow, p_mask, C, H, W, PAD_H,
                  PAD_W, sxn, swh, sww, HAS_BIAS: tl.constexpr, STRIDE_H: tl.constexpr,
                  STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                  KH: tl.constexpr, KW: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  ROW_VEC: tl.constexpr, FLAT_N: tl.constexpr, TAPS: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Forward taps when the tile holds whole planes (small maps: 28x28, 14x14, 7x7, whose rows
    are not 16-byte aligned): the ``BLOCK_C`` planes of a contiguous NCHW image are one flat
    range, loaded as one aligned vector of ``FLAT_N`` elements (the host checked that
    ``BLOCK_C*H*W``, ``C*H*W`` and the image stride are multiples of ``ROW_VEC``); each tap is a
    gather from it. Returns the per-tap path's accumulator, bias added."""
    win = plane_window(x_ptr, n, c0, C, H * W, sxn, ROW_VEC, FLAT_N, BLOCK_C)
    taps = tap_weights(w_base, bias_base, c_mask, swh, sww, KH, KW, TAPS, HAS_BIAS)
    acc = tl.zeros((oh.shape[0], BLOCK_C), dtype=ACC_DTYPE)
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        m_h = p_mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            xv = plane_gather(win, c0, co, c_mask, ih, iw, m_h & (iw >= 0) & (iw < W), H, W)
            acc += xv.to(ACC_DTYPE) * tap(taps, kh * KW + kw, ACC_DTYPE)[None, :]
    if HAS_BIAS:
        acc += tap(taps, KH * KW, ACC_DTYPE)[None, :]
    return acc


@triton.jit
def tap_weights(w_base, bias_base, c_mask, swh, sww, KH: tl.constexpr, KW: tl.constexpr,
                TAPS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """All ``KH*KW`` weights of the tile's channels, and the bias as row ``KH*KW``, as one
    ``(TAPS, channels)`` load (``TAPS``: ``KH*KW + 1`` rounded up to a power of two): a few
    load instructions instead of ``KH*KW + 1`` per-channel ones; :func:`tap` picks a row."""
    t = tl.arange(0, TAPS)
    off = (t // KW) * swh + (t % KW) * sww
    ptrs = tl.where((t < KH * KW)[:, None], w_base[None, :] + off[:, None], bias_base[None, :])
    m = (t < KH * KW + HAS_BIAS)[:, None] & c_mask[None, :]
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def tap(taps, k, ACC_DTYPE: tl.constexpr):
    """Row ``k`` of :func:`tap_weights`' tile (a masked sum over its tap axis), as
    ``ACC_DTYPE``."""
    t = tl.arange(0, taps.shape[0])
    return tl.sum(tl.where((t == k)[:, None], taps.to(ACC_DTYPE), 0.0), axis=0)


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
                   STRIDE_H: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
                   ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   ROW_VEC: tl.constexpr, WIN_A: tl.constexpr, WIN_W: tl.constexpr,
                   TAPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """grad_input taps of an NCHW tile (unit column stride): per output row one ``dz`` window
    (:func:`dz_window`), each tap a shift of it; the ``(BLOCK_H * BLOCK_W, BLOCK_C)``
    accumulator of the per-tap path."""
    ih = (pid_p // TILES_W) * BLOCK_H + tl.arange(0, BLOCK_H)
    iw0 = (pid_p % TILES_W) * BLOCK_W
    col = tl.arange(0, BLOCK_W) + PAD_W + WIN_A
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
            dz = dz_window(dy_ptr, s_ptr, n, co, c_mask, oh, ok, iw0, OW, sdn, sdc, sdh, ssn,
                           ssc, ssh, ACTIVATION, ACT_PARAM, ACC_DTYPE, ROW_VEC, WIN_A, WIN_W)
            for kw in tl.static_range(KW):
                acc += shifted(dz, col - kw * DIL_W, BLOCK_W) * \
                    tap(taps, kh * KW + kw, ACC_DTYPE)[None, None, :]
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


@triton.jit
def flat_taps_dgrad(dy_ptr, s_ptr, w_ptr, n, c0, ci, c_mask, ih, iw, p_mask, C, OH, OW, PAD_H,
                    PAD_W, sdn, ssn, swc, swh, sww, STRIDE_H: tl.constexpr,
                    STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                    KH: tl.constexpr, KW: tl.constexpr, ACTIVATION: tl.constexpr,
                    ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr, ROW_VEC: tl.constexpr,
                    FLAT_N: tl.constexpr, TAPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_input taps when the tile holds whole planes (multiplier 1, any stride): ``dz`` of
    the tile's output planes from two flat aligned loads (:func:`plane_window` of ``dy`` and
    ``saved``), each tap a gather from it."""
    dz = plane_window(dy_ptr, n, c0, C, OH * OW, sdn, ROW_VEC, FLAT_N, BLOCK_C).to(ACC_DTYPE)
    if ACTIVATION != 0:
        sv = plane_window(s_ptr, n, c0, C, OH * OW, ssn, ROW_VEC, FLAT_N, BLOCK_C)
        dz = dz * activation_grad(sv.to(ACC_DTYPE), ACTIVATION, ACT_PARAM)
    taps = tap_weights(w_ptr + ci * swc, w_ptr + ci * swc, c_mask, swh, sww, KH, KW, TAPS,
                       False)
    acc = tl.zeros((ih.shape[0], BLOCK_C), dtype=ACC_DTYPE)
    for kh in range(KH):
        th = ih + PAD_H - kh * DIL_H
        oh = th // STRIDE_H
        m_h = p_mask & (th >= 0) & (oh < OH)
        if STRIDE_H > 1:
            m_h = m_h & (th % STRIDE_H == 0)
        for kw in tl.static_range(KW):
            tw = iw + PAD_W - kw * DIL_W
            ow = tw // STRIDE_W
            mk = m_h & (tw >= 0) & (ow < OW)
            if STRIDE_W > 1:
                mk = mk & (tw % STRIDE_W == 0)
            acc += plane_gather(dz, c0, ci, c_mask, oh, ow, mk, OH, OW) * \
                tap(taps, kh * KW + kw, ACC_DTYPE)[None, :]
    return acc


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


FLAT_MAX = 4096  # elements of a flat whole-plane window (registers: 32 per thread at 4 warps)


def flat_plan(x, cfg: dict, OH: int, OW: int, mult: int) -> int:
    """``FLAT_N`` of the whole-plane forward path (0: off): the tile covers the output plane,
    the image is contiguous NCHW (16-byte aligned), the tile's planes and the image's are whole
    16-byte groups, and the tile's planes fit ``FLAT_MAX`` elements."""
    N, C, H, W = x.shape
    sn, sc, sh, sw = x.stride()
    vec = 16 // x.element_size()
    bc, hw = cfg["BLOCK_C"], H * W
    if (mult != 1 or cfg["BLOCK_H"] < OH or cfg["BLOCK_W"] < OW or x.data_ptr() % 16
            or not (W == 1 or sw == 1) or not (H == 1 or sh == W) or not (C == 1 or sc == hw)
            or (bc * hw) % vec or (C * hw) % vec or (N > 1 and sn % vec)
            or next_pow2(bc * hw) > FLAT_MAX):
        return 0
    return next_pow2(bc * hw)


def flat_res_plan(res, cfg: dict, flat: int) -> int:
    """``RES_FLAT`` (0: off): the residual is read as whole planes too (:func:`plane_window`)
    when the forward takes the whole-plane path and the residual is a contiguous, aligned NCHW
    tensor of the output's shape (not broadcast)."""
    if not flat or res is None:
        return 0
    return flat_plan(res, cfg, res.shape[2], res.shape[3], 1)


def row_plan(x, cfg: dict, stride_w: int, dil_w: int, pad_w: int, kh: int, kw: int,
             channels_last: bool, OH: int, OW: int, mult: int) -> dict:
    """Forward constexprs (``ROW_VEC``, ``WIN_A``, ``WIN_W``, ``TAPS``, ``FLAT_N``;
    ``ROW_VEC == 1`` keeps the per-tap loads) for reading ``x`` in tiles of ``cfg``'s shape:
    whole planes (:func:`flat_plan`) or aligned rows (:func:`row_vec`)."""
    bw = cfg["BLOCK_W"]
    flat = 0 if channels_last else flat_plan(x, cfg, OH, OW, mult)
    if flat:
        return dict(_OFF, ROW_VEC=16 // x.element_size(), FLAT_N=flat,
                    TAPS=next_pow2(kh * kw + 1))
    vec = 1 if channels_last else row_vec([x], bw * stride_w)
    if vec == 1:
        return dict(_OFF, FLAT_N=0)
    return dict(_window(vec, pad_w, lambda a: a - pad_w + (bw - 1) * stride_w
                        + (kw - 1) * dil_w + 1), TAPS=next_pow2(kh * kw + 1), FLAT_N=0)


def row_plan_dgrad(dy, saved, cfg: dict, stride_w: int, dil_w: int, pad_w: int, kh: int,
                   kw: int, channels_last: bool, H: int, W: int, mult: int) -> dict:
    """grad_input constexprs for ``dx`` tiles of ``cfg``'s shape over an ``H x W`` input: whole
    ``dz`` planes (:func:`flat_plan` of ``dy`` and ``saved``), else ``dz`` row windows (unit
    column stride only: a strided transposed conv picks every ``stride``-th column)."""
    bw = cfg["BLOCK_W"]
    if not channels_last:
        flat = [flat_plan(t, cfg, H, W, mult) for t in (dy, saved)]
        if flat[0] and flat[0] == flat[1]:
            return dict(_OFF, ROW_VEC=16 // dy.element_size(), FLAT_N=flat[0],
                        TAPS=next_pow2(kh * kw + 1))
    vec = 1 if channels_last or stride_w != 1 else row_vec([dy, saved], bw)
    if vec == 1:
        return dict(_OFF, FLAT_N=0)
    return dict(_window(vec, (kw - 1) * dil_w - pad_w, lambda a: bw + pad_w + a),
                TAPS=next_pow2(kh * kw + 1), FLAT_N=0)


def row_plan_wgrad(x, dy, saved, cfg: dict, stride_w: int, dil_w: int, pad_w: int, kw: int,
                   channels_last: bool) -> dict:
    """grad_weight constexprs: the forward's ``x`` windows plus aligned ``dz`` tiles of ``dy``
    and ``saved`` (one ``ROW_VEC`` valid for all three)."""
    bw = cfg["BLOCK_W"]
    if channels_last:
        return dict(_OFF)
    vec = row_vec([x], bw * stride_w)
    if vec == 1 or row_vec([dy, saved], bw) != vec:
        return dict(_OFF)
    return dict(_window(vec, pad_w, lambda a: a - pad_w + (bw - 1) * stride_w
                        + (kw - 1) * dil_w + 1), TAPS=1)

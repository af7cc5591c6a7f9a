"""Whole-plane and row-band NCHW paths of the depthwise kernels (``FLAT_N``, ``BAND``), and the
weight-tile helpers shared with the aligned-row paths (:mod:`tilefuse.kernels.depthwise_rows`).

Small maps (28x28 fp16, 14x14, 7x7) have rows that are not 16-byte aligned, but their tile
already covers the whole output plane. Then the ``BLOCK_C`` planes of a contiguous NCHW image are
one flat range: it is loaded as one aligned vector (:func:`plane_window`, 128-bit accesses) and
every tap is a gather from it (:func:`plane_gather`). Forward (x and a contiguous residual),
grad_input (``dz`` planes, any stride) and grad_weight (``dz`` and x planes), multiplier 1.
Where a tile only spans the width (a row band: the 28x28 stride-2 grad_input's 4-row tiles) or
the multiplier is not 1, each channel's rows that the tile reaches are one flat range too:
:func:`band_window` loads them from their 16-byte group on (``BAND == 1``, any stride and
multiplier; forward, grad_input and grad_weight). The host rules (:func:`flat_plan`,
:func:`band_plan`) depend on shapes, strides and alignment only, so the interpreter takes the
same path as the GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tilefuse.kernels import next_pow2
from tilefuse.kernels.activations import activation_grad


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
    return window_gather(win, (co - c0) * (H * W), c_mask, ih, iw, m, W)


@triton.jit
def window_gather(win, c_off, c_mask, ih, iw, m, W):
    """``(pixels, channels)`` values of a flat window ``win`` at ``c_off + ih * W + iw`` (the
    channel's start in the window, then row-major pixels), zero where ``m`` or ``c_mask`` is
    false."""
    mm = m[:, None] & c_mask[None, :]
    idx = tl.where(mm, (ih * W + iw)[:, None] + c_off[None, :], 0)
    v = tl.gather(win, tl.reshape(idx, (idx.shape[0] * idx.shape[1],)), axis=0)
    return tl.where(mm, tl.reshape(v, (idx.shape[0], idx.shape[1])), 0.0)


@triton.jit
def band_window(ptr, n, co, c_mask, r0, C, HW, W, sn, ROW_VEC: tl.constexpr,
                FLAT_N: tl.constexpr):
    """Rows ``r0 ..`` of planes ``co`` of image ``n`` of a contiguous NCHW tensor: per channel
    ``FLAT_N`` elements from the 16-byte group holding element ``(r0, 0)``, flattened channel
    after channel; and each channel's start in it (``FLAT_N * c + r0 * W`` minus the group's
    start). 128-bit loads: the host checked that ``C*HW`` and the image stride are multiples of
    ``ROW_VEC`` and the base is 16-byte aligned (a group is wholly inside or past the image);
    elements past the band are read but never gathered."""
    lim = (((co * 0 + C) * HW) // ROW_VEC) * ROW_VEC  # in co's index type (int64 if huge)
    first = co * HW + r0 * W
    start = (first // ROW_VEC) * ROW_VEC
    f = tl.max_contiguous(tl.arange(0, FLAT_N), FLAT_N)
    off = start[:, None] + f[None, :]
    win = tl.load(ptr + ((n * sn) // ROW_VEC) * ROW_VEC + off,
                  mask=c_mask[:, None] & (off < lim[:, None]), other=0.0)
    c_off = tl.arange(0, co.shape[0]) * FLAT_N + (first - start) - r0 * W
    return tl.reshape(win, (co.shape[0] * FLAT_N,)), c_off


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
def flat_taps_fwd(x_ptr, w_base, bias_base, n, c0, co, ci, c_mask, oh, ow, p_mask, oh0, C, H, W,
                  PAD_H, PAD_W, sxn, swh, sww, HAS_BIAS: tl.constexpr, STRIDE_H: tl.constexpr,
                  STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                  KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
                  ACC_DTYPE: tl.constexpr, ROW_VEC: tl.constexpr, FLAT_N: tl.constexpr,
                  BAND: tl.constexpr, TAPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward taps from one flat aligned ``x`` window, each tap a gather from it. ``BAND ==
    0``: the tile holds whole planes (small maps: 28x28, 14x14, 7x7, whose rows are not 16-byte
    aligned; multiplier 1): the ``BLOCK_C`` planes of a contiguous NCHW image are one flat range
    of ``FLAT_N`` elements (:func:`plane_window`). ``BAND == 1``: the tile (output rows from
    ``oh0``) spans the width: per output channel ``co`` the band of input channel ``ci``'s rows
    that its taps reach (:func:`band_window`, any multiplier). Returns the per-tap path's
    accumulator, bias added."""
    if BAND:
        win, x_off = band_window(x_ptr, n, ci, c_mask, tl.maximum(oh0 * STRIDE_H - PAD_H, 0),
                                 C // MULT, H * W, W, sxn, ROW_VEC, FLAT_N)
    else:
        win = plane_window(x_ptr, n, c0, C, H * W, sxn, ROW_VEC, FLAT_N, BLOCK_C)
        x_off = (co - c0) * (H * W)
    taps = tap_weights(w_base, bias_base, c_mask, swh, sww, KH, KW, TAPS, HAS_BIAS)
    acc = tl.zeros((oh.shape[0], BLOCK_C), dtype=ACC_DTYPE)
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        m_h = p_mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            xv = window_gather(win, x_off, c_mask, ih, iw, m_h & (iw >= 0) & (iw < W), W)
            acc += xv.to(ACC_DTYPE) * tap(taps, kh * KW + kw, ACC_DTYPE)[None, :]
    if HAS_BIAS:
        acc += tap(taps, KH * KW, ACC_DTYPE)[None, :]
    return acc


@triton.jit
def flat_taps_dgrad(dy_ptr, s_ptr, w_ptr, n, c0, ci, c_mask, ih, iw, p_mask, ih0, C, OH, OW,
                    PAD_H, PAD_W, sdn, ssn, swc, swh, sww, STRIDE_H: tl.constexpr,
                    STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                    KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
                    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    ROW_VEC: tl.constexpr, FLAT_N: tl.constexpr, BAND: tl.constexpr,
                    TAPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_input taps from flat aligned ``dz`` windows (any stride), each tap a gather.
    ``BAND == 0``: the tile holds whole planes (multiplier 1): the tile's ``C`` output planes
    in one :func:`plane_window` each of ``dy`` and ``saved``. ``BAND == 1``: the ``dx`` tile (rows
    from ``ih0``) spans the input's width: per output channel ``ci * MULT + m`` the band of
    ``dz`` rows its taps reach (:func:`band_window`, ``FLAT_N`` elements a channel)."""
    acc = tl.zeros((ih.shape[0], BLOCK_C), dtype=ACC_DTYPE)
    r0 = tl.maximum(ih0 + PAD_H - (KH - 1) * DIL_H, 0) // STRIDE_H  # first dz row reached
    for m in range(MULT):
        co = ci * MULT + m
        if BAND:
            dz, c_off = band_window(dy_ptr, n, co, c_mask, r0, C * MULT, OH * OW, OW, sdn,
                                    ROW_VEC, FLAT_N)
            if ACTIVATION != 0:
                sv, c_off = band_window(s_ptr, n, co, c_mask, r0, C * MULT, OH * OW, OW, ssn,
                                        ROW_VEC, FLAT_N)
        else:
            dz = plane_window(dy_ptr, n, c0, C, OH * OW, sdn, ROW_VEC, FLAT_N, BLOCK_C)
            if ACTIVATION != 0:
                sv = plane_window(s_ptr, n, c0, C, OH * OW, ssn, ROW_VEC, FLAT_N, BLOCK_C)
            c_off = (ci - c0) * (OH * OW)
        dz = dz.to(ACC_DTYPE)
        if ACTIVATION != 0:
            dz = dz * activation_grad(sv.to(ACC_DTYPE), ACTIVATION, ACT_PARAM)
        taps = tap_weights(w_ptr + co * swc, w_ptr + co * swc, c_mask, swh, sww, KH, KW, TAPS,
                           False)
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
                acc += window_gather(dz, c_off, c_mask, oh, ow, mk, OW) * \
                    tap(taps, kh * KW + kw, ACC_DTYPE)[None, :]
    return acc


@triton.jit
def flat_tile_wgrad(dy_ptr, s_ptr, x_ptr, n, c0, co, ci, c_mask, oh, ow, p_mask, oh0, t, C, H,
                    W, OH, OW, PAD_H, PAD_W, sdn, ssn, sxn, STRIDE_H: tl.constexpr,
                    STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                    KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr,
                    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    ROW_VEC: tl.constexpr, FLAT_N: tl.constexpr, FLAT_X: tl.constexpr,
                    BAND: tl.constexpr, BLOCK_C: tl.constexpr):
    """One output tile's grad_weight / grad_bias contribution from flat aligned windows of
    ``dz`` (``dy`` and ``saved``) and ``x``, each one load; the ``dz`` tile and every tap's
    ``x`` are gathers. ``BAND == 0``: whole planes (multiplier 1, :func:`plane_window`);
    ``BAND == 1``: the tile (output rows from ``oh0``) spans the width: per channel the band of
    its ``dz`` rows and of the ``x`` rows its taps reach (:func:`band_window`, ``FLAT_N`` /
    ``FLAT_X`` elements a channel; input channel ``ci`` for output channel ``co``)."""
    if BAND:
        dzw, dz_off = band_window(dy_ptr, n, co, c_mask, oh0, C, OH * OW, OW, sdn, ROW_VEC,
                                  FLAT_N)
        if ACTIVATION != 0:
            sv, dz_off = band_window(s_ptr, n, co, c_mask, oh0, C, OH * OW, OW, ssn, ROW_VEC,
                                     FLAT_N)
        xw, x_off = band_window(x_ptr, n, ci, c_mask, tl.maximum(oh0 * STRIDE_H - PAD_H, 0),
                                C // MULT, H * W, W, sxn, ROW_VEC, FLAT_X)
    else:
        dzw = plane_window(dy_ptr, n, c0, C, OH * OW, sdn, ROW_VEC, FLAT_N, BLOCK_C)
        if ACTIVATION != 0:
            sv = plane_window(s_ptr, n, c0, C, OH * OW, ssn, ROW_VEC, FLAT_N, BLOCK_C)
        dz_off = (co - c0) * (OH * OW)
        xw = plane_window(x_ptr, n, c0, C, H * W, sxn, ROW_VEC, FLAT_X, BLOCK_C)
        x_off = (co - c0) * (H * W)
    dzw = dzw.to(ACC_DTYPE)
    if ACTIVATION != 0:
        dzw = dzw * activation_grad(sv.to(ACC_DTYPE), ACTIVATION, ACT_PARAM)
    dz = window_gather(dzw, dz_off, c_mask, oh, ow, p_mask, OW)
    part = tl.where(t[:, None] == KH * KW, tl.sum(dz, axis=0)[None, :], 0.0)
    for kh in range(KH):
        ih = oh * STRIDE_H - PAD_H + kh * DIL_H
        m_h = p_mask & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = ow * STRIDE_W - PAD_W + kw * DIL_W
            xv = window_gather(xw, x_off, c_mask, ih, iw, m_h & (iw >= 0) & (iw < W), W)
            s = tl.sum(dz * xv.to(ACC_DTYPE), axis=0)
            part += tl.where(t[:, None] == kh * KW + kw, s[None, :], 0.0)
    return part


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


def band_plan(t, cfg: dict, rows: int, tiles_w: int) -> int:
    """Per-channel ``FLAT_N`` of a band window (0: off) of ``rows`` rows of the NCHW tensor
    ``t`` (``dy``, ``saved`` or ``x``) per tile of ``cfg``'s shape, ``tiles_w`` tiles across
    the width: at most ``BAND_TILES_W`` tiles share (re-read) a band, ``t`` is contiguous and
    16-byte aligned with whole 16-byte groups per image (``C*H*W``), and the tile's channel
    bands fit ``FLAT_MAX`` elements. A band is the rows plus the start's misalignment, and at
    least one 16-byte group per thread (a smaller window compiles to narrower loads; the extra
    elements are the next rows, read from cache by the neighbouring tiles too)."""
    N, C, H, W = t.shape
    sn, sc, sh, sw = t.stride()
    vec = 16 // t.element_size()
    flat = max(next_pow2(min(rows, H) * W + vec - 1),
               32 * cfg.get("num_warps", 4) * vec // cfg["BLOCK_C"])
    if (tiles_w > BAND_TILES_W or t.data_ptr() % 16 or not (W == 1 or sw == 1)
            or not (H == 1 or sh == W) or not (C == 1 or sc == H * W) or (C * H * W) % vec
            or (N > 1 and sn % vec) or cfg["BLOCK_C"] * flat > FLAT_MAX):
        return 0
    return flat


BAND_TILES_W = 4  # at most this many dx tiles across the width share (re-read) a dz band


def flat_res_plan(res, cfg: dict, flat: int) -> int:
    """``RES_FLAT`` (0: off): the residual is read as whole planes too (:func:`plane_window`)
    when the forward takes the whole-plane path and the residual is a contiguous, aligned NCHW
    tensor of the output's shape (not broadcast)."""
    if not flat or res is None:
        return 0
    return flat_plan(res, cfg, res.shape[2], res.shape[3], 1)

"""Cross-entropy kernels: class-index or class-probability targets, class weights, label
smoothing, every reduction, ``ignore_index``; no probability tensor is ever stored.

For a row ``x`` of ``V`` logits, ``lse = log(sum_j exp(x_j))``, class weights ``w`` (1 without
``weight=``) and smoothing ``eps`` (torch's definition)::

    class index t:   loss = (1-eps) * w_t * (lse - x_t) + eps/V * sum_j w_j * (lse - x_j)
                     dloss/dx_j = p_j * ((1-eps) * w_t + eps/V * W) - (1-eps) * w_t * [j == t]
                                  - eps/V * w_j                    (W = sum_j w_j)
    probabilities q: q' = (1-eps) * q + eps/V,  A = sum_j w_j * q'_j
                     loss = A * lse - sum_j w_j * q'_j * x_j,   dloss/dx_j = A * p_j - w_j * q'_j

Three kernels:

* :func:`xent_fwd_kernel`, one program per row: a chunked *single-exp* online softmax (per chunk
  the running max moves once, by a scalar, so every logit costs one ``exp``) with the weighted
  target sums in the same pass. Writes the row loss, and for backward only ``lse`` (plus ``A``
  for probability targets): ``(2, R)`` fp32.
* :func:`xent_reduce_kernel`, one program: the mean/sum over rows in a fixed order
  (deterministic), the denominator of ``'mean'`` (sum of ``w_t`` over non-ignored rows, or the
  row count for probability targets), ``W``, and an "all targets valid" flag.
* :func:`xent_bwd_kernel`, one program per row: reads the logits again and writes
  ``(softmax - target_dist) * grad_output`` with ``grad_output`` (and the mean's denominator)
  read on the device: one exp per logit.

A class index outside ``[0, V)`` that is not ``ignore_index`` gives the row a NaN loss and
clears the flag (the caller raises on CPU / asserts on the device).
"""
from __future__ import annotations

import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, split_constexprs


@triton.jit
def _row_target(t_ptr, w_ptr, row, stride_t, ignore_index, V, HAS_WEIGHT: tl.constexpr):
    """(clamped target, its weight (0 for an ignored row), valid-or-ignored flag)."""
    t = tl.load(t_ptr + row * stride_t).to(tl.int64)
    ignored = t == ignore_index
    valid = (t >= 0) & (t < V)
    tc = tl.where(valid & (~ignored), t, 0)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + tc).to(tl.float32)
    else:
        w_t = 1.0
    w_t = tl.where(ignored, 0.0, w_t)
    return tc, w_t, valid | ignored, ignored


@triton.jit
def _soft_target(t_ptr, w_ptr, row, c, cm, stride_tr, stride_tc, eps, V, SMOOTH: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr):
    """Columns ``c`` of a class-probability target row as the loss weighs them: smoothed
    (``q * (1 - eps) + eps / V``) and times the class weights; 0 outside ``cm``'s load."""
    q = tl.load(t_ptr + row * stride_tr + c.to(tl.int64) * stride_tc, mask=cm,
                other=0.0).to(tl.float32)
    if SMOOTH:
        q = q * (1.0 - eps) + eps / V
    if HAS_WEIGHT:
        q = q * tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    return q


@triton.jit
def _hint(V, stride_xr, stride_tr, VEC: tl.constexpr, SOFT: tl.constexpr):
    """``(v // VEC) * VEC == v`` (the launcher checked): the results carry divisibility VEC, so
    row loads vectorize (128-bit) when ``V`` is not a multiple of 16 (e.g. V=1000)."""
    if SOFT:  # probability targets: (R, V) rows too (class indices: an (R,) vector)
        stride_tr = (stride_tr // VEC) * VEC
    return (V // VEC) * VEC, (stride_xr // VEC) * VEC, stride_tr


@triton.jit
def xent_fwd_kernel(
    x_ptr, t_ptr, w_ptr, rows_ptr, stats_ptr, R, V, stride_xr, stride_xc, stride_tr, stride_tc,
    ignore_index, eps,
    SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SAVE: tl.constexpr,
    BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    V, stride_xr, stride_tr = _hint(V, stride_xr, stride_tr, VEC, SOFT)
    x_row = x_ptr + row * stride_xr
    cols = tl.arange(0, BLOCK)
    m = -3.0e38  # finite: no inf - inf before the first real max
    s = 0.0
    acc_a = tl.zeros((BLOCK,), tl.float32)  # sum w q' (probability targets), or sum w
    acc_b = tl.zeros((BLOCK,), tl.float32)  # sum w q' x, or sum w x (smoothing)
    for start in range(0, V, BLOCK):
        c = start + cols
        cm = c < V
        x = tl.load(x_row + c.to(tl.int64) * stride_xc, mask=cm,
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)  # one exp per logit
        m = m_new
        if SOFT:
            q = tl.where(cm, _soft_target(t_ptr, w_ptr, row, c, cm, stride_tr, stride_tc, eps,
                                          V, SMOOTH, HAS_WEIGHT), 0.0)
            acc_a += q
            acc_b += q * tl.where(cm, x, 0.0)
        elif SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
                acc_a += w
                acc_b += w * tl.where(cm, x, 0.0)
            else:
                acc_b += tl.where(cm, x, 0.0)
    lse = m + tl.log(s)
    if SOFT:
        a = tl.sum(acc_a, axis=0)
        loss = a * lse - tl.sum(acc_b, axis=0)
        if SAVE:
            tl.store(stats_ptr + R + row, a)
    else:
        tc, w_t, ok, ignored = _row_target(t_ptr, w_ptr, row, stride_tr, ignore_index, V,
                                           HAS_WEIGHT)
        x_t = tl.load(x_row + tc * stride_xc).to(tl.float32)
        loss = w_t * (lse - x_t)
        if SMOOTH:  # not 0 * (...): a -inf logit (a masked class) would make it NaN
            if HAS_WEIGHT:
                big_w = tl.sum(acc_a, axis=0)
            else:
                big_w = V * 1.0
            smooth = (lse * big_w - tl.sum(acc_b, axis=0)) / V
            loss = (1.0 - eps) * loss + eps * smooth
        loss = tl.where(ignored, 0.0, loss)
        loss = tl.where(ok, loss, float("nan"))
    tl.store(rows_ptr + row, loss.to(rows_ptr.dtype.element_ty))
    if SAVE:
        tl.store(stats_ptr + row, lse)


@triton.jit
def xent_reduce_kernel(
    rows_ptr, t_ptr, w_ptr, out_ptr, aux_ptr, R, V, stride_t, ignore_index,
    REDUCE: tl.constexpr, MEAN: tl.constexpr, SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """aux = [denominator of 'mean', sum of the class weights, 1.0 if every target is valid]."""
    r0 = tl.arange(0, BLOCK)
    tot = tl.zeros((BLOCK,), tl.float32)
    den = tl.zeros((BLOCK,), tl.float32)
    bad = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, R, BLOCK):
        r = start + r0
        rm = r < R
        if REDUCE:
            tot += tl.load(rows_ptr + r, mask=rm, other=0.0).to(tl.float32)
        if not SOFT:
            t = tl.load(t_ptr + r.to(tl.int64) * stride_t, mask=rm, other=ignore_index)
            t = t.to(tl.int64)
            live = rm & (t != ignore_index)
            valid = (t >= 0) & (t < V)
            bad += tl.where(live & (~valid), 1, 0)
            if MEAN:
                if HAS_WEIGHT:
                    den += tl.load(w_ptr + tl.where(valid, t, 0), mask=live & valid,
                                   other=0.0).to(tl.float32)
                else:
                    den += tl.where(live, 1.0, 0.0)
    d = tl.sum(den, axis=0)
    if HAS_WEIGHT and not SOFT:  # W, for the backward of weighted label smoothing
        c0 = tl.arange(0, BLOCK)
        w_all = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            c = start + c0
            w_all += tl.load(w_ptr + c, mask=c < V, other=0.0).to(tl.float32)
        tl.store(aux_ptr + 1, tl.sum(w_all, axis=0))
    if SOFT:
        d = R * 1.0
    if REDUCE:
        total = tl.sum(tot, axis=0)
        if MEAN:
            total = total / d  # every target ignored: 0 / 0 = NaN, as torch
        tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
    tl.store(aux_ptr, d)
    tl.store(aux_ptr + 2, tl.where(tl.sum(bad, axis=0) == 0, 1.0, 0.0))


@triton.jit
def xent_bwd_kernel(
    x_ptr, t_ptr, w_ptr, stats_ptr, aux_ptr, go_ptr, gx_ptr, R, V, stride_xr, stride_xc,
    stride_tr, stride_tc, stride_go, stride_gr, ignore_index, eps,
    SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, MEAN: tl.constexpr,
    BLOCK: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    V, stride_xr, stride_tr = _hint(V, stride_xr, stride_tr, VEC, SOFT)
    stride_gr = (stride_gr // VEC) * VEC
    x_row = x_ptr + row * stride_xr
    g_row = gx_ptr + row * stride_gr
    cols = tl.arange(0, BLOCK)
    lse = tl.load(stats_ptr + row)
    g = tl.load(go_ptr + row * stride_go).to(tl.float32)
    if MEAN:
        g = g / tl.load(aux_ptr)
    if SOFT:
        coef = tl.load(stats_ptr + R + row) * g
        tc = 0
        hit = 0.0
    else:
        tc, w_t, ok, ignored = _row_target(t_ptr, w_ptr, row, stride_tr, ignore_index, V,
                                           HAS_WEIGHT)
        g = tl.where(ignored, 0.0, g)  # ignored rows: a zero gradient (not 0 * NaN)
        hit = (1.0 - eps) * w_t * g
        coef = hit
        if SMOOTH:
            if HAS_WEIGHT:
                big_w = tl.load(aux_ptr + 1)
            else:
                big_w = V * 1.0
            coef = coef + eps * big_w / V * g
    for start in range(0, V, BLOCK):
        c = start + cols
        cm = c < V
        x = tl.load(x_row + c.to(tl.int64) * stride_xc, mask=cm, other=0.0).to(tl.float32)
        d = tl.exp(x - lse) * coef
        if SOFT:
            q = _soft_target(t_ptr, w_ptr, row, c, cm, stride_tr, stride_tc, eps, V, SMOOTH,
                             HAS_WEIGHT)
            d = d - q * g
        else:
            d = tl.where(c == tc, d - hit, d)
            if SMOOTH:
                if HAS_WEIGHT:
                    d = d - eps / V * g * tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
                else:
                    d = d - eps / V * g
            d = tl.where(ignored, 0.0, d)
        tl.store(g_row + c, d.to(gx_ptr.dtype.element_ty), mask=cm)


def _block(V: int, is_cuda: bool) -> int:
    if interpreter_enabled() or not is_cuda:
        return max(16, min(8192, triton.next_power_of_2(V)))
    return max(128, min(4096, triton.next_power_of_2(V)))


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16


_LAUNCH = launch_cache()
_FWD_RT = xent_fwd_kernel.arg_names.index("SOFT")
_RED_RT = xent_reduce_kernel.arg_names.index("REDUCE")
_BWD_RT = xent_bwd_kernel.arg_names.index("SOFT")


def _params(kind: str, V: int, is_cuda: bool, flags: tuple, block):
    if kind == "red":
        blk = 1024 if is_cuda and not interpreter_enabled() else block or 1024
        return split_constexprs(xent_reduce_kernel, _RED_RT, dict(
            REDUCE=flags[0], MEAN=flags[1], SOFT=flags[2], HAS_WEIGHT=flags[3], BLOCK=blk,
            num_warps=4))
    block = block or _block(V, is_cuda)
    kern, rt = (xent_fwd_kernel, _FWD_RT) if kind == "fwd" else (xent_bwd_kernel, _BWD_RT)
    names = ("SOFT", "HAS_WEIGHT", "SMOOTH", "SAVE" if kind == "fwd" else "MEAN", "VEC")
    return split_constexprs(kern, rt, dict(zip(names, flags), BLOCK=block,
                                           num_warps=_warps(block)))


def _vec(logits, target, grad=None) -> int:
    """The widest power of two <= 16 bytes dividing V and every row stride (unit column
    strides only), for :func:`_hint`."""
    R, V = logits.shape
    sizes = [V, logits.stride(0)]
    units = [logits.stride(1)]
    if target.dim() == 2:
        sizes.append(target.stride(0))
        units.append(target.stride(1))
    if grad is not None:
        sizes.append(grad.stride(0))
    if any(u != 1 for u in units) and V > 1:
        return 1
    vec = 16 // logits.element_size()
    while vec > 1 and any(n % vec for n in sizes):
        vec //= 2
    return vec


def _cached(kind, V, is_cuda, flags, block):
    key = (kind, V, is_cuda, flags, block)
    p = _LAUNCH.get(key)
    if p is None:
        p = _LAUNCH[key] = _params(*key)
    return p


def _t_strides(target, soft: bool):
    return target.stride() if soft else (target.stride(0), 0)


def launch_forward(logits, target, weight, rows, stats, eps: float, ignore_index: int,
                   block=None) -> None:
    """Row losses into ``rows`` (R,) and, when ``stats`` (2, R) fp32 is given, ``lse`` (and
    ``A`` for probability targets). logits (R, V) any strides; target (R,) int64 or (R, V)
    float probabilities; weight (V,) or None."""
    R, V = logits.shape
    if R == 0:
        return
    soft = target.dim() == 2
    consts, opts = _cached("fwd", V, logits.is_cuda,
                           (soft, weight is not None, eps > 0.0, stats is not None,
                            _vec(logits, target)), block)
    xent_fwd_kernel[(R,)](
        logits, target, weight if weight is not None else logits, rows,
        stats if stats is not None else rows, R, V, *logits.stride(), *_t_strides(target, soft),
        int(ignore_index), float(eps), *consts, **opts)


def launch_reduce(rows, target, weight, out, aux, V: int, ignore_index: int, reduction: str,
                  block=None) -> None:
    """``out`` (0-d) = mean/sum of ``rows`` ('none': nothing written); ``aux`` (3,) fp32 =
    [mean denominator, sum of ``weight``, 1.0 if every class index is valid]."""
    soft = target.dim() == 2
    reduce = reduction != "none"
    consts, opts = _cached("red", V, rows.is_cuda,
                           (reduce, reduction == "mean", soft, weight is not None), block)
    xent_reduce_kernel[(1,)](
        rows, target, weight if weight is not None else rows, out if reduce else rows, aux,
        rows.shape[0], V, target.stride(0), int(ignore_index), *consts, **opts)


def launch_backward(logits, target, weight, stats, aux, grad_out, grad, eps: float,
                    ignore_index: int, mean: bool, block=None) -> None:
    """``grad`` (R, V) = ``(softmax - target_dist) * grad_out`` (``/ aux[0]`` for 'mean');
    ``grad_out``: 0-d or (R,) (any stride), read on the device."""
    R, V = logits.shape
    if R == 0:
        return
    soft = target.dim() == 2
    consts, opts = _cached("bwd", V, logits.is_cuda,
                           (soft, weight is not None, eps > 0.0, mean,
                            _vec(logits, target, grad)), block)
    xent_bwd_kernel[(R,)](
        logits, target, weight if weight is not None else logits, stats, aux, grad_out, grad,
        R, V, *logits.stride(), *_t_strides(target, soft),
        grad_out.stride(0) if grad_out.dim() else 0, grad.stride(0), int(ignore_index),
        float(eps), *consts, **opts)

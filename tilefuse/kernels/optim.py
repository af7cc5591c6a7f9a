"""Multi-tensor optimizer kernels: one launch updates every parameter of a bucket.

Every program reads its tensor's row of the bucket's :class:`~tilefuse.kernels.optim_table.
StepTable` (``tab``: ``[numel, role offsets..., step offset, scalar row]``; each role is one base
tensor plus int64 element offsets) and its scalar row (``sc``, float64: lr, betas, eps... cast to
the compute dtype as torch casts its Python-float hyper-parameters). Hyper-parameters that change
between steps therefore never recompile; only the algorithm flags (AMSGRAD, NESTEROV, ...) are
``tl.constexpr``.

Step counters live on the device (the state's own ``step`` tensors): every program of a tensor
reads the old step and uses ``step + 1`` (``step`` when GradScaler's ``found_inf`` is set); the
last program of the tensor to arrive (an atomic per-tensor counter) writes the new value back and
resets the counter, so no program reads a step another one already advanced. Step-dependent
terms (Adam's bias corrections, Adagrad's decayed lr) are computed in float64 from it, as torch
computes them in Python floats (``beta ** step`` by repeated squaring: IEEE multiplies only).

Elementwise updates read every tensor as its raw storage range, which is valid because the caller
only batches tensors that are dense with the param's exact strides (see tilefuse.optim._plan).
``GMUL`` (optional device scalar) multiplies the gradient: the clip coefficient, or GradScaler's
``grad_scale`` whose reciprocal is taken in the kernel (``GMUL_INV``, as torch's
``scale.double().reciprocal().float()``); ``FINF`` (optional device scalar, GradScaler's
found_inf) turns every load and store off when non-zero, so an overflowing step is skipped
without a host sync.

The chunk prologue, the step counter, the grad/param load and the param store are shared
``@triton.jit`` helpers; they inline when compiled. The multi-tensor reductions (grad norms, clip
scale) are in :mod:`tilefuse.kernels.optim_norm`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse.kernels.optim_table import compute_dtype


@triton.jit
def _chunk(ctab_ptr, cstart_ptr, tab_ptr, finf_ptr, NCOLS: tl.constexpr, HAS_FINF: tl.constexpr,
           BLOCK: tl.constexpr):
    """Program -> (tensor index t, its table row, numel n, live, first element ``start`` (a
    scalar), lane indices ``ar`` (int32), ``rem`` (lanes in range: the mask is ``ar < rem``),
    ``full``). Elements are addressed as a scalar base pointer + ``ar``: no per-element int64
    offsets. ``full``: the whole chunk is in range (and live), so the loads/stores need no mask
    and vectorize. When GradScaler's found_inf is set (HAS_FINF), ``live`` is false and ``rem``
    0: nothing is loaded or stored."""
    t = tl.load(ctab_ptr + tl.program_id(0)).to(tl.int64)
    row = tab_ptr + t * NCOLS
    start = tl.load(cstart_ptr + tl.program_id(0))
    ar = tl.arange(0, BLOCK)
    n = tl.load(row)
    if HAS_FINF:
        live = tl.load(finf_ptr) == 0
        rem = tl.where(live, n - start, 0)
    else:
        live = n >= 0
        rem = n - start
    full = rem >= BLOCK
    return t, row, n, live, start, ar, rem, full


@triton.jit
def _base(base_ptr, row, col, start, ALIGNED: tl.constexpr):
    """Scalar pointer to this chunk's first element of a role: base + table offset + start.
    ALIGNED (checked on the host): every offset of the bucket is a multiple of 16 elements, and
    ``start`` is a multiple of BLOCK, so the loads carry the alignment and vectorize."""
    off = tl.load(row + col) + start
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    return base_ptr + off


@triton.jit
def _ld(ptrs, rem, full, ALIGNED: tl.constexpr):
    """Load of a chunk (``ptrs``: scalar base + ``arange(BLOCK)``): unmasked (vectorizable) for a
    full chunk; for a tensor's last one, masked to ``rem`` lanes, or with ALIGNED (16-byte
    aligned tensor starts, checked on the host) to ``rem`` rounded up to whole 16-byte groups, so
    the tail vectorizes too: the extra lanes read the rest of the aligned 16-byte group that
    holds the tensor's last element (never another page, so always mapped memory); their values
    are unused (``_st`` stores exactly ``rem`` lanes; reductions must mask them)."""
    ar = tl.arange(0, ptrs.shape[0])
    if full:
        v = tl.load(ptrs)
    elif ALIGNED:
        VEC = 128 // ptrs.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
        v = tl.load(ptrs, mask=ar < ((rem + VEC - 1) // VEC) * VEC, other=0.0)
    else:
        v = tl.load(ptrs, mask=ar < rem, other=0.0)
    return v


@triton.jit
def _st(ptrs, v, rem, full):
    if full:
        tl.store(ptrs, v)
    else:
        tl.store(ptrs, v, mask=tl.arange(0, ptrs.shape[0]) < rem)


@triton.jit
def _pair(ptr):
    """The two float64 scalars at ``ptr`` (16-byte aligned: the scalar region starts at an even
    word of the table buffer and the row width is even) as one 128-bit load."""
    a, b = tl.split(tl.load(ptr + tl.arange(0, 2)))
    return a, b


@triton.jit
def _scalar(sc_ptr, row, NCOLS: tl.constexpr, WIDTH: tl.constexpr):
    """Pointer to this tensor's scalar row (float64 values)."""
    return sc_ptr + tl.load(row + NCOLS - 1) * WIDTH


@triton.jit
def _advance_step(t, row, n, live, step_ptr, cnt_ptr, NCOLS: tl.constexpr, BLOCK: tl.constexpr):
    """This step's counter (float64): the stored step + 1 (+ 0 when found_inf is set). Every
    program reads the old value; the last of the tensor's programs to arrive writes the new one."""
    s_ptr = step_ptr + tl.load(row + NCOLS - 2)
    step = tl.load(s_ptr).to(tl.float64) + live.to(tl.float64)
    # every warp of this program has read the old step before its arrival is counted (barrier),
    # and every arrival precedes the last one's write (the atomic is acq_rel)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + t, 1)
    last = arrived == tl.maximum((n + BLOCK - 1) // BLOCK, 1) - 1
    tl.store(s_ptr, step.to(s_ptr.dtype.element_ty), mask=last)
    tl.store(cnt_ptr + t, 0, mask=last)
    return step


@triton.jit
def _powi(base, step):
    """base ** step for a float64 base and a non-negative integral float64 step."""
    e = step.to(tl.int64)
    r = base * 0.0 + 1.0
    while e > 0:
        r = tl.where((e & 1) != 0, r * base, r)
        base = base * base
        e = e >> 1
    return r


@triton.jit
def _load_grad_param(g_ptrs, gmul_ptr, p_ptrs, master_ptrs, rem, full, MAXIMIZE: tl.constexpr,
                     HAS_MASTER: tl.constexpr, HAS_GMUL: tl.constexpr, GMUL_INV: tl.constexpr,
                     CDT: tl.constexpr, ALIGNED: tl.constexpr):
    """Gradient (x AMP unscale/clip coefficient, negated for maximize) and the param (or its fp32
    master copy), in the compute dtype."""
    g = _ld(g_ptrs, rem, full, ALIGNED).to(CDT)
    if HAS_GMUL:
        gm = tl.load(gmul_ptr)
        if GMUL_INV:  # GradScaler's scale: torch unscales by scale.double().reciprocal().float()
            gm = (1.0 / gm.to(tl.float64)).to(tl.float32)
        g = g * gm.to(CDT)
    if MAXIMIZE:
        g = -g
    if HAS_MASTER:
        p = _ld(master_ptrs, rem, full, ALIGNED).to(CDT)
    else:
        p = _ld(p_ptrs, rem, full, ALIGNED).to(CDT)
    return g, p


@triton.jit
def _store_param(p, p_ptrs, master_ptrs, rem, full, HAS_MASTER: tl.constexpr):
    if HAS_MASTER:
        _st(master_ptrs, p.to(tl.float32), rem, full)
    _st(p_ptrs, p.to(p_ptrs.dtype.element_ty), rem, full)


# roles: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq, 5 master; a step counter
# scalars: lr, weight_decay, 1-beta1, beta1, beta2, 1-beta2, eps, 1-lr*wd
@triton.jit
def adam_kernel(ctab_ptr, cstart_ptr, tab_ptr, sc_ptr, gmul_ptr, finf_ptr, step_ptr, cnt_ptr,
                p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr,
                AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_MASTER: tl.constexpr, HAS_GMUL: tl.constexpr, GMUL_INV: tl.constexpr,
                HAS_FINF: tl.constexpr, CDT: tl.constexpr, F32: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, row, n, live, start, ar, rem, full = _chunk(ctab_ptr, cstart_ptr, tab_ptr, finf_ptr,
                                                      9, HAS_FINF, BLOCK)
    step = _advance_step(t, row, n, live, step_ptr, cnt_ptr, 9, BLOCK)
    p_o = _base(p_ptr, row, 1, start, ALIGNED) + ar
    g_o = _base(g_ptr, row, 2, start, ALIGNED) + ar
    m_o = _base(m_ptr, row, 3, start, ALIGNED) + ar
    v_o = _base(v_ptr, row, 4, start, ALIGNED) + ar
    vmax_o = _base(vmax_ptr, row, 5, start, ALIGNED) + ar
    master_o = _base(master_ptr, row, 6, start, ALIGNED) + ar
    sc = _scalar(sc_ptr, row, 9, 8)  # 8-wide rows, 16-byte aligned: 128-bit pair loads
    lr, wd = _pair(sc)
    w1, beta1 = _pair(sc + 2)
    beta2_64, omb2 = _pair(sc + 4)
    eps, decay = _pair(sc + 6)
    wd, w1, omb2, eps, decay = wd.to(CDT), w1.to(CDT), omb2.to(CDT), eps.to(CDT), decay.to(CDT)
    beta2 = beta2_64.to(CDT)
    # torch (Python floats): step_size = lr / (1 - beta1**step), sqrt(1 - beta2**step)
    step_size = (lr / (1.0 - _powi(beta1, step))).to(CDT)
    bc2_sqrt = tl.sqrt(1.0 - _powi(beta2_64, step)).to(CDT)
    g, p = _load_grad_param(g_o, gmul_ptr, p_o, master_o, rem,
                            full, MAXIMIZE, HAS_MASTER, HAS_GMUL, GMUL_INV, CDT, ALIGNED)
    if DECOUPLED:
        p = p * decay
    else:
        g = g + wd * p
    m = _ld(m_o, rem, full, ALIGNED).to(CDT)
    d = g - m  # torch.lerp's two-branch formula (CPU and CUDA)
    m = tl.where(w1 < 0.5, m + w1 * d, g - d * (1.0 - w1))
    v = _ld(v_o, rem, full, ALIGNED).to(CDT) * beta2 + omb2 * g * g
    _st(m_o, m.to(m_ptr.dtype.element_ty), rem, full)
    _st(v_o, v.to(v_ptr.dtype.element_ty), rem, full)
    if AMSGRAD:
        v = tl.maximum(_ld(vmax_o, rem, full, ALIGNED).to(CDT), v)
        _st(vmax_o, v.to(vmax_ptr.dtype.element_ty), rem, full)
    if F32:  # IEEE-rounded sqrt / div like torch (plain sqrt and / are approximate for fp32)
        upd = tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
    else:
        upd = m / (tl.sqrt(v) / bc2_sqrt + eps)
    p = p - step_size * upd
    _store_param(p, p_o, master_o, rem, full, HAS_MASTER)


# roles: 0 param, 1 grad, 2 momentum_buffer, 3 master (no step counter)
# scalars: lr, weight_decay, buffer decay (momentum, or 0 on the buffer's first step),
#          grad weight (1-dampening, or 1 on the first step), momentum (for nesterov)
@triton.jit
def sgd_kernel(ctab_ptr, cstart_ptr, tab_ptr, sc_ptr, gmul_ptr, finf_ptr, step_ptr, cnt_ptr,
               p_ptr, g_ptr, buf_ptr, master_ptr,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_MASTER: tl.constexpr, HAS_GMUL: tl.constexpr, GMUL_INV: tl.constexpr,
               HAS_FINF: tl.constexpr, CDT: tl.constexpr, F32: tl.constexpr,
               ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, row, n, live, start, ar, rem, full = _chunk(ctab_ptr, cstart_ptr, tab_ptr, finf_ptr,
                                                      7, HAS_FINF, BLOCK)
    p_o = _base(p_ptr, row, 1, start, ALIGNED) + ar
    g_o = _base(g_ptr, row, 2, start, ALIGNED) + ar
    buf_o = _base(buf_ptr, row, 3, start, ALIGNED) + ar
    master_o = _base(master_ptr, row, 4, start, ALIGNED) + ar
    sc = _scalar(sc_ptr, row, 7, 5)
    lr = tl.load(sc).to(CDT)
    wd = tl.load(sc + 1).to(CDT)
    g, p = _load_grad_param(g_o, gmul_ptr, p_o, master_o, rem,
                            full, MAXIMIZE, HAS_MASTER, HAS_GMUL, GMUL_INV, CDT, ALIGNED)
    g = g + wd * p
    if MOMENTUM:
        buf = _ld(buf_o, rem, full, ALIGNED).to(CDT) * tl.load(sc + 2).to(CDT) \
            + g * tl.load(sc + 3).to(CDT)
        _st(buf_o, buf.to(buf_ptr.dtype.element_ty), rem, full)
        if NESTEROV:
            g = g + tl.load(sc + 4).to(CDT) * buf
        else:
            g = buf
    p = p - lr * g
    _store_param(p, p_o, master_o, rem, full, HAS_MASTER)


# roles: 0 param, 1 grad, 2 square_avg, 3 grad_avg, 4 momentum_buffer, 5 master; a step counter
# scalars: lr, weight_decay, alpha, 1-alpha, eps, momentum
@triton.jit
def rmsprop_kernel(ctab_ptr, cstart_ptr, tab_ptr, sc_ptr, gmul_ptr, finf_ptr, step_ptr, cnt_ptr,
                   p_ptr, g_ptr, sq_ptr, gavg_ptr, buf_ptr, master_ptr,
                   CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
                   HAS_MASTER: tl.constexpr, HAS_GMUL: tl.constexpr, GMUL_INV: tl.constexpr,
                   HAS_FINF: tl.constexpr, CDT: tl.constexpr, F32: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    t, row, n, live, start, ar, rem, full = _chunk(ctab_ptr, cstart_ptr, tab_ptr, finf_ptr,
                                                      9, HAS_FINF, BLOCK)
    _advance_step(t, row, n, live, step_ptr, cnt_ptr, 9, BLOCK)  # counted, not used
    p_o = _base(p_ptr, row, 1, start, ALIGNED) + ar
    g_o = _base(g_ptr, row, 2, start, ALIGNED) + ar
    sq_o = _base(sq_ptr, row, 3, start, ALIGNED) + ar
    gavg_o = _base(gavg_ptr, row, 4, start, ALIGNED) + ar
    buf_o = _base(buf_ptr, row, 5, start, ALIGNED) + ar
    master_o = _base(master_ptr, row, 6, start, ALIGNED) + ar
    sc = _scalar(sc_ptr, row, 9, 6)
    lr = tl.load(sc).to(CDT)
    wd = tl.load(sc + 1).to(CDT)
    alpha = tl.load(sc + 2).to(CDT)
    oma = tl.load(sc + 3).to(CDT)
    eps = tl.load(sc + 4).to(CDT)
    g, p = _load_grad_param(g_o, gmul_ptr, p_o, master_o, rem,
                            full, MAXIMIZE, HAS_MASTER, HAS_GMUL, GMUL_INV, CDT, ALIGNED)
    g = g + wd * p
    sq = _ld(sq_o, rem, full, ALIGNED).to(CDT) * alpha + oma * g * g
    _st(sq_o, sq.to(sq_ptr.dtype.element_ty), rem, full)
    if CENTERED:
        ga = _ld(gavg_o, rem, full, ALIGNED).to(CDT)
        d = g - ga  # torch.lerp's two-branch formula
        ga = tl.where(oma < 0.5, ga + oma * d, g - d * (1.0 - oma))
        _st(gavg_o, ga.to(gavg_ptr.dtype.element_ty), rem, full)
        avg = sq - ga * ga
    else:
        avg = sq
    if F32:
        upd = tl.div_rn(g, tl.sqrt_rn(avg) + eps)
    else:
        upd = g / (tl.sqrt(avg) + eps)
    if MOMENTUM:
        buf = _ld(buf_o, rem, full, ALIGNED).to(CDT) * tl.load(sc + 5).to(CDT)
        buf = buf + upd
        _st(buf_o, buf.to(buf_ptr.dtype.element_ty), rem, full)
        p = p - lr * buf
    else:
        p = p - lr * upd
    _store_param(p, p_o, master_o, rem, full, HAS_MASTER)


# roles: 0 param, 1 grad, 2 state, 3 master.  ALGO selects the update and its scalars row:
# "lion":    state exp_avg; no step counter; scalars: lr, 1-lr*wd, beta1, beta2
# "adagrad": state sum; a step counter;     scalars: lr, weight_decay, eps, lr_decay
@triton.jit
def single_state_kernel(ctab_ptr, cstart_ptr, tab_ptr, sc_ptr, gmul_ptr, finf_ptr, step_ptr,
                        cnt_ptr, p_ptr, g_ptr, s_ptr, master_ptr,
                        ALGO: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr,
                        HAS_GMUL: tl.constexpr, GMUL_INV: tl.constexpr, HAS_FINF: tl.constexpr,
                        CDT: tl.constexpr, F32: tl.constexpr, ALIGNED: tl.constexpr,
                        BLOCK: tl.constexpr):
    t, row, n, live, start, ar, rem, full = _chunk(ctab_ptr, cstart_ptr, tab_ptr, finf_ptr,
                                                      7, HAS_FINF, BLOCK)
    p_o = _base(p_ptr, row, 1, start, ALIGNED) + ar
    g_o = _base(g_ptr, row, 2, start, ALIGNED) + ar
    s_o = _base(s_ptr, row, 3, start, ALIGNED) + ar
    master_o = _base(master_ptr, row, 4, start, ALIGNED) + ar
    sc = _scalar(sc_ptr, row, 7, 4)
    g, p = _load_grad_param(g_o, gmul_ptr, p_o, master_o, rem,
                            full, MAXIMIZE, HAS_MASTER, HAS_GMUL, GMUL_INV, CDT, ALIGNED)
    s = _ld(s_o, rem, full, ALIGNED).to(CDT)
    if ALGO == "lion":
        lr = tl.load(sc).to(CDT)
        decay = tl.load(sc + 1).to(CDT)
        beta1 = tl.load(sc + 2).to(CDT)
        beta2 = tl.load(sc + 3).to(CDT)
        c = s * beta1 + g * (1.0 - beta1)
        update = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0)).to(CDT)
        p = p * decay - lr * update
        s = s * beta2 + g * (1.0 - beta2)
    else:  # "adagrad"
        tl.static_assert(ALGO == "adagrad")
        step = _advance_step(t, row, n, live, step_ptr, cnt_ptr, 7, BLOCK)
        # torch (Python floats): clr = lr / (1 + (step - 1) * lr_decay)
        clr = (tl.load(sc) / (1.0 + (step - 1.0) * tl.load(sc + 3))).to(CDT)
        wd = tl.load(sc + 1).to(CDT)
        eps = tl.load(sc + 2).to(CDT)
        g = g + wd * p
        s = s + g * g
        if F32:
            p = p - clr * tl.div_rn(g, tl.sqrt_rn(s) + eps)
        else:
            p = p - clr * (g / (tl.sqrt(s) + eps))
    _st(s_o, s.to(s_ptr.dtype.element_ty), rem, full)
    _store_param(p, p_o, master_o, rem, full, HAS_MASTER)


# an optimizer's ``_kernel`` name -> (its update kernel, the constexprs selecting its algorithm)
UPDATES = {
    "adam_kernel": (adam_kernel, {}),
    "sgd_kernel": (sgd_kernel, {}),
    "rmsprop_kernel": (rmsprop_kernel, {}),
    "lion_kernel": (single_state_kernel, {"ALGO": "lion"}),
    "adagrad_kernel": (single_state_kernel, {"ALGO": "adagrad"}),
}


# ---- launcher ----


def launch_update(kernel, table, bases, flags: dict, gmul=None, gmul_inv: bool = False,
                  found_inf=None):
    """Run an update kernel over a bucket's :class:`StepTable` (``bases``: one tensor per role,
    this step's). ``gmul``: a device scalar multiplying the gradient (its reciprocal with
    ``gmul_inv``); ``found_inf``: GradScaler's device flag."""
    table.sync()
    sc = table.sc
    has_step = table.step_base is not None
    # ALIGNED: role offsets are multiples of 16 elements (table) and every role base is 16-byte
    # aligned, so tensor starts are 16-byte aligned (what _ld's whole-group tail loads need)
    aligned = table.aligned and all(b.data_ptr() % 16 == 0 for b in bases)
    kernel[(table.n_chunks,)](table.ctab, table.cstart, table.buf, sc,
                              gmul if gmul is not None else sc,
                              found_inf if found_inf is not None else sc,
                              table.step_base if has_step else sc,
                              table.counters if has_step else table.ctab,
                              *bases, HAS_GMUL=gmul is not None, GMUL_INV=gmul_inv,
                              HAS_FINF=found_inf is not None, CDT=compute_dtype(table.dtype),
                              F32=table.dtype != torch.float64, ALIGNED=aligned,
                              BLOCK=table.block, num_warps=table.num_warps,
                              **flags)

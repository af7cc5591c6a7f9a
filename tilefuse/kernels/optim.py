"""Multi-tensor optimizer kernels: one launch updates every parameter of a bucket.

Addressing (no flat buffer, no pointer casts): all tensors of one *role* (param, grad, exp_avg, ...)
in a bucket share a dtype, so each role is passed as one base tensor (the one at the lowest
address) and every tensor of that role is reached as ``base + offset`` with an int64 element offset
``(t.data_ptr() - base.data_ptr()) // itemsize``. A per-tensor table ``ttab`` (int64, one row per
tensor: ``[numel, off_role0, off_role1, ...]``) and a per-tensor scalar table ``sc`` (one row of
runtime hyper-parameters per tensor, in the compute dtype: lr, step size, bias corrections...) are
read by every program; a chunk table (``ctab``: tensor index, ``cstart``: first element) maps
program ``pid`` to ``BLOCK`` elements of one tensor. Hyper-parameters that change between steps
therefore never recompile; only the algorithm flags (AMSGRAD, NESTEROV, ...) are ``tl.constexpr``.

Elementwise updates read every tensor as its raw storage range, which is valid because the caller
only batches tensors that are dense with the param's exact strides (see tilefuse.optim._multi).
``GMUL`` (optional device scalar) multiplies the gradient (AMP unscale x clip coefficient);
``FINF`` (optional device scalar, GradScaler's found_inf) turns every load and store off when
non-zero, so an overflowing step is skipped without a host sync.

The chunk prologue, the grad/param load and the param store are shared ``@triton.jit`` helpers
(``_chunk``, ``_load_grad_param``, ``_store_param``); they inline when compiled. The
multi-tensor reductions (grad norms, clip scale) are in
:mod:`tilefuse.kernels.optim_norm` and share the tables built here.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled


@triton.jit
def _chunk(ctab_ptr, cstart_ptr, ttab_ptr, finf_ptr, NCOLS: tl.constexpr, HAS_FINF: tl.constexpr,
           BLOCK: tl.constexpr):
    """Program -> (tensor index t, its ttab row, element indices, mask). When GradScaler's
    found_inf is set (HAS_FINF), the mask is all-false: nothing is loaded or stored."""
    t = tl.load(ctab_ptr + tl.program_id(0)).to(tl.int64)
    row = ttab_ptr + t * NCOLS
    idx = tl.load(cstart_ptr + tl.program_id(0)) + tl.arange(0, BLOCK).to(tl.int64)
    n = tl.load(row)
    if HAS_FINF:
        n = tl.where(tl.load(finf_ptr) == 0, n, 0)
    return t, row, idx, idx < n


@triton.jit
def _load_grad_param(g_ptrs, gmul_ptr, p_ptrs, master_ptrs, mask, MAXIMIZE: tl.constexpr,
                     HAS_MASTER: tl.constexpr, HAS_GMUL: tl.constexpr, CDT: tl.constexpr):
    """Gradient (x AMP unscale/clip coefficient, negated for maximize) and the param (or its fp32
    master copy), in the compute dtype."""
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(CDT)
    if HAS_GMUL:
        g = g * tl.load(gmul_ptr).to(CDT)
    if MAXIMIZE:
        g = -g
    if HAS_MASTER:
        p = tl.load(master_ptrs, mask=mask, other=0.0).to(CDT)
    else:
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(CDT)
    return g, p


@triton.jit
def _store_param(p, p_ptrs, master_ptrs, mask, HAS_MASTER: tl.constexpr):
    if HAS_MASTER:
        tl.store(master_ptrs, p.to(tl.float32), mask=mask)
    tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=mask)


# roles: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq, 5 master
# scalars: lr, weight_decay, 1-beta1, beta2, 1-beta2, eps, lr/bc1, sqrt(bc2), 1-lr*wd
@triton.jit
def adam_kernel(ctab_ptr, cstart_ptr, ttab_ptr, sc_ptr, gmul_ptr, finf_ptr,
                p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr,
                AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_MASTER: tl.constexpr, HAS_GMUL: tl.constexpr, HAS_FINF: tl.constexpr,
                CDT: tl.constexpr, F32: tl.constexpr, BLOCK: tl.constexpr):
    t, row, idx, mask = _chunk(ctab_ptr, cstart_ptr, ttab_ptr, finf_ptr, 7, HAS_FINF, BLOCK)
    p_o = tl.load(row + 1) + idx
    g_o = tl.load(row + 2) + idx
    m_o = tl.load(row + 3) + idx
    v_o = tl.load(row + 4) + idx
    vmax_o = tl.load(row + 5) + idx
    master_o = tl.load(row + 6) + idx
    sc = sc_ptr + t * 9
    wd = tl.load(sc + 1)
    w1 = tl.load(sc + 2)
    beta2 = tl.load(sc + 3)
    omb2 = tl.load(sc + 4)
    eps = tl.load(sc + 5)
    step_size = tl.load(sc + 6)
    bc2_sqrt = tl.load(sc + 7)
    decay = tl.load(sc + 8)
    g, p = _load_grad_param(g_ptr + g_o, gmul_ptr, p_ptr + p_o, master_ptr + master_o, mask,
                            MAXIMIZE, HAS_MASTER, HAS_GMUL, CDT)
    if DECOUPLED:
        p = p * decay
    else:
        g = g + wd * p
    m = tl.load(m_ptr + m_o, mask=mask, other=0.0).to(CDT)
    d = g - m  # torch.lerp's two-branch formula (CPU and CUDA)
    m = tl.where(w1 < 0.5, m + w1 * d, g - d * (1.0 - w1))
    v = tl.load(v_ptr + v_o, mask=mask, other=0.0).to(CDT) * beta2 + omb2 * g * g
    tl.store(m_ptr + m_o, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + v_o, v.to(v_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD:
        v = tl.maximum(tl.load(vmax_ptr + vmax_o, mask=mask, other=0.0).to(CDT), v)
        tl.store(vmax_ptr + vmax_o, v.to(vmax_ptr.dtype.element_ty), mask=mask)
    if F32:  # IEEE-rounded sqrt / div like torch (plain sqrt and / are approximate for fp32)
        upd = tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
    else:
        upd = m / (tl.sqrt(v) / bc2_sqrt + eps)
    p = p - step_size * upd
    _store_param(p, p_ptr + p_o, master_ptr + master_o, mask, HAS_MASTER)


# roles: 0 param, 1 grad, 2 momentum_buffer, 3 master
# scalars: lr, weight_decay, buffer decay (momentum, or 0 on the buffer's first step),
#          grad weight (1-dampening, or 1 on the first step), momentum (for nesterov)
@triton.jit
def sgd_kernel(ctab_ptr, cstart_ptr, ttab_ptr, sc_ptr, gmul_ptr, finf_ptr,
               p_ptr, g_ptr, buf_ptr, master_ptr,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_MASTER: tl.constexpr, HAS_GMUL: tl.constexpr, HAS_FINF: tl.constexpr,
               CDT: tl.constexpr, F32: tl.constexpr, BLOCK: tl.constexpr):
    t, row, idx, mask = _chunk(ctab_ptr, cstart_ptr, ttab_ptr, finf_ptr, 5, HAS_FINF, BLOCK)
    p_o = tl.load(row + 1) + idx
    g_o = tl.load(row + 2) + idx
    buf_o = tl.load(row + 3) + idx
    master_o = tl.load(row + 4) + idx
    sc = sc_ptr + t * 5
    lr = tl.load(sc)
    wd = tl.load(sc + 1)
    g, p = _load_grad_param(g_ptr + g_o, gmul_ptr, p_ptr + p_o, master_ptr + master_o, mask,
                            MAXIMIZE, HAS_MASTER, HAS_GMUL, CDT)
    g = g + wd * p
    if MOMENTUM:
        buf = tl.load(buf_ptr + buf_o, mask=mask, other=0.0).to(CDT) * tl.load(sc + 2) \
            + g * tl.load(sc + 3)
        tl.store(buf_ptr + buf_o, buf.to(buf_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            g = g + tl.load(sc + 4) * buf
        else:
            g = buf
    p = p - lr * g
    _store_param(p, p_ptr + p_o, master_ptr + master_o, mask, HAS_MASTER)


# roles: 0 param, 1 grad, 2 square_avg, 3 grad_avg, 4 momentum_buffer, 5 master
# scalars: lr, weight_decay, alpha, 1-alpha, eps, momentum
@triton.jit
def rmsprop_kernel(ctab_ptr, cstart_ptr, ttab_ptr, sc_ptr, gmul_ptr, finf_ptr,
                   p_ptr, g_ptr, sq_ptr, gavg_ptr, buf_ptr, master_ptr,
                   CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
                   HAS_MASTER: tl.constexpr, HAS_GMUL: tl.constexpr, HAS_FINF: tl.constexpr,
                   CDT: tl.constexpr, F32: tl.constexpr, BLOCK: tl.constexpr):
    t, row, idx, mask = _chunk(ctab_ptr, cstart_ptr, ttab_ptr, finf_ptr, 7, HAS_FINF, BLOCK)
    p_o = tl.load(row + 1) + idx
    g_o = tl.load(row + 2) + idx
    sq_o = tl.load(row + 3) + idx
    gavg_o = tl.load(row + 4) + idx
    buf_o = tl.load(row + 5) + idx
    master_o = tl.load(row + 6) + idx
    sc = sc_ptr + t * 6
    lr = tl.load(sc)
    wd = tl.load(sc + 1)
    alpha = tl.load(sc + 2)
    oma = tl.load(sc + 3)
    eps = tl.load(sc + 4)
    g, p = _load_grad_param(g_ptr + g_o, gmul_ptr, p_ptr + p_o, master_ptr + master_o, mask,
                            MAXIMIZE, HAS_MASTER, HAS_GMUL, CDT)
    g = g + wd * p
    sq = tl.load(sq_ptr + sq_o, mask=mask, other=0.0).to(CDT) * alpha + oma * g * g
    tl.store(sq_ptr + sq_o, sq.to(sq_ptr.dtype.element_ty), mask=mask)
    if CENTERED:
        ga = tl.load(gavg_ptr + gavg_o, mask=mask, other=0.0).to(CDT)
        d = g - ga  # torch.lerp's two-branch formula
        ga = tl.where(oma < 0.5, ga + oma * d, g - d * (1.0 - oma))
        tl.store(gavg_ptr + gavg_o, ga.to(gavg_ptr.dtype.element_ty), mask=mask)
        avg = sq - ga * ga
    else:
        avg = sq
    if F32:
        upd = tl.div_rn(g, tl.sqrt_rn(avg) + eps)
    else:
        upd = g / (tl.sqrt(avg) + eps)
    if MOMENTUM:
        buf = tl.load(buf_ptr + buf_o, mask=mask, other=0.0).to(CDT) * tl.load(sc + 5)
        buf = buf + upd
        tl.store(buf_ptr + buf_o, buf.to(buf_ptr.dtype.element_ty), mask=mask)
        p = p - lr * buf
    else:
        p = p - lr * upd
    _store_param(p, p_ptr + p_o, master_ptr + master_o, mask, HAS_MASTER)


# roles: 0 param, 1 grad, 2 state, 3 master.  ALGO selects the update and its scalars row:
# "lion":    state exp_avg;  scalars: lr, 1-lr*wd, beta1, beta2
# "adagrad": state sum;      scalars: clr (lr after lr_decay), weight_decay, eps
@triton.jit
def single_state_kernel(ctab_ptr, cstart_ptr, ttab_ptr, sc_ptr, gmul_ptr, finf_ptr,
                        p_ptr, g_ptr, s_ptr, master_ptr,
                        ALGO: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr,
                        HAS_GMUL: tl.constexpr, HAS_FINF: tl.constexpr, CDT: tl.constexpr,
                        F32: tl.constexpr, BLOCK: tl.constexpr):
    t, row, idx, mask = _chunk(ctab_ptr, cstart_ptr, ttab_ptr, finf_ptr, 5, HAS_FINF, BLOCK)
    p_o = tl.load(row + 1) + idx
    g_o = tl.load(row + 2) + idx
    s_o = tl.load(row + 3) + idx
    master_o = tl.load(row + 4) + idx
    g, p = _load_grad_param(g_ptr + g_o, gmul_ptr, p_ptr + p_o, master_ptr + master_o, mask,
                            MAXIMIZE, HAS_MASTER, HAS_GMUL, CDT)
    s = tl.load(s_ptr + s_o, mask=mask, other=0.0).to(CDT)
    if ALGO == "lion":
        sc = sc_ptr + t * 4
        lr = tl.load(sc)
        decay = tl.load(sc + 1)
        beta1 = tl.load(sc + 2)
        beta2 = tl.load(sc + 3)
        c = s * beta1 + g * (1.0 - beta1)
        update = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0)).to(CDT)
        p = p * decay - lr * update
        s = s * beta2 + g * (1.0 - beta2)
    else:  # "adagrad"
        tl.static_assert(ALGO == "adagrad")
        sc = sc_ptr + t * 3
        clr = tl.load(sc)
        wd = tl.load(sc + 1)
        eps = tl.load(sc + 2)
        g = g + wd * p
        s = s + g * g
        if F32:
            p = p - clr * tl.div_rn(g, tl.sqrt_rn(s) + eps)
        else:
            p = p - clr * (g / (tl.sqrt(s) + eps))
    tl.store(s_ptr + s_o, s.to(s_ptr.dtype.element_ty), mask=mask)
    _store_param(p, p_ptr + p_o, master_ptr + master_o, mask, HAS_MASTER)


# an optimizer's ``_kernel`` name -> (its update kernel, the constexprs selecting its algorithm)
UPDATES = {
    "adam_kernel": (adam_kernel, {}),
    "sgd_kernel": (sgd_kernel, {}),
    "rmsprop_kernel": (rmsprop_kernel, {}),
    "lion_kernel": (single_state_kernel, {"ALGO": "lion"}),
    "adagrad_kernel": (single_state_kernel, {"ALGO": "adagrad"}),
}


# ---- launchers ----

_CHUNKS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def block_size(numels=()) -> int:
    """Elements per program: 2048 (4 warps) compiled; in the interpreter, where every lane costs
    numpy work, the next power of two of the largest tensor (capped at 4096)."""
    if interpreter_enabled():
        return max(16, min(4096, triton.next_power_of_2(max(numels, default=1))))
    return 2048


def compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def chunk_table(numels, device, block: int):
    """(ctab int32, cstart int64, n_chunks) for tensors of ``numels`` elements; cached by shape."""
    key = (str(device), tuple(numels), block)
    hit = _CHUNKS.get(key)
    if hit is not None:
        _CHUNKS.move_to_end(key)
        return hit
    counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
    total = int(counts.sum())
    ctab = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    cstart = (torch.arange(total) - first[ctab]) * block
    hit = (ctab.to(torch.int32).to(device), cstart.to(device), total)
    _CHUNKS[key] = hit
    if len(_CHUNKS) > 64:
        _CHUNKS.popitem(last=False)
    return hit


def tensor_table(roles):
    """``roles[r][i]``: the tensor of role r for item i (None where the role is unused).

    Returns (bases, ttab) with ``ttab[i] = [numel_i, off_i0, off_i1, ...]`` (int64 element offsets
    from each role's base tensor, the role's tensor at the lowest address). Role 0 must be full.
    """
    first = roles[0]
    n_items = len(first)
    bases, offs = [], []
    for role in roles:
        present = [t for t in role if t is not None]
        if not present:
            bases.append(first[0])
            offs.append([0] * n_items)
            continue
        base = min(present, key=lambda t: t.data_ptr())
        b, size = base.data_ptr(), base.element_size()
        col = []
        for t in role:
            if t is None:
                col.append(0)
                continue
            diff = t.data_ptr() - b
            if diff % size:  # cannot happen for tensors the caller batches (checked there)
                raise RuntimeError("tilefuse.optim: tensor address not aligned to its element size")
            col.append(diff // size)
        bases.append(base)
        offs.append(col)
    rows = [[first[i].numel()] + [col[i] for col in offs] for i in range(n_items)]
    return bases, torch.tensor(rows, dtype=torch.int64)


def launch_update(kernel, roles, scalars, flags: dict, gmul=None, found_inf=None):
    """Run an update kernel over all items of ``roles`` (same device, per-role dtype)."""
    first = roles[0]
    device = first[0].device
    numels = [t.numel() for t in first]
    block = block_size(numels)
    ctab, cstart, n_chunks = chunk_table(numels, device, block)
    bases, ttab = tensor_table(roles)
    ttab = ttab.to(device, non_blocking=True)
    cdt = torch.float64 if first[0].dtype == torch.float64 else torch.float32
    sc = torch.tensor(scalars, dtype=cdt).to(device, non_blocking=True)  # in the compute dtype
    kernel[(n_chunks,)](ctab, cstart, ttab, sc,
                        gmul if gmul is not None else sc,
                        found_inf if found_inf is not None else sc,
                        *bases, HAS_GMUL=gmul is not None, HAS_FINF=found_inf is not None,
                        CDT=compute_dtype(first[0].dtype), F32=cdt == torch.float32, BLOCK=block,
                        num_warps=4, **flags)

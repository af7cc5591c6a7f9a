"""Label-smoothing cross-entropy: loss and gradient of one row per program, no probability tensor.

For a row ``x`` of ``V`` logits, target ``t`` and smoothing ``eps`` (torch's definition)::

    lse   = log(sum_j exp(x_j))                       (online max/sum over BLOCK-wide chunks)
    loss  = (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j)
    dloss/dx_j = softmax_j - (1 - eps) * [j == t] - eps / V

Pass 1 streams the row once, keeping a running max ``m``, running ``sum exp(x - m)`` and
``sum x`` in fp32, so a 32k-50k class row never materialises probabilities. When a gradient is
wanted, pass 2 (same program) streams the row again and writes ``softmax - smoothed one-hot`` in
the logits' dtype: backward is then one multiply by the incoming gradient. Rows whose target is
``ignore_index`` get loss 0 and gradient 0. A target outside ``[0, V)`` yields a NaN loss (the
CPU path validates it eagerly; on GPU that would cost a host sync). With ``COUNT`` every other row
adds 1 to an int32 counter (the denominator of ``reduction='mean'``: no separate
``(target != ignore_index).sum()`` pass).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, split_constexprs


@triton.jit
def cross_entropy_kernel(
    x_ptr, t_ptr, loss_ptr, grad_ptr, count_ptr,
    V, stride_xr, stride_xc, stride_t, stride_gr,
    ignore_index, eps,
    COMPUTE_GRAD: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    tgt = tl.load(t_ptr + row * stride_t).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if tgt == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK):
                c = start + cols
                tl.store(grad_ptr + row * stride_gr + c,
                         tl.zeros((BLOCK,), tl.float32).to(grad_ptr.dtype.element_ty), mask=c < V)
    else:
        if COUNT:
            tl.atomic_add(count_ptr, 1)
        # pass 1: online max / sum-exp, plus sum(x) for the smoothing term and x[target]
        m = tl.full((BLOCK,), -3.0e38, tl.float32)  # finite: no inf - inf on empty lanes
        s = tl.zeros((BLOCK,), tl.float32)
        sx = tl.zeros((BLOCK,), tl.float32)
        xt = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            cm = c < V
            x = tl.load(x_row + c.to(tl.int64) * stride_xc, mask=cm,
                        other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.where(cm, tl.exp(x - m_new), 0.0)
            m = m_new
            sx += tl.where(cm, x, 0.0)
            xt += tl.where(c == tgt, x, 0.0)
        m_row = tl.max(m, axis=0)
        s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
        lse = m_row + tl.log(s_row)
        x_t = tl.sum(xt, axis=0)
        mean_x = tl.sum(sx, axis=0) / V
        loss = lse - x_t
        if eps > 0.0:  # not 0 * (lse - mean): a -inf logit (a masked class) would make it NaN
            loss = (1.0 - eps) * loss + eps * (lse - mean_x)
        valid = (tgt >= 0) & (tgt < V)
        loss = tl.where(valid, loss, float("nan"))
        tl.store(loss_ptr + row, loss)
        if COMPUTE_GRAD:
            # pass 2: softmax - (1 - eps) * onehot - eps / V
            for start in range(0, V, BLOCK):
                c = start + cols
                cm = c < V
                x = tl.load(x_row + c.to(tl.int64) * stride_xc, mask=cm, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - eps / V
                g = tl.where(c == tgt, g - (1.0 - eps), g)
                tl.store(grad_ptr + row * stride_gr + c, g.to(grad_ptr.dtype.element_ty), mask=cm)


def _block(V: int, is_cuda: bool) -> int:
    if interpreter_enabled() or not is_cuda:
        return max(16, min(8192, triton.next_power_of_2(V)))
    return max(128, min(4096, triton.next_power_of_2(V)))


_LAUNCH = launch_cache()


def _launch_params(V: int, is_cuda: bool, compute_grad: bool, count: bool, block: int | None):
    """(constexprs, launch options) of one signature."""
    block = block or _block(V, is_cuda)
    warps = 4 if block <= 1024 else 8 if block <= 2048 else 16
    return split_constexprs(cross_entropy_kernel, _RUNTIME, dict(
        COMPUTE_GRAD=compute_grad, COUNT=count, BLOCK=block, num_warps=warps))


_RUNTIME = cross_entropy_kernel.arg_names.index("COMPUTE_GRAD")


def launch_cross_entropy(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor,
                         grad: torch.Tensor | None, ignore_index: int, label_smoothing: float,
                         block: int | None = None, count: torch.Tensor | None = None) -> None:
    """logits (R, V) any strides, target (R,) integer, loss (R,) fp32, grad (R, V) contiguous
    rows or None (loss only); ``count``: a zeroed int32 tensor that receives the number of rows
    whose target is not ``ignore_index``, or None. The constexprs of a signature are computed
    once (:func:`tilefuse.kernels.launch_cache`)."""
    R, V = logits.shape
    if R == 0:
        return
    has_grad = grad is not None
    has_count = count is not None
    key = (V, logits.is_cuda, has_grad, has_count, block)
    params = _LAUNCH.get(key)
    if params is None:
        params = _LAUNCH[key] = _launch_params(*key)
    consts, opts = params
    sx0, sx1 = logits.stride()
    cross_entropy_kernel[(R,)](
        logits, target, loss, grad if has_grad else loss, count if has_count else loss,
        V, sx0, sx1, target.stride(0), grad.stride(0) if has_grad else 0,
        int(ignore_index), float(label_smoothing), *consts, **opts)

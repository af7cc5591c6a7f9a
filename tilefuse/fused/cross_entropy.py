"""``tilefuse::cross_entropy``: :func:`torch.nn.functional.cross_entropy` with class-index or
class-probability targets, ``weight=``, label smoothing, ``ignore_index`` and every reduction
in the kernels of :mod:`tilefuse.kernels.cross_entropy`.

Forward: the row kernel (loss, ``lse``) and a one-program reduce kernel (mean / sum in a fixed
order, the mean's denominator, the target check flag). Saved for backward: ``lse`` per row (plus
``A = sum_j w_j q'_j`` for probability targets) and 3 scalars, never an ``(R, V)`` tensor.
Backward: one kernel reading the logits and writing ``(softmax - target_dist) * grad_output``,
``grad_output`` read on the device. Forward + backward: 3 launches (4 on CUDA with the device
side target assert).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import backend_of
from tilefuse._validate import check_probability, check_tensor, dense, float_tensor
from tilefuse.fused._fast import autocast_maybe_on, fast_op, needs_grad
from tilefuse.fused.cross_entropy_ref import acc_dtype, check_targets, torch_backward, torch_forward

TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
_TARGET_SET = frozenset(TARGET_DTYPES)
_INT64 = torch.int64
REDUCTIONS = ("mean", "sum", "none")
_kce = None  # tilefuse.kernels.cross_entropy, imported on the first launch (triton is optional)


def _kernels():
    global _kce
    if _kce is None:
        import tilefuse.kernels.cross_entropy as kce

        _kce = kce
    return _kce


# ------------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------------
def _use_torch(logits: Tensor) -> bool:
    return backend_of(logits) == "torch" or logits.dtype == torch.float64


def _xent_impl(logits: Tensor, target: Tensor, weight: Optional[Tensor], label_smoothing: float,
               ignore_index: int, reduction: str, save: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """logits (R, V); target (R,) int64 or (R, V) probabilities -> (loss: () or (R,) in the
    logits' dtype, stats (2, R) = [lse, A] (empty unless ``save``), aux (3,) = [mean
    denominator, sum of the weights, targets-valid flag])."""
    if _use_torch(logits):
        return torch_forward(logits, target, weight, label_smoothing, ignore_index, reduction,
                             save)
    kce = _kce or _kernels()
    R, V = logits.shape
    device = logits.device
    soft = target.dim() == 2
    stats = torch.empty((2, R) if save else (0,), device=device, dtype=torch.float32)
    aux = torch.empty(3, device=device, dtype=torch.float32)
    if reduction == "none":
        rows = loss = torch.empty(R, device=device, dtype=logits.dtype)
    else:
        rows = torch.empty(R, device=device, dtype=torch.float32)
        loss = torch.empty((), device=device, dtype=logits.dtype)
    kce.launch_forward(logits, target, weight, rows, stats if save else None, label_smoothing,
                       ignore_index)
    if not soft or reduction != "none":
        kce.launch_reduce(rows, target, weight, loss, aux, V, ignore_index, reduction)
    if not soft and R:
        if target.is_cpu:
            if float(aux[2]) != 1.0:
                check_targets(target, V, ignore_index, sync=True)
        else:
            torch._assert_async(aux[2], "tilefuse.cross_entropy: target has class indices "
                                        f"outside [0, {V}) that are not ignore_index")
    return loss, stats, aux


def _xent_fake(logits, target, weight, label_smoothing, ignore_index, reduction, save):
    R = logits.shape[0]
    acc = acc_dtype(logits)
    return (logits.new_empty(R if reduction == "none" else ()),
            logits.new_empty((2, R) if save else (0,), dtype=acc), logits.new_empty(3, dtype=acc))


def _bwd_impl(grad_out: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor],
              stats: Tensor, aux: Tensor, label_smoothing: float, ignore_index: int,
              mean: bool) -> Tensor:
    if _use_torch(logits):
        return torch_backward(grad_out, logits, target, weight, stats, aux, label_smoothing,
                               ignore_index, mean)
    grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    (_kce or _kernels()).launch_backward(logits, target, weight, stats, aux, grad_out, grad,
                                         label_smoothing, ignore_index, mean)
    return grad


def _bwd_fake(grad_out, logits, target, weight, stats, aux, label_smoothing, ignore_index, mean):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


cross_entropy_bwd_op = fast_op("cross_entropy_bwd", _bwd_impl, fake=_bwd_fake)


def _setup(ctx, inputs, output):
    logits, target, weight, eps, ignore_index, reduction, save = inputs
    ctx.eps, ctx.ignore_index, ctx.reduction, ctx.saved = eps, ignore_index, reduction, save
    ctx.save_for_backward(logits, target, weight, output[1], output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _g_stats, _g_aux):
    logits, target, weight, stats, aux = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None
    if not ctx.saved and logits.shape[0]:
        raise RuntimeError("tilefuse.cross_entropy: the statistics for backward were not "
                           "saved in forward (was grad mode off?)")
    need = ctx.needs_input_grad
    dx = dq = None
    if need[0]:
        dx = cross_entropy_bwd_op(grad_loss, logits, target, weight, stats, aux, ctx.eps,
                                  ctx.ignore_index, ctx.reduction == "mean")
    if need[1] and target.dim() == 2:  # d loss / d q = -(1 - eps) * w * log_softmax(x) * g
        acc = acc_dtype(logits)
        g = grad_loss.to(acc) / aux[0] if ctx.reduction == "mean" else grad_loss.to(acc)
        logp = logits.to(acc) - stats[0][:, None]
        dq = -(1.0 - ctx.eps) * logp * g.expand(logits.shape[0])[:, None]
        dq = (dq * weight.to(acc) if weight is not None else dq).to(target.dtype)
    return dx, dq, None, None, None, None, None


cross_entropy_op = fast_op("cross_entropy", _xent_impl, fake=_xent_fake, setup_context=_setup,
                           backward=_backward)


def _flat(t: Tensor, shape) -> Tensor:
    """(N, C, d1, ...) -> (N*d1*..., C); (C,) -> (1, C)."""
    if len(shape) == 1:
        return t.unsqueeze(0)
    return t.movedim(1, -1).reshape(-1, shape[1])


def _check_weight(weight, logits: Tensor, C: int) -> None:
    check_tensor("weight", weight, ndim=1)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.shape[0] != C:
        raise ValueError(f"weight must have {C} elements (one per class), got {weight.shape[0]}")
    if weight.device != logits.device:
        raise ValueError(f"weight is on {weight.device} but logits is on {logits.device}")


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean",
                  weight: Optional[Tensor] = None) -> Tensor:
    """:func:`torch.nn.functional.cross_entropy`, fused.

    Args:
        logits: ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)`` (class dim 1, as torch).
        target: class indices (int64/int32/int16/uint8) of shape ``(N,)``, ``()`` or
            ``(N, d1, ...)``; or class probabilities (a float tensor of the logits' shape, e.g.
            MixUp's ``lam * y1 + (1 - lam) * y2``).
        label_smoothing: ``eps`` in [0, 1]; the target distribution becomes
            ``(1-eps) * target + eps/C`` (one-hot for class indices), as torch defines it.
        ignore_index: class-index targets equal to it contribute no loss and no gradient (not
            used with probability targets, as in torch).
        reduction: ``'mean'`` (class indices: divided by the sum of ``weight[target]`` over
            non-ignored targets; probabilities: by ``N*d1*...``), ``'sum'`` or ``'none'``.
        weight: optional ``(C,)`` class weights.

    No ``(N, C)`` tensor is kept for backward: forward stores the per-row log-sum-exp (and, for
    probability targets, the row's weighted target sum); backward re-reads the logits and writes
    the gradient in one kernel. ``(N, C, d1, ...)`` inputs are moved to ``(N*d1*..., C)`` with
    one copy. Out-of-range class indices raise ``ValueError`` for CPU tensors; on CUDA a
    device-side assert fires (no host sync). Under ``torch.autocast`` the logits are cast to
    fp32 and the loss is fp32, as torch does (docs/amp.md).

    >>> import torch, tilefuse
    >>> x, t = torch.randn(4, 10), torch.tensor([1, 0, 9, -100])
    >>> a = tilefuse.ops.cross_entropy(x, t, label_smoothing=0.1)
    >>> b = torch.nn.functional.cross_entropy(x, t, label_smoothing=0.1)
    >>> bool(torch.allclose(a, b, atol=1e-5))
    True
    >>> q = torch.softmax(torch.randn(4, 10), 1)  # class probabilities
    >>> a = tilefuse.ops.cross_entropy(x, q, weight=torch.rand(10))
    >>> a.shape
    torch.Size([])
    """
    float_tensor("logits", logits)
    if logits.dim() < 1:
        check_tensor("logits", logits, min_ndim=1)
    if autocast_maybe_on():
        (logits,) = _autocast.fp32(logits)  # torch: cross_entropy runs in fp32 under autocast
    if not isinstance(target, Tensor):
        check_tensor("target", target, dtypes=TARGET_DTYPES)
    soft = target.dtype.is_floating_point
    if not soft and target.dtype not in _TARGET_SET:
        check_tensor("target", target, dtypes=TARGET_DTYPES)
    eps = label_smoothing
    if type(eps) is not float or not 0.0 <= eps <= 1.0:
        eps = check_probability("label_smoothing", eps)
    if type(ignore_index) is not int and (isinstance(ignore_index, bool)
                                          or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")
    shape = logits.shape
    ndim = len(shape)
    C = shape[0] if ndim == 1 else shape[1]
    if weight is not None:
        _check_weight(weight, logits, C)
        weight = dense(weight)  # (the kernels read weight[class] as ptr + class)
    t_shape = target.shape
    if soft:
        if t_shape != shape:
            raise ValueError(f"target of class probabilities (a float tensor) must have the "
                             f"logits' shape {tuple(shape)}, got {tuple(t_shape)}")
        x2 = logits if ndim == 2 else _flat(logits, shape)
        t1 = target if ndim == 2 else _flat(target, shape)
        out_shape = () if ndim == 1 else (shape[0],) + tuple(shape[2:])
    elif ndim == 2 and len(t_shape) == 1 and t_shape[0] == shape[0]:  # the common form
        x2, t1, out_shape = logits, target, t_shape
    else:
        want = () if ndim == 1 else (shape[0],) + tuple(shape[2:])
        if tuple(t_shape) != want:
            raise ValueError(f"target must have shape {want} for logits of shape "
                             f"{tuple(shape)}, got {tuple(t_shape)}")
        x2, t1, out_shape = _flat(logits, shape), target.reshape(-1), t_shape
    if not soft and t1.dtype != _INT64:
        t1 = t1.long()
    save = needs_grad(logits, target) if soft else needs_grad(logits)
    loss, _, _ = cross_entropy_op(x2, t1, weight, eps, ignore_index, reduction, save)
    if reduction == "none" and ndim != 2:
        loss = loss.reshape(out_shape)
    return loss

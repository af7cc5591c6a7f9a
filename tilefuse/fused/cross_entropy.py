"""``tilefuse::cross_entropy``: label-smoothing cross-entropy with the gradient computed in the
forward kernel (see :mod:`tilefuse.kernels.cross_entropy`).

The op returns the reduced loss (fp32; per-row losses for ``reduction='none'``) and, when a
gradient is needed, ``dloss_row/dlogits`` in the logits' dtype. The reduction (mean over
non-ignored rows / sum / none) runs inside the op with torch ops on the small (R,) loss vector;
backward applies the reduction's derivative to the incoming gradient (the same ops, in the same
order, that autograd would run through ``sum``/``div``/``where``) and multiplies the stored
gradient by it: one autograd node per call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import backend_of
from tilefuse._validate import check_probability, check_tensor, float_tensor
from tilefuse.fused._fast import autocast_maybe_on, fast_op, needs_grad

TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
_TARGET_SET = frozenset(TARGET_DTYPES)
_INT64, _INT32 = torch.int64, torch.int32
_kce = None  # tilefuse.kernels.cross_entropy, imported on the first launch (triton is optional)


def _torch_rows(logits: Tensor, target: Tensor, eps: float, ignore_index: int, want_grad: bool):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    V = x.shape[1]
    ignored = target == ignore_index
    t = torch.where(ignored, 0, target)
    logp = torch.log_softmax(x, dim=1)
    nll = -logp.gather(1, t[:, None]).squeeze(1)
    # eps == 0 skips the smoothing term: 0 * inf would turn a -inf logit's finite loss into NaN
    loss = (1.0 - eps) * nll - eps * logp.mean(dim=1) if eps > 0 else nll
    loss = loss.masked_fill(ignored, 0.0)
    grad = logits.new_empty(0)
    if want_grad:
        g = logp.exp() - eps / V
        g.scatter_add_(1, t[:, None], torch.full_like(g[:, :1], -(1.0 - eps)))
        grad = g.masked_fill(ignored[:, None], 0.0).to(logits.dtype)
    return loss.float() if acc == torch.float32 else loss, grad


def _loss_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def check_targets(target: Tensor, V: int, ignore_index: int, sync: Optional[bool] = None) -> None:
    """Class indices must be in ``[0, V)`` or ``ignore_index``. CPU (``sync``): a ``ValueError``
    naming the bad indices. Other devices: a device-side ``torch._assert_async`` (no host sync;
    the error surfaces at the next synchronisation, as torch's own CUDA index asserts do)."""
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)
    if sync is None:
        sync = target.device.type == "cpu"
    if sync:
        if bool(bad.any()):
            raise ValueError(f"target has class indices outside [0, {V}) that are not "
                             f"ignore_index={ignore_index}: {target[bad][:5].tolist()}")
    else:
        torch._assert_async(~bad.any(), f"tilefuse.cross_entropy: target has class indices "
                                        f"outside [0, {V}) that are not ignore_index")


def _kernels():
    global _kce
    if _kce is None:
        import tilefuse.kernels.cross_entropy as kce

        _kce = kce
    return _kce


REDUCTIONS = ("mean", "sum", "none")


def _reduce(rows: Tensor, target: Tensor, ignore_index: int, reduction: str,
            count: Optional[Tensor] = None):
    """(reduced loss, sum of the rows or None for 'none'). ``count``: the number of targets
    that are not ``ignore_index`` when the kernel counted them (0-d), else computed here."""
    if reduction == "none":
        return rows, None
    total = rows.sum()
    if reduction == "sum":
        return total, total
    if count is None:
        count = (target != ignore_index).sum()
    # every target ignored: the loss is NaN (0/0) as in torch (and the gradient 0: _backward)
    return torch.where(count > 0, total / count, float("nan")), total


def _xent_impl(logits: Tensor, target: Tensor, label_smoothing: float, ignore_index: int,
               reduction: str, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """logits (R, V), target (R,) int -> (loss: () for 'mean'/'sum', (R,) for 'none';
    dloss_row/dlogits (R, V) or empty).

    Targets are checked with :func:`check_targets`: before the torch path (its gather needs
    valid indices), asynchronously on the device before a GPU launch, and on CPU after the
    launch, only when the losses sum to NaN (the kernel writes NaN for a row whose target is
    out of range, so a NaN-free sum proves every target valid: one host read of the sum)."""
    R, V = logits.shape
    if backend_of(logits) == "torch" or logits.dtype == torch.float64:
        check_targets(target, V, ignore_index)
        rows, grad = _torch_rows(logits, target, label_smoothing, ignore_index, compute_grad)
        return _reduce(rows, target, ignore_index, reduction)[0], grad
    sync = target.is_cpu
    if not sync:
        check_targets(target, V, ignore_index, sync=False)
    device = logits.device
    rows = torch.empty(R, device=device, dtype=torch.float32)
    grad = torch.empty((R, V), device=device, dtype=logits.dtype) if compute_grad else None
    count = torch.zeros((), device=device, dtype=_INT32) if reduction == "mean" else None
    (_kce or _kernels()).launch_cross_entropy(logits, target, rows, grad, ignore_index,
                                              label_smoothing, count=count)
    loss, total = _reduce(rows, target, ignore_index, reduction, count)
    if sync and R:
        total = float(total if total is not None else rows.sum())
        if total != total:  # NaN: an out-of-range target (ValueError here) or a NaN logit
            check_targets(target, V, ignore_index, sync=True)
    return loss, (grad if grad is not None else logits.new_empty(0))


def _xent_fake(logits, target, label_smoothing, ignore_index, reduction, compute_grad):
    R, V = logits.shape
    grad = logits.new_empty((R, V)) if compute_grad else logits.new_empty(0)
    return logits.new_empty(R if reduction == "none" else (), dtype=_loss_dtype(logits)), grad


def _setup(ctx, inputs, output):
    ctx.reduction, ctx.ignore_index, ctx.rows = inputs[4], inputs[3], inputs[0].shape[0]
    ctx.save_for_backward(output[1], inputs[1] if inputs[4] == "mean" else None)
    ctx.set_materialize_grads(False)  # no (R, V) zeros for the unused gradient output


def _backward(ctx, grad_loss, grad_grad):
    g, target = ctx.saved_tensors
    if grad_loss is None:  # only the (internal) gradient output was used
        return None, None, None, None, None, None
    if not g.numel():
        if g.dim() != 2 and ctx.rows:  # the 1-D placeholder: compute_grad was False
            raise RuntimeError("tilefuse.cross_entropy: the gradient was not computed in "
                               "forward (was grad mode off?)")
        return g, None, None, None, None, None
    if ctx.reduction == "none":
        scale = grad_loss[:, None]
    elif ctx.reduction == "sum":  # d sum: the gradient broadcast to every row
        scale = grad_loss
    else:  # d where(count > 0, total / max(count, 1), nan), as autograd computes it
        count = (target != ctx.ignore_index).sum()
        scale = torch.where(count > 0, grad_loss, 0.0) / count.clamp_min(1)
    return g * scale.to(g.dtype), None, None, None, None, None


cross_entropy_op = fast_op("cross_entropy", _xent_impl, fake=_xent_fake, setup_context=_setup,
                           backward=_backward)


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """:func:`torch.nn.functional.cross_entropy` with class-index targets, fused.

    Args:
        logits: ``(N, C)``, ``(C,)`` or ``(N, C, d1, ...)`` (class dim 1, as torch).
        target: int64/int32 class indices of shape ``(N,)``, ``()`` or ``(N, d1, ...)``.
        label_smoothing: ``eps`` in [0, 1]; the target becomes ``(1-eps)*onehot + eps/C``.
        ignore_index: targets equal to it contribute no loss and no gradient.
        reduction: ``'mean'`` (over non-ignored targets), ``'sum'`` or ``'none'``.

    The loss and its gradient come out of one kernel pass; no probability tensor is stored.
    Memory: when a gradient is needed the forward writes ``dloss/dlogits`` as an ``(R, C)``
    tensor in the logits' dtype (``R`` = number of rows) and keeps it until backward, which only
    rescales it: the same size as the logits (as much as the softmax torch saves). Without grad
    (``torch.no_grad`` or logits not requiring grad) only the ``(R,)`` losses are written.
    ``(N, C, d1, ...)`` logits are moved to ``(N*d1*..., C)`` with one copy.

    Out-of-range targets (neither in ``[0, C)`` nor ``ignore_index``) raise ``ValueError`` for
    CPU tensors; on CUDA a device-side assert fires (no host sync), surfacing as a
    ``RuntimeError`` at the next synchronisation.

    Under ``torch.autocast`` the logits are cast to fp32 and the loss is fp32, as torch does for
    ``cross_entropy`` (docs/amp.md).

    >>> import torch, tilefuse
    >>> x, t = torch.randn(4, 10), torch.tensor([1, 0, 9, -100])
    >>> a = tilefuse.ops.cross_entropy(x, t, label_smoothing=0.1)
    >>> b = torch.nn.functional.cross_entropy(x, t, label_smoothing=0.1)
    >>> bool(torch.allclose(a, b, atol=1e-5))
    True
    """
    float_tensor("logits", logits)
    if logits.dim() < 1:
        check_tensor("logits", logits, min_ndim=1)
    if autocast_maybe_on():
        (logits,) = _autocast.fp32(logits)  # torch: cross_entropy runs in fp32 under autocast
    if not isinstance(target, Tensor) or target.dtype not in _TARGET_SET:
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
    t_shape = target.shape
    if ndim == 2 and len(t_shape) == 1 and t_shape[0] == shape[0]:  # the common form
        x2, t1 = logits, target
    else:
        want = () if ndim == 1 else (shape[0],) + tuple(shape[2:])
        if tuple(t_shape) != want:
            raise ValueError(f"target must have shape {want} for logits of shape "
                             f"{tuple(shape)}, got {tuple(t_shape)}")
        if ndim == 1:
            x2, t1 = logits.unsqueeze(0), target.reshape(1)
        else:
            x2 = logits.movedim(1, -1).reshape(-1, shape[1])
            t1 = target.reshape(-1)
    if t1.dtype != _INT64:
        t1 = t1.long()
    loss, _ = cross_entropy_op(x2, t1, eps, ignore_index, reduction, needs_grad(logits))
    if reduction == "none" and ndim != 2:
        loss = loss.reshape(t_shape)
    return loss if loss.dtype == logits.dtype else loss.to(logits.dtype)

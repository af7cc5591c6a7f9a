"""``tilefuse::cross_entropy``: label-smoothing cross-entropy with the gradient computed in the
forward kernel (see :mod:`tilefuse.kernels.cross_entropy`).

The op returns per-row losses (fp32) and, when a gradient is needed, ``dloss_row/dlogits`` in the
logits' dtype; backward multiplies it by the incoming per-row gradient. The reduction
(mean over non-ignored rows / sum / none) is done by the public wrapper with torch ops on the
small (R,) loss vector, so autograd through it is exact for every reduction.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import backend_for
from tilefuse._validate import FLOAT_DTYPES_F64, check_probability, check_tensor


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


@torch.library.custom_op("tilefuse::cross_entropy", mutates_args=())
def cross_entropy_op(logits: Tensor, target: Tensor, label_smoothing: float, ignore_index: int,
                     compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """logits (R, V), target (R,) int -> (loss per row (R,), dloss/dlogits (R, V) or empty)."""
    R, V = logits.shape
    check_targets(target, V, ignore_index)
    if backend_for(logits) == "torch" or logits.dtype == torch.float64:
        return _torch_rows(logits, target, label_smoothing, ignore_index, compute_grad)
    from tilefuse.kernels.cross_entropy import launch_cross_entropy

    loss = torch.empty(R, device=logits.device, dtype=torch.float32)
    grad = torch.empty((R, V), device=logits.device, dtype=logits.dtype) if compute_grad else None
    launch_cross_entropy(logits, target, loss, grad, ignore_index, label_smoothing)
    return loss, (grad if grad is not None else logits.new_empty(0))


@cross_entropy_op.register_fake
def _(logits, target, label_smoothing, ignore_index, compute_grad):
    R, V = logits.shape
    grad = logits.new_empty((R, V)) if compute_grad else logits.new_empty(0)
    return logits.new_empty(R, dtype=_loss_dtype(logits)), grad


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_grad):
    (g,) = ctx.saved_tensors
    if g.numel() == 0 and grad_loss is not None and grad_loss.numel() != 0:
        raise RuntimeError("tilefuse.cross_entropy: the gradient was not computed in forward "
                           "(was grad mode off?)")
    dlogits = (g * grad_loss[:, None].to(g.dtype)) if g.numel() else g
    return dlogits, None, None, None, None


cross_entropy_op.register_autograd(_backward, setup_context=_setup)


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
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    (logits,) = _autocast.fp32(logits)  # torch: cross_entropy runs in fp32 under autocast
    check_tensor("target", target, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
    eps = check_probability("label_smoothing", label_smoothing)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")
    if logits.dim() == 1:
        want = ()
    else:
        want = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != want:
        raise ValueError(f"target must have shape {want} for logits of shape "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    C = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if logits.dim() == 1:
        x2, t1 = logits.unsqueeze(0), target.reshape(1)
    elif logits.dim() == 2:
        x2, t1 = logits, target
    else:
        x2 = logits.movedim(1, -1).reshape(-1, C)
        t1 = target.reshape(-1)
    t1 = t1.long()
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    rows, _ = cross_entropy_op(x2, t1, eps, ignore_index, bool(need_grad))
    if reduction == "none":
        return rows.reshape(want).to(logits.dtype)
    total = rows.sum()
    if reduction == "sum":
        return total.to(logits.dtype)
    count = (t1 != ignore_index).sum()
    # every target ignored: the loss is NaN (0/0) as in torch, and the gradient 0 (not 0 * inf)
    mean = torch.where(count > 0, total / count.clamp_min(1), float("nan"))
    return mean.to(logits.dtype)

"""Torch reference of the cross-entropy kernels (torch backend, fp64 logits): the formulas of
:mod:`tilefuse.kernels.cross_entropy` written with torch ops, and the class-index check."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_targets(target: Tensor, V: int, ignore_index: int, sync: Optional[bool] = None) -> None:
    """Class indices must be in ``[0, V)`` or ``ignore_index``. CPU (``sync``): a ``ValueError``
    naming the bad indices. Other devices: a device-side ``torch._assert_async`` (no host sync;
    the error surfaces at the next synchronisation, as torch's own CUDA index asserts do)."""
    if target.numel() == 0:
        return
    if sync is None:
        sync = target.device.type == "cpu"
    if sync:
        lo, hi = torch.aminmax(target)  # one pass (~2 us); the mask below only when needed
        if int(lo) >= 0 and int(hi) < V:
            return
    bad = ((target < 0) | (target >= V)) & (target != ignore_index)
    if sync:
        if bool(bad.any()):
            raise ValueError(f"target has class indices outside [0, {V}) that are not "
                             f"ignore_index={ignore_index}: {target[bad][:5].tolist()}")
    else:
        torch._assert_async(~bad.any(), f"tilefuse.cross_entropy: target has class indices "
                                        f"outside [0, {V}) that are not ignore_index")


def acc_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# torch reference (torch backend, fp64): the kernels' formulas with torch ops
# ------------------------------------------------------------------------------------------------
def _torch_dist(target, weight, eps, V, acc):
    """Probability targets: q' * w (smoothed, weighted)."""
    q = target.to(acc)
    if eps > 0.0:
        q = q * (1.0 - eps) + eps / V
    return q * weight.to(acc) if weight is not None else q


def _torch_hard(target, weight, ignore_index, acc):
    ignored = target == ignore_index
    tc = torch.where(ignored, 0, target)
    if weight is not None:
        w_t = weight.to(acc)[tc]
    else:
        w_t = torch.ones(tc.shape, dtype=acc, device=tc.device)
    return tc, w_t.masked_fill(ignored, 0.0), ignored


def torch_forward(logits, target, weight, eps, ignore_index, reduction, save=True):
    acc = acc_dtype(logits)
    x = logits.to(acc)
    R, V = x.shape
    lse = torch.logsumexp(x, 1)
    aux = torch.ones(3, dtype=acc, device=x.device)
    if target.dim() == 2:
        q = _torch_dist(target, weight, eps, V, acc)
        a = q.sum(1)
        rows = a * lse - (q * x).sum(1)
        aux[0] = R
    else:
        check_targets(target, V, ignore_index)
        tc, w_t, ignored = _torch_hard(target, weight, ignore_index, acc)
        a = torch.zeros_like(lse)
        rows = w_t * (lse - x.gather(1, tc[:, None]).squeeze(1))
        if eps > 0.0:
            big_w = weight.to(acc).sum() if weight is not None else V
            wx = (x * weight.to(acc)).sum(1) if weight is not None else x.sum(1)
            rows = (1.0 - eps) * rows + eps * (lse * big_w - wx) / V
            aux[1] = big_w
        rows = rows.masked_fill(ignored, 0.0)
        aux[0] = w_t.sum()
    loss = rows if reduction == "none" else rows.sum()
    if reduction == "mean":
        loss = loss / aux[0]
    stats = torch.stack([lse, a]) if save else lse.new_empty(0)
    return loss.to(logits.dtype), stats, aux


def torch_backward(grad_out, logits, target, weight, stats, aux, eps, ignore_index, mean):
    acc = acc_dtype(logits)
    x = logits.to(acc)
    V = x.shape[1]
    g = grad_out.to(acc)
    if mean:
        g = g / aux[0]
    g = g.expand(x.shape[0])[:, None]
    p = torch.exp(x - stats[0][:, None])
    if target.dim() == 2:
        d = p * (stats[1][:, None] * g) - _torch_dist(target, weight, eps, V, acc) * g
    else:
        tc, w_t, ignored = _torch_hard(target, weight, ignore_index, acc)
        hit = (1.0 - eps) * w_t[:, None] * g
        coef = hit + eps * aux[1] / V * g if eps > 0.0 else hit
        d = p * coef
        d.scatter_add_(1, tc[:, None], -hit)
        if eps > 0.0:
            d = d - eps / V * g * (weight.to(acc) if weight is not None else 1.0)
        d = d.masked_fill(ignored[:, None], 0.0)
    return d.to(logits.dtype)

"""Batch-level regularizers: :func:`mixup`, :func:`cutout`, :func:`drop_block2d` and a
scheduled-dropout helper (:func:`dropout_schedule`, :class:`ScheduledDropout`).

Randomness comes from the torch generators (``torch.manual_seed`` reproduces, ``fork_rng``
isolates): per-batch scalars and permutations from the default CPU generator, per-element noise
from the generator of the tensor's device.

Kernel choice (documented in ``docs/regularization.md``): mixup's image blend runs as one
Triton pass (``tilefuse::mixup``: 2 reads + 1 write per element, vs eager's gather copy + lerp,
5 passes); cutout (one broadcast compare + ``masked_fill``) and DropBlock (one Bernoulli draw +
one ``max_pool2d`` + one multiply) are plain, fully vectorised torch: a kernel would not remove
passes there. No Python loop per image anywhere. GPU timings: unmeasured.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tilefuse._validate import FLOAT_DTYPES_F64, check_probability, check_tensor
from tilefuse.fused.dropout import mixup_op
from tilefuse.nn.dropout import Dropout

__all__ = ["mixup", "cutout", "drop_block2d", "dropout_schedule", "ScheduledDropout"]


def mixup(x: Tensor, y: Tensor, alpha: float = 1.0,
          num_classes: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Mixup (Zhang et al. 2018): ``x' = lam*x + (1-lam)*x[perm]``, same for the targets, with
    ``lam ~ Beta(alpha, alpha)`` and ``perm`` a random permutation of the batch.

    ``y`` is either integer class indices ``(N,)`` (then ``num_classes`` is required and the
    mixed targets are soft ``(N, num_classes)`` probabilities) or already-soft float targets
    ``(N, ...)``. The soft targets go straight into :func:`tilefuse.ops.cross_entropy` as
    class probabilities (fused: label smoothing and class weights included, gradient in one
    kernel; docs/regularization.md), or into :func:`torch.nn.functional.cross_entropy`.

    >>> import torch, tilefuse, tilefuse.regularize as R
    >>> xm, ym = R.mixup(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), 0.4, num_classes=3)
    >>> xm.shape, ym.shape, bool(torch.allclose(ym.sum(1), torch.ones(4)))
    (torch.Size([4, 3]), torch.Size([4, 3]), True)
    >>> logits = torch.randn(4, 3)
    >>> loss = tilefuse.ops.cross_entropy(logits, ym, label_smoothing=0.1)
    >>> bool(torch.allclose(loss, torch.nn.functional.cross_entropy(logits, ym,
    ...                                                             label_smoothing=0.1)))
    True
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    check_tensor("y", y, min_ndim=1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive float, got {alpha!r}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has batch size {y.shape[0]} but x has {x.shape[0]}")
    if not y.is_floating_point():
        if num_classes is None or isinstance(num_classes, bool) or not isinstance(
                num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int when y holds class indices, "
                             f"got {num_classes!r}")
        if y.dim() != 1:
            raise ValueError(f"integer y must be 1-D (N,), got shape {tuple(y.shape)}")
        y = F.one_hot(y.long(), num_classes).to(x.dtype)
    alpha = float(alpha)
    lam = float(torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha)).sample())
    perm = torch.randperm(x.shape[0]).to(x.device)
    x_mix = mixup_op(x, perm, lam)  # one Triton pass (torch.lerp on the torch backend)
    y_mix = torch.lerp(y.index_select(0, perm), y, lam)
    return x_mix, y_mix


def cutout(x: Tensor, size: int, p: float = 1.0) -> Tensor:
    """Cutout (DeVries & Taylor 2017): zero one ``size x size`` square per image of ``(N, C, H,
    W)`` ``x``, centred uniformly in the image (the square is clipped at the borders), applied to
    each image with probability ``p``. Batch-wise, no loop per image; works for channels_last.

    >>> import torch, tilefuse.regularize as R
    >>> y = R.cutout(torch.ones(2, 3, 8, 8), size=4)
    >>> int((y[0, 0] == 0).sum()) <= 16
    True
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES_F64, ndim=4)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    p = check_probability("p", p)
    N, _, H, W = x.shape
    if N == 0 or size == 0 or p == 0.0:
        return x.clone()
    cy = torch.randint(0, H, (N,)).to(x.device)
    cx = torch.randint(0, W, (N,)).to(x.device)
    apply = (torch.rand(N) < p).to(x.device)
    lo_y, lo_x = cy - size // 2, cx - size // 2
    hh = torch.arange(H, device=x.device)
    ww = torch.arange(W, device=x.device)
    in_y = (hh[None, :] >= lo_y[:, None]) & (hh[None, :] < lo_y[:, None] + size)  # (N, H)
    in_x = (ww[None, :] >= lo_x[:, None]) & (ww[None, :] < lo_x[:, None] + size)  # (N, W)
    drop = in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None]              # (N, H, W)
    return x.masked_fill(drop[:, None], 0.0)


def drop_block2d(x: Tensor, p: float, block_size: int, training: bool = True,
                 eps: float = 1e-6) -> Tensor:
    """Functional DropBlock on ``(N, C, H, W)``: block centres ~ Bernoulli(gamma) with
    ``gamma = p*H*W / (bs^2 * (H-bs+1) * (W-bs+1))``, each centre drops a ``bs x bs`` square, and
    the output is rescaled by ``numel / kept`` (torchvision's ``drop_block2d``)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES_F64, ndim=4)
    p = check_probability("p", p)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    N, C, H, W = x.shape
    bs = min(block_size, H, W)
    gamma = (p * H * W) / ((bs ** 2) * ((H - bs + 1) * (W - bs + 1)))
    noise = torch.empty((N, C, H - bs + 1, W - bs + 1), device=x.device, dtype=x.dtype)
    noise.bernoulli_(min(gamma, 1.0))
    noise = F.pad(noise, [bs // 2] * 4, value=0)
    noise = F.max_pool2d(noise, stride=(1, 1), kernel_size=(bs, bs), padding=bs // 2)
    keep = 1 - noise[:, :, :H, :W]
    # the count in fp32/fp64 (an fp16 sum overflows past 65504 kept elements) and scale 0 when
    # nothing is kept (numel / eps overflows fp16: 0 * inf would be NaN)
    kept = keep.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    scale = torch.where(kept > 0, keep.numel() / (eps + kept), 0.0).to(x.dtype)
    return x * keep * scale


def dropout_schedule(step: int, p_final: float, warmup_steps: int, p_start: float = 0.0,
                     kind: str = "linear") -> float:
    """Dropout probability at ``step``: ramps from ``p_start`` to ``p_final`` over
    ``warmup_steps`` (``kind`` = ``'linear'`` or ``'cosine'``), then stays at ``p_final``."""
    p_final = check_probability("p_final", p_final)
    p_start = check_probability("p_start", p_start)
    if kind not in ("linear", "cosine"):
        raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
    if warmup_steps <= 0 or step >= warmup_steps:
        return p_final
    t = max(step, 0) / warmup_steps
    if kind == "cosine":
        t = 0.5 * (1.0 - math.cos(math.pi * t))
    return p_start + (p_final - p_start) * t


class ScheduledDropout(Dropout):
    """:class:`tilefuse.nn.Dropout` whose ``p`` follows :func:`dropout_schedule`; call
    :meth:`step` once per optimizer step (``p`` starts at ``p_start``).

    >>> import tilefuse.regularize as R
    >>> m = R.ScheduledDropout(0.3, warmup_steps=10)
    >>> for _ in range(5): _ = m.step()
    >>> round(m.p, 3)
    0.15
    """

    def __init__(self, p_final: float = 0.1, warmup_steps: int = 1000, p_start: float = 0.0,
                 kind: str = "linear") -> None:
        super().__init__(dropout_schedule(0, p_final, warmup_steps, p_start, kind))
        self.p_final, self.p_start = p_final, p_start
        self.warmup_steps, self.kind = warmup_steps, kind
        self.num_steps = 0

    def step(self) -> float:
        self.num_steps += 1
        self.p = dropout_schedule(self.num_steps, self.p_final, self.warmup_steps, self.p_start,
                                  self.kind)
        return self.p

    def extra_repr(self) -> str:
        return (f"p={self.p:.4g}, p_final={self.p_final}, warmup_steps={self.warmup_steps}, "
                f"kind={self.kind}")

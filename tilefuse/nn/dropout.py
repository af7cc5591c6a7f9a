"""Drop-in dropout modules: :class:`Dropout`, :class:`Dropout2d` (subclasses of torch's, same
constructor and ``extra_repr``) and :class:`DropBlock2d` (torchvision's semantics).

``inplace=True`` is accepted for drop-in compatibility but the result is always a new tensor
(an in-place write would have to keep the mask or the input for backward; the fused kernel keeps
only a seed).
"""
from __future__ import annotations

import torch

from tilefuse.fused.dropout import dropout, dropout2d


class _FromTorch:
    @classmethod
    def from_torch(cls, module: torch.nn.Module):
        """The same dropout (``p``, ``inplace``, training mode) on the fused kernel."""
        m = cls(module.p, module.inplace)
        m.train(module.training)
        return m


class Dropout(_FromTorch, torch.nn.Dropout):
    """:class:`torch.nn.Dropout` running the fused Philox kernel (no mask stored for backward).

    >>> import torch, tilefuse
    >>> m = tilefuse.nn.Dropout(0.1).eval()
    >>> x = torch.randn(3, 4)
    >>> m(x) is x
    True
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training)


class Dropout2d(_FromTorch, torch.nn.Dropout2d):
    """:class:`torch.nn.Dropout2d`: zeroes whole channels of ``(N, C, H, W)`` / ``(C, H, W)``
    inputs, NCHW or channels_last. A 3-D input is ``(C, H, W)`` as torch documents it; torch
    itself still treats it as ``(N, C, L)`` (with a warning, for backward compatibility), so
    for 3-D inputs the two drop different elements."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout2d(input, self.p, self.training)


class DropBlock2d(torch.nn.Module):
    """DropBlock (Ghiasi et al. 2018): drops ``block_size x block_size`` squares of each feature
    map. ``p`` is the fraction of units to drop; block centres are sampled with the standard gamma
    correction and the output is rescaled by ``numel / kept`` (torchvision's ``DropBlock2d``).

    >>> import torch, tilefuse
    >>> m = tilefuse.nn.DropBlock2d(p=0.2, block_size=3)
    >>> m(torch.ones(2, 4, 8, 8)).shape
    torch.Size([2, 4, 8, 8])
    """

    def __init__(self, p: float = 0.1, block_size: int = 7, eps: float = 1e-6) -> None:
        super().__init__()
        from tilefuse._validate import check_probability

        self.p = check_probability("p", p)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.eps = eps

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from tilefuse.regularize import drop_block2d

        return drop_block2d(input, self.p, self.block_size, self.training, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}"

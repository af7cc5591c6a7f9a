"""``tilefuse.nn.Conv2d``: drop-in for :class:`torch.nn.Conv2d` on the implicit-GEMM kernel, with
a fused activation (and, for ``patch``'s residual rule, a fused residual add + activation)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tilefuse.activations import parse_activation
from tilefuse.fused.conv import conv2d


class Conv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` (same constructor, parameters, ``state_dict`` keys and
    parametrization / ``weight_norm`` behaviour: ``forward`` reads ``self.weight``) whose forward
    is one kernel: ``post_act(act(conv(input) + bias) + residual)``.

    ``activation`` is applied to ``conv + bias``; ``post_activation`` after the optional
    ``residual`` passed to ``forward`` (ResNet's ``relu(bn2(conv2(x)) + identity)`` with the BN
    folded: ``Conv2d(..., post_activation="relu")(x, residual=identity)``). ``padding_mode``
    other than ``'zeros'`` pads with ``F.pad`` first (one extra pass), exactly as torch does.

    >>> import torch, tilefuse
    >>> m = tilefuse.nn.Conv2d(4, 8, 3, padding=1, activation="relu")
    >>> m.load_state_dict(torch.nn.Conv2d(4, 8, 3, padding=1).state_dict())
    <All keys matched successfully>
    >>> m(torch.randn(2, 4, 10, 10)).shape
    torch.Size([2, 8, 10, 10])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, activation=None, post_activation=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.activation = parse_activation(activation)
        self.post_activation = parse_activation(post_activation)

    def _conv_forward(self, input, weight, bias, residual=None):
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups,
                      self.activation, residual, self.post_activation)

    def forward(self, input: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._conv_forward(input, self.weight, self.bias, residual)

    def extra_repr(self) -> str:
        extra = ""
        if self.activation[0] != "none":
            extra += f", activation={_spell(self.activation)}"
        if self.post_activation[0] != "none":
            extra += f", post_activation={_spell(self.post_activation)}"
        return super().extra_repr() + extra

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, bn: Optional[nn.Module] = None, activation=None,
                   post_activation=None) -> "Conv2d":
        """A fused Conv2d computing ``act(bn(conv(x)))`` (``post_activation`` after a residual
        given to ``forward``).

        Without ``bn`` the new module shares ``conv``'s parameters (no copy; parametrizations
        are not carried over: the parametrized value is shared as it is now). With ``bn``, an
        eval-mode :class:`torch.nn.BatchNorm2d` with running statistics, its affine transform is
        folded into new weight/bias parameters (computed in fp64,
        :func:`tilefuse.nn.fold.fold_batchnorm`); a BN in training mode is refused, since it
        normalises with batch statistics that cannot be folded.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        if bn is not None and not isinstance(bn, nn.Identity):
            if not isinstance(bn, nn.BatchNorm2d):
                raise TypeError(f"bn must be a torch.nn.BatchNorm2d or None, got "
                                f"{type(bn).__name__}")
            if bn.training:
                raise ValueError("bn is in training mode: it normalises with batch statistics, "
                                 "which cannot be folded into the conv; call .eval() first")
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device="meta", dtype=conv.weight.dtype, activation=activation,
                post_activation=post_activation)
        if bn is not None and not isinstance(bn, nn.Identity):
            from tilefuse.nn.fold import fold_batchnorm

            w, b = fold_batchnorm(conv, bn)
            rg = conv.weight.requires_grad
            m.weight = nn.Parameter(w, requires_grad=rg)
            m.bias = nn.Parameter(b, requires_grad=rg)
        else:
            m.weight = conv.weight
            m.bias = conv.bias
        return m

    def to_torch(self) -> nn.Module:
        """The plain torch equivalent (``nn.Conv2d`` sharing the parameters, followed by the
        activation module(s) when set; a residual argument has no torch module form)."""
        from tilefuse.activations import activation_module

        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         self.padding_mode, device="meta", dtype=self.weight.dtype)
        conv.weight, conv.bias = self.weight, self.bias
        mods = [activation_module(*a) for a in (self.activation, self.post_activation)
                if a[0] != "none"]
        return nn.Sequential(conv, *mods) if mods else conv


def _spell(act) -> str:
    name, param = act
    return name if name != "leaky_relu" else f"({name!r}, {param})"

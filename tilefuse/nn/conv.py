"""``tilefuse.nn.DepthwiseConv2d`` (drop-in for ``nn.Conv2d(groups=in_channels)``) and
``tilefuse.nn.DepthwiseSeparableConv2d`` (the MobileNet block: depthwise -> BN -> act ->
pointwise 1x1 -> BN -> act, with the pointwise conv on the fused matmul kernel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilefuse.activations import parse_activation, torch_activation
from tilefuse.fused.depthwise import _depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` with ``groups = in_channels`` (same constructor, parameter names
    and ``state_dict``) running the direct depthwise Triton kernel with a fused epilogue
    ``act(conv(x) + bias) (+ residual)``.

    ``groups`` defaults to ``in_channels``; any other value is refused with a ``ValueError``
    (a grouped/dense conv is not depthwise: use ``torch.nn.Conv2d``). ``padding_mode`` other than
    ``'zeros'`` pads with ``F.pad`` first (one extra pass), exactly as torch does.

    >>> import torch, tilefuse
    >>> m = tilefuse.nn.DepthwiseConv2d(8, 8, 3, padding=1, activation="relu6")
    >>> m.load_state_dict(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8).state_dict())
    <All keys matched successfully>
    >>> m(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 8, 10, 10])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups=None, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, activation=None) -> None:
        if groups is None:
            groups = in_channels
        if groups != in_channels:
            raise ValueError(
                f"DepthwiseConv2d needs groups == in_channels ({in_channels}), got groups="
                f"{groups}: that conv is not depthwise; use torch.nn.Conv2d for it")
        if out_channels % in_channels != 0:
            raise ValueError(f"out_channels ({out_channels}) must be a multiple of in_channels "
                             f"({in_channels}) for a depthwise conv")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.activation, self.act_param = parse_activation(activation)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias, activation=None, residual=None,
             channels_last=None) -> torch.Tensor:
        """This module's geometry (stride/padding/dilation/padding_mode) with given parameters."""
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return _depthwise_conv2d(x, weight, bias, self.stride, padding, self.dilation,
                                 activation, residual, channels_last)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(input, self.weight, self.bias, (self.activation, self.act_param), residual)

    def extra_repr(self) -> str:
        extra = "" if self.activation == "none" else f", activation={self.activation}"
        return super().extra_repr() + extra

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, activation=None) -> "DepthwiseConv2d":
        """A DepthwiseConv2d sharing ``conv``'s parameters (no copy); ``ValueError`` if ``conv``
        is not depthwise."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device="meta", dtype=conv.weight.dtype, activation=activation)
        m.weight = conv.weight
        m.bias = conv.bias
        return m


class DepthwiseSeparableConv2d(nn.Module):
    """MobileNet block: ``pw_act(BN(pointwise(act(BN(depthwise(x))))))``.

    * ``depthwise``: :class:`DepthwiseConv2d` (``in_channels -> in_channels``, ``kernel_size``,
      ``stride``, ``padding`` default ``dilation * (kernel_size - 1) // 2``);
    * ``pointwise``: ``nn.Conv2d(in_channels, out_channels, 1)``, computed as
      ``tilefuse.ops.matmul`` on the channels_last view ``(N*H*W, Cin) @ (Cin, Cout)``;
    * ``bn_dw`` / ``bn_pw``: ``BatchNorm2d`` (``norm=True``) or ``Identity``.

    In eval mode (or with ``norm=False``) each BN is folded into its conv per forward and the
    activations run in the kernels' epilogues: two kernels for the whole block. In training mode
    BN needs batch statistics, so it runs as torch's BN between the kernels. The output is
    channels_last. ``activation`` follows the depthwise conv (default ``"relu6"``),
    ``pointwise_activation`` the pointwise one (default ``None``: MobileNetV2's linear
    bottleneck; pass ``"relu"`` for MobileNetV1).

    >>> import torch, tilefuse
    >>> blk = tilefuse.nn.DepthwiseSeparableConv2d(8, 16, 3, stride=2).eval()
    >>> blk(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 16, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=None, dilation=1, bias: bool = False, norm: bool = True,
                 activation="relu6", pointwise_activation=None, device=None, dtype=None) -> None:
        super().__init__()
        if padding is None:
            k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
            d = dilation if isinstance(dilation, int) else dilation[0]
            padding = d * (k - 1) // 2
        fk = dict(device=device, dtype=dtype)
        self.depthwise = DepthwiseConv2d(in_channels, in_channels, kernel_size, stride, padding,
                                         dilation, bias=bias, **fk)
        self.bn_dw = nn.BatchNorm2d(in_channels, **fk) if norm else nn.Identity()
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias, **fk)
        self.bn_pw = nn.BatchNorm2d(out_channels, **fk) if norm else nn.Identity()
        self.activation = parse_activation(activation)
        self.pointwise_activation = parse_activation(pointwise_activation)

    @staticmethod
    def _fold(conv, bn):
        from tilefuse.nn.fold import maybe_fold

        return maybe_fold(conv, bn)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from tilefuse.fused.matmul import matmul

        folded = self._fold(self.depthwise, self.bn_dw)
        if folded is not None:
            y = self.depthwise.conv(input, folded[0], folded[1], self.activation,
                                    channels_last=True)
        else:
            y = self.depthwise.conv(input, self.depthwise.weight, self.depthwise.bias,
                                    channels_last=True)
            y = torch_activation(self.bn_dw(y), *self.activation)
            y = y.contiguous(memory_format=torch.channels_last)
        n, c, h, w = y.shape
        a = y.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: y is channels_last
        folded = self._fold(self.pointwise, self.bn_pw)
        if folded is not None:
            wp, bp = folded
            out = matmul(a, wp.reshape(wp.shape[0], c).t(), bias=bp,
                         activation=self.pointwise_activation)
        else:
            wp = self.pointwise.weight
            out = matmul(a, wp.reshape(wp.shape[0], c).t(), bias=self.pointwise.bias)
        out = out.reshape(n, h, w, -1).permute(0, 3, 1, 2)
        if folded is None:
            out = torch_activation(self.bn_pw(out), *self.pointwise_activation)
        return out

    def fuse(self) -> nn.Module:
        """Eval-mode copy with both BNs folded into the convs' parameters (no per-forward fold)."""
        from tilefuse.nn.fold import fold_batchnorm

        m = DepthwiseSeparableConv2d.__new__(DepthwiseSeparableConv2d)
        nn.Module.__init__(m)
        m.activation, m.pointwise_activation = self.activation, self.pointwise_activation
        m.depthwise = DepthwiseConv2d.from_torch(self.depthwise)
        m.pointwise = nn.Conv2d(self.pointwise.in_channels, self.pointwise.out_channels, 1,
                                device="meta", dtype=self.pointwise.weight.dtype)
        for conv, bn, dst in ((self.depthwise, self.bn_dw, m.depthwise),
                              (self.pointwise, self.bn_pw, m.pointwise)):
            if isinstance(bn, nn.BatchNorm2d):
                w, b = fold_batchnorm(conv, bn)
            else:
                w = conv.weight.detach().clone()
                b = conv.bias.detach().clone() if conv.bias is not None else None
            dst.weight = nn.Parameter(w)
            dst.bias = nn.Parameter(b) if b is not None else None
        m.bn_dw, m.bn_pw = nn.Identity(), nn.Identity()
        return m.eval()

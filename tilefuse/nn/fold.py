"""Fold an eval-mode ``BatchNorm2d`` into the preceding convolution.

``BN(conv(x)) = gamma * (W*x + b - mean) / sqrt(var + eps) + beta``
``           = (s * W) * x + (s * (b - mean) + beta)`` with ``s = gamma / sqrt(var + eps)``,
so the BN disappears into the conv's weight (scaled per output channel) and bias. The fold is
computed in fp64 and cast back to the conv's dtype (one rounding per parameter). Valid only with
the BN's running statistics, i.e. for inference (``bn.eval()``).
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

from tilefuse.activations import activation_module, parse_activation


def _check_pair(conv: nn.Module, bn: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be a torch.nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn has num_features={bn.num_features} but conv has out_channels="
                         f"{conv.out_channels}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): there is "
                         "nothing to fold; BN then normalises with batch statistics")


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(weight, bias)`` of a conv equal to ``bn(conv(x))`` with ``bn`` in eval mode.

    Works for any ``nn.Conv2d`` (depthwise, grouped or dense); the result has the conv's dtype
    and device, and a bias even if the conv had none. Tensors are detached (no autograd).

    >>> import torch
    >>> from tilefuse.nn import fold_batchnorm
    >>> conv, bn = torch.nn.Conv2d(4, 4, 3, groups=4), torch.nn.BatchNorm2d(4).eval()
    >>> w, b = fold_batchnorm(conv, bn)
    >>> w.shape, b.shape
    (torch.Size([4, 1, 3, 3]), torch.Size([4]))
    """
    _check_pair(conv, bn)
    with torch.no_grad():
        w = conv.weight.detach().double()
        c_out = w.shape[0]
        if conv.bias is not None:
            b = conv.bias.detach().double()
        else:
            b = torch.zeros(c_out, dtype=torch.float64, device=w.device)
        mean = bn.running_mean.detach().double()
        var = bn.running_var.detach().double()
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        w_f = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        b_f = (b - mean) * scale + beta
        dtype = conv.weight.dtype
        return w_f.to(dtype), b_f.to(dtype)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels and conv.out_channels % conv.in_channels == 0 \
        and conv.groups > 0


def fuse_conv_bn_eval(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation=None) -> nn.Module:
    """A new conv module equal to ``act(bn(conv(x)))`` with ``bn`` in eval mode (inputs are not
    modified; parameters are new tensors).

    * depthwise convs (``groups == in_channels``) come back as :class:`tilefuse.nn.DepthwiseConv2d`
      (the direct Triton kernel), with ``activation`` fused into its epilogue;
    * any other ``nn.Conv2d`` comes back as a copy of itself (torch's conv) with the folded
      weight/bias; with an ``activation`` it is wrapped as ``nn.Sequential(conv, act)``, since
      there is no fused dense-conv kernel.
    """
    from tilefuse.nn.conv import DepthwiseConv2d

    _check_pair(conv, bn)
    name, param = parse_activation(activation)
    w, b = fold_batchnorm(conv, bn)
    if _is_depthwise(conv):
        fused = DepthwiseConv2d.from_torch(conv, activation=(name, param))
        fused.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
        fused.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
        return fused
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
    if name != "none":
        return nn.Sequential(fused, activation_module(name, param))
    return fused


def maybe_fold(conv: nn.Conv2d, bn: Optional[nn.Module]):
    """(weight, bias) of ``conv`` with ``bn`` folded in when ``bn`` is an eval-mode BatchNorm2d
    with running stats; ``None`` when it cannot be folded (training mode: batch statistics)."""
    if bn is None or isinstance(bn, nn.Identity):
        return conv.weight, conv.bias
    if isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None:
        return _fold_differentiable(conv.weight, conv.bias, bn)
    return None


def _fold_differentiable(weight, bias, bn):
    """The fold in the parameters' dtype, keeping autograd (used per forward in eval)."""
    scale = bn.running_var.to(weight.dtype).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean.to(weight.dtype)
    if bias is not None:
        shift = shift + bias
    b = shift * scale
    if bn.bias is not None:
        b = b + bn.bias
    return weight * scale.reshape(-1, 1, 1, 1), b

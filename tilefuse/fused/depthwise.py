"""Custom ops for depthwise conv2d: ``tilefuse::depthwise_conv2d`` (fused bias/act/residual
epilogue) and ``tilefuse::depthwise_conv2d_backward`` (grad_input and grad_weight).

Backward: when an activation other than relu/relu6 (or any activation with a residual) is fused
and grad is needed, the forward also stores the pre-activation ``z`` (one extra store); relu and
relu6 read their derivative off the output. The backward kernels form ``dz = dy * act'(saved)``
where they read ``dy`` (no elementwise pass): grad_input with the transposed depthwise kernel (a
gather, no atomics), grad_weight and grad_bias in one pass over the output tiles plus a
fixed-order reduction over splits (deterministic): 3 launches.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import backend_of
from tilefuse._validate import (check_broadcastable, check_same_dtype, check_tensor,
                                float_tensor, same_device)
from tilefuse.activations import NAMES, torch_activation, torch_activation_grad
from tilefuse.fused._fast import act_code, autocast_maybe_on, fast_op, lazy_module, needs_grad


_kernels = lazy_module("tilefuse.kernels.depthwise")
_wgrad = lazy_module("tilefuse.kernels.depthwise_wgrad")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _full_padding(H, W, kh, kw, stride, padding, dilation, out_size) -> List[int]:
    """(left, right, top, bottom) for F.pad: bottom/right follow from the output size (may be
    negative: those input rows/cols are never read)."""
    top, left = padding
    bottom = (out_size[0] - 1) * stride[0] + dilation[0] * (kh - 1) + 1 - H - top
    right = (out_size[1] - 1) * stride[1] + dilation[1] * (kw - 1) + 1 - W - left
    return [left, right, top, bottom]


def _out_memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def _fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
              stride: List[int], padding: List[int], dilation: List[int], out_size: List[int],
              activation: int, act_param: float, channels_last: bool,
              save_pre: bool) -> Tuple[Tensor, Tensor]:
    """x (N, C, H, W), weight (C*mult, 1, kh, kw), padding (top, left) -> (out, pre or empty)."""
    N, C, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    fmt = _out_memory_format(channels_last)
    shape = (N, C_out, out_size[0], out_size[1])
    if backend_of(x) == "torch":
        cd = _compute_dtype(x.dtype)
        xp = F.pad(x.to(cd), _full_padding(H, W, kh, kw, stride, padding, dilation, out_size))
        z = F.conv2d(xp, weight.to(cd), None if bias is None else bias.to(cd), stride, 0,
                     dilation, C)
        pre = x.new_empty(0)
        if save_pre:
            pre = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)
            pre.copy_(z)
        y = torch_activation(z, NAMES[activation], act_param)
        if residual is not None:
            y = y + residual.to(cd)
        out = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)
        return out.copy_(y), pre
    y = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    pre = torch.empty_like(y) if save_pre else None
    _kernels().launch_forward(x, weight, y, bias, residual, pre, stride, padding, dilation,
                              activation, act_param)
    return y, (pre if pre is not None else x.new_empty(0))


def _fwd_fake(x, weight, bias, residual, stride, padding, dilation, out_size, activation,
              act_param, channels_last, save_pre):
    shape = (x.shape[0], weight.shape[0], out_size[0], out_size[1])
    fmt = _out_memory_format(channels_last)
    y = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    pre = torch.empty_like(y) if save_pre else x.new_empty(0)
    return y, pre


def _bwd_impl(dy: Tensor, saved: Tensor, x: Tensor, weight: Tensor, stride: List[int],
              padding: List[int], dilation: List[int], activation: int, act_param: float,
              need_input: bool, need_weight: bool,
              need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias; each empty when not needed) for ``dy`` = dL/d(out),
    with ``dz = dy * act'(saved)`` (``saved``: the pre-activation, or the output for relu/relu6,
    see :func:`mask_from_output`) formed inside the kernels: no elementwise pass."""
    N, C, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    dx = dw = db = x.new_empty(0)
    if backend_of(x) == "torch":
        cd = _compute_dtype(x.dtype)
        dz = dy.to(cd)
        if activation != 0:
            dz = dz * torch_activation_grad(saved.to(cd), NAMES[activation], act_param)
        pads = _full_padding(H, W, kh, kw, stride, padding, dilation, dy.shape[2:])
        xp = F.pad(x.to(cd), pads)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dz, xp, weight.to(cd), None, list(stride), [0, 0], list(dilation), False,
            [0, 0], C, [need_input, need_weight, False])
        if need_input:
            dx = torch.empty_like(x).copy_(F.pad(gx, [-p for p in pads]))
        if need_weight:
            dw = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype).copy_(gw)
        if need_bias:
            db = dz.sum(dim=(0, 2, 3)).to(x.dtype)
        return dx, dw, db
    k = _kernels()
    if need_input:
        dx = k.launch_backward_input(dy, weight, torch.empty_like(x), stride, padding, dilation,
                                     saved, activation, act_param)
    if need_weight or need_bias:
        gw, gb = _wgrad().launch_backward_weight(dy, x, (kh, kw), stride, padding, dilation, saved,
                                          activation, act_param, weight.dtype, need_bias)
        if need_weight:
            dw = gw
        if need_bias:
            db = gb
    return dx, dw, db


def _bwd_fake(dy, saved, x, weight, stride, padding, dilation, activation, act_param,
              need_input, need_weight, need_bias):
    dx = torch.empty_like(x) if need_input else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_weight else x.new_empty(0)
    db = x.new_empty((weight.shape[0],)) if need_bias else x.new_empty(0)
    return dx, dw, db


def mask_from_output(activation: int, has_residual: bool) -> bool:
    """relu/relu6 without a residual: the backward reads act'(z) off the output (y > 0,
    0 < y < 6), so the forward stores no pre-activation."""
    return activation in (1, 2) and not has_residual


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, stride, padding, dilation, out_size, activation, act_param,
     channels_last, save_pre) = inputs
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.activation, ctx.act_param = activation, act_param
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    from_out = mask_from_output(activation, residual is not None)
    ctx.set_materialize_grads(False)  # no zeros built for the unused pre output's gradient
    ctx.save_for_backward(x, weight, output[0] if from_out else output[1])


def _act_backward(grad: Tensor, pre: Tensor, activation: int, act_param: float) -> Tensor:
    """dz = grad * act'(pre) as one elementwise pass (used by tilefuse.fused.conv)."""
    from tilefuse.fused.matmul import activation_backward_op

    if pre.dim() == 4 and not pre.is_contiguous() and \
            pre.is_contiguous(memory_format=torch.channels_last):
        # run the elementwise pass in NHWC order: no layout copy of z
        dz = activation_backward_op(grad.permute(0, 2, 3, 1), pre.permute(0, 2, 3, 1),
                                    activation, act_param, pre.dtype)
        return dz.permute(0, 3, 1, 2)
    return activation_backward_op(grad, pre, activation, act_param, pre.dtype)


def _backward(ctx, grad_out, grad_pre):
    x, weight, saved = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 12
    need = ctx.needs_input_grad
    dres = grad_out if (ctx.has_residual and need[3]) else None
    need_bias = bool(ctx.has_bias and need[2])
    if not (need[0] or need[1] or need_bias):
        return None, None, None, dres, None, None, None, None, None, None, None, None
    if ctx.activation != 0 and saved.numel() == 0 and grad_out.numel() != 0:
        raise RuntimeError("tilefuse.depthwise_conv2d: pre-activation was not saved; cannot "
                           "backprop through the fused activation")
    stride, padding, dilation = ctx.conv
    gx, gw, gb = depthwise_conv2d_backward_op(
        grad_out.to(x.dtype), saved, x, weight, stride, padding, dilation, ctx.activation,
        ctx.act_param, bool(need[0]), bool(need[1]), need_bias)
    return (gx if need[0] else None, gw if need[1] else None, gb if need_bias else None, dres,
            None, None, None, None, None, None, None, None)


depthwise_conv2d_backward_op = fast_op("depthwise_conv2d_backward", _bwd_impl, fake=_bwd_fake)
depthwise_conv2d_op = fast_op("depthwise_conv2d", _fwd_impl, fake=_fwd_fake,
                              setup_context=_setup_context, backward=_backward)


# --------------------------------------------------------------------------------------------
# public functional API (re-exported by tilefuse.ops)
# --------------------------------------------------------------------------------------------
def _pair(name: str, v, minimum: int) -> Tuple[int, int]:
    if type(v) is int and v >= minimum:  # the common forms first, no generic checks
        return v, v
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int \
            and v[0] >= minimum and v[1] >= minimum:
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(e, int) and not isinstance(e, bool) for e in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(v)}")
    return int(v[0]), int(v[1])


def resolve_padding(padding, kernel_size, stride, dilation) -> Tuple[int, int, int, int]:
    """torch's ``padding`` (``'same'``, ``'valid'``, int, (ph, pw)) or an explicit
    ``(left, right, top, bottom)`` 4-tuple (F.pad order) -> (left, right, top, bottom)."""
    if type(padding) is int and padding >= 0:
        return padding, padding, padding, padding
    kh, kw = kernel_size
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got "
                             f"{padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions "
                             f"(stride={stride}), as in torch")
        th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
        return tw // 2, tw - tw // 2, th // 2, th - th // 2   # torch puts the extra one last
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding):
            raise ValueError(f"padding 4-tuple must be non-negative ints (left, right, top, "
                             f"bottom), got {padding!r}")
        return tuple(int(p) for p in padding)
    ph, pw = _pair("padding", padding, 0)
    return pw, pw, ph, ph


def _depthwise_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, activation=None,
                      residual=None, channels_last: Optional[bool] = None) -> Tensor:
    float_tensor("x", x)
    if x.dim() != 4 and x.dim() != 3:
        check_tensor("x", x, ndim=(3, 4))
    float_tensor("weight", weight)
    if weight.dim() != 4:
        check_tensor("weight", weight, ndim=4)
    if bias is not None:
        float_tensor("bias", bias)
        if bias.dim() != 1:
            check_tensor("bias", bias, ndim=1)
    if residual is not None:
        float_tensor("residual", residual)
    same_device(x=x, weight=weight, bias=bias, residual=residual)
    if autocast_maybe_on():
        x, weight, bias, residual = _autocast.lower(x, weight, bias, residual)  # conv2d's policy
    dtype = x.dtype
    if weight.dtype != dtype or (bias is not None and bias.dtype != dtype) \
            or (residual is not None and residual.dtype != dtype):
        check_same_dtype(x=x, weight=weight, bias=bias, residual=residual)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    N, C, H, W = x.shape
    C_out, wc, kh, kw = weight.shape
    if wc != 1 or C == 0 or C_out % C != 0 or C_out == 0:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} is not a depthwise weight for {C} input "
            f"channels: expected (C*multiplier, 1, kH, kW) = ({C}*m, 1, kH, kW) with groups = "
            f"in_channels; for other groupings use torch.nn.functional.conv2d")
    if bias is not None and bias.shape[0] != C_out:
        raise ValueError(f"bias must have shape ({C_out},), got {tuple(bias.shape)}")
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    left, right, top, bottom = resolve_padding(padding, (kh, kw), stride, dilation)
    OH = (H + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    OW = (W + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if OH <= 0 or OW <= 0:
        raise ValueError(f"input of spatial size ({H}, {W}) padded by (top={top}, bottom="
                         f"{bottom}, left={left}, right={right}) is smaller than the dilated "
                         f"kernel ({dilation[0] * (kh - 1) + 1}, {dilation[1] * (kw - 1) + 1})")
    act, act_param = act_code(activation)
    out_shape = (N, C_out, OH, OW)
    r4 = None
    if residual is not None:
        if unbatched and residual.dim() == 3:
            residual = residual.unsqueeze(0)
        if residual.shape == out_shape:
            r4 = residual
        else:
            check_broadcastable("residual", residual, out_shape)
            r4 = residual.expand(out_shape)
    if channels_last is None:  # follow the input's layout, as torch's conv does
        channels_last = (C > 1 and not x.is_contiguous()
                         and x.is_contiguous(memory_format=torch.channels_last))
    save_pre = act != 0 and not mask_from_output(act, r4 is not None) \
        and needs_grad(x, weight, bias)
    out, _ = depthwise_conv2d_op(x, weight, bias, r4, list(stride), [top, left], list(dilation),
                                 [OH, OW], act, act_param, bool(channels_last), save_pre)
    return out.squeeze(0) if unbatched else out


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                     padding=0, dilation=1, activation=None,
                     residual: Optional[Tensor] = None) -> Tensor:
    """``act(conv2d(x, weight, bias, groups=C) ) + residual`` in one direct kernel.

    Args:
        x: ``(N, C, H, W)`` or unbatched ``(C, H, W)``; NCHW, channels_last or any strides;
            fp32/fp16/bf16 (fp64 also works).
        weight: ``(C * multiplier, 1, kH, kW)`` (torch's depthwise layout, any kernel size).
        bias: optional ``(C * multiplier,)``.
        stride, dilation: int or pair. padding: ``'same'``, ``'valid'``, int, ``(pH, pW)`` as in
            torch, or an explicit ``(left, right, top, bottom)``.
        activation: ``None``, a name (``"relu"``, ``"relu6"``, ``"silu"``, ``"gelu"``, ...), a
            ``(name, param)`` tuple or a torch activation module.
        residual: optional tensor broadcastable to the output (same dtype), added after act.

    The output is channels_last when ``x`` is, as with torch. Under ``torch.autocast`` all
    floating inputs are cast to the autocast dtype, as torch does for ``conv2d`` (docs/amp.md).

    >>> import torch, tilefuse
    >>> x, w = torch.randn(2, 4, 9, 7), torch.randn(4, 1, 3, 3)
    >>> y = tilefuse.ops.depthwise_conv2d(x, w, padding=1, activation="relu")
    >>> ref = torch.relu(torch.nn.functional.conv2d(x, w, padding=1, groups=4))
    >>> bool(torch.allclose(y, ref, atol=1e-5))
    True
    """
    return _depthwise_conv2d(x, weight, bias, stride, padding, dilation, activation, residual)

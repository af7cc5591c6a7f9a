"""Dense conv2d with a fused epilogue: ``tilefuse::conv2d`` and ``tilefuse::conv2d_backward``.

Forward: one implicit-GEMM kernel (:mod:`tilefuse.kernels.conv_fwd`) computes
``y = post_act(act(conv(x, w) + bias) + residual)``. ``activation`` applies before the residual
add, ``post_activation`` after it: ResNet's ``relu(bn2(conv2(x)) + identity)`` with the BN folded
is ``conv2d(x, w, b, padding=1, residual=identity, post_activation="relu")``.

Backward (saved, not recomputed): when a gradient is needed the forward epilogue also stores
``z = conv + bias`` (only if ``activation`` is set) and ``u = act(z) + residual`` (only if
``post_activation`` is set), one extra store each and no extra pass; recomputing them would cost
a second forward GEMM. The backward runs grad-input and grad-weight as implicit GEMMs
(:mod:`tilefuse.kernels.conv_bwd`, no atomics, deterministic) that form ``dz = g * act'(saved)``
in their operand loads and ``dbias`` inside the grad-weight kernel: no ``dz`` tensor. Only a
needed ``du = dy * post_act'(u)`` (the residual's gradient, or both activations set) is an
elementwise pass (:func:`_backward`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C import _any_requires_grad, is_grad_enabled

from tilefuse import _autocast
from tilefuse._backend import _env_backend, backend_of
from tilefuse._validate import (check_broadcastable, check_same_dtype, float_tensor,
                                optional_float_tensors, same_device)
from tilefuse.activations import NAMES, torch_activation
from tilefuse.fused import conv_plan as _plan
from tilefuse.fused._fast import (act_code, autocast_maybe_on, fast_op, needs_grad, plan_cache,
                                  plans_allowed, tkey)
from tilefuse.fused.depthwise import (_act_backward, _compute_dtype, _full_padding,
                                      _out_memory_format, _pair, resolve_padding)


def _allow_tf32() -> bool:
    # torch's convolutions follow cudnn.allow_tf32 (default True); read at run time, in the op
    return bool(torch.backends.cudnn.allow_tf32)


def _torch_conv2d(x, weight, bias, residual, stride, padding, dilation, groups, out_size,
                  activation, act_param, post, post_param, fmt, save_pre, save_mid):
    H, W = x.shape[2:]
    cd = _compute_dtype(x.dtype)
    pads = _full_padding(H, W, weight.shape[2], weight.shape[3], stride, padding, dilation,
                         out_size)
    z = F.conv2d(F.pad(x.to(cd), pads), weight.to(cd), None if bias is None else bias.to(cd),
                 stride, 0, dilation, groups)

    def out(t):
        return torch.empty(z.shape, device=x.device, dtype=x.dtype, memory_format=fmt).copy_(t)

    pre = out(z) if save_pre else x.new_empty(0)
    u = torch_activation(z, NAMES[activation], act_param)
    if residual is not None:
        u = u + residual.to(cd)
    mid = out(u) if save_mid else x.new_empty(0)
    return out(torch_activation(u, NAMES[post], post_param)), pre, mid


def _conv2d_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                 stride: List[int], padding: List[int], dilation: List[int], groups: int,
                 out_size: List[int], activation: int, act_param: float, post_activation: int,
                 post_param: float, channels_last: bool, save_pre: bool,
                 save_mid: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """x (N, C_in, H, W), weight (C_out, C_in/groups, KH, KW), padding (top, left) ->
    (out, z or empty, u or empty)."""
    fmt = _out_memory_format(channels_last)
    if backend_of(x) == "torch":
        return _torch_conv2d(x, weight, bias, residual, stride, padding, dilation, groups,
                             out_size, activation, act_param, post_activation, post_param, fmt,
                             save_pre, save_mid)
    from tilefuse.kernels.conv_fwd import launch_conv2d_fwd

    if x.is_cuda and channels_last and weight.stride(1) != 1 and weight.shape[1] > 1:
        # channels innermost in the weight too: the B tile's K axis becomes contiguous
        weight = weight.contiguous(memory_format=torch.channels_last)
    shape = (x.shape[0], weight.shape[0], out_size[0], out_size[1])
    y = torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    pre = torch.empty_like(y) if save_pre else None
    mid = torch.empty_like(y) if save_mid else None
    launch_conv2d_fwd(x, weight, y, bias=bias, residual=residual, pre=pre, mid=mid,
                      stride=stride, padding=padding, dilation=dilation, groups=groups,
                      activation=activation, act_param=act_param,
                      post_activation=post_activation, post_param=post_param,
                      allow_tf32=x.is_cuda and _allow_tf32())
    # two distinct empties: custom op outputs may not alias each other
    return (y, pre if pre is not None else x.new_empty(0),
            mid if mid is not None else x.new_empty(0))


def _conv2d_fake(x, weight, bias, residual, stride, padding, dilation, groups, out_size,
                 activation, act_param, post_activation, post_param, channels_last, save_pre,
                 save_mid):
    shape = (x.shape[0], weight.shape[0], out_size[0], out_size[1])
    y = torch.empty(shape, device=x.device, dtype=x.dtype,
                    memory_format=_out_memory_format(channels_last))
    return (y, torch.empty_like(y) if save_pre else x.new_empty(0),
            torch.empty_like(y) if save_mid else x.new_empty(0))


def _conv2d_bwd_impl(g: Tensor, z: Tensor, x: Tensor, weight: Tensor, stride: List[int],
                     padding: List[int], dilation: List[int], groups: int, activation: int,
                     act_param: float, need_input: bool, need_weight: bool,
                     need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias in the accumulation dtype; each empty when not
    needed) for ``dz = g * act'(z)`` (``activation`` 0: ``dz = g``, ``z`` unused). The
    activation gradient is formed in the GEMMs' operand loads and ``dbias`` in the grad-weight
    kernel: no ``dz`` tensor (a ``dz`` pass only for a bias gradient without a weight one)."""
    C_out, _, KH, KW = weight.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx, dw, db = x.new_empty(0), weight.new_empty(0), x.new_empty(0, dtype=acc)
    if backend_of(x) == "torch" or (need_bias and not need_weight):
        dz = _act_backward(g, z, activation, act_param) if activation else g.to(x.dtype)
        if need_bias:
            db = dz.sum(dim=(0, 2, 3), dtype=acc)
        on_torch = backend_of(x) == "torch"
        if on_torch and (need_input or need_weight):
            cd = _compute_dtype(x.dtype)
            pads = _full_padding(x.shape[2], x.shape[3], KH, KW, stride, padding, dilation,
                                 dz.shape[2:])
            gx, gw, _ = torch.ops.aten.convolution_backward(
                dz.to(cd), F.pad(x.to(cd), pads), weight.to(cd), None, list(stride), [0, 0],
                list(dilation), False, [0, 0], groups, [need_input, need_weight, False])
            if need_input:
                dx = torch.empty_like(x).copy_(F.pad(gx, [-p for p in pads]))
            if need_weight:
                dw = gw.to(weight.dtype)
        if on_torch:
            return dx, dw, db
    from tilefuse.kernels.conv_bwd import launch_conv2d_dgrad, launch_conv2d_wgrad

    tf32 = x.is_cuda and _allow_tf32()
    fused = dict(z=z if activation else None, activation=activation, act_param=act_param)
    if need_input:
        dx = launch_conv2d_dgrad(g, weight, torch.empty_like(x), stride, padding, dilation,
                                 groups, allow_tf32=tf32, **fused)
    if need_weight:
        if need_bias:
            db = torch.empty(C_out, device=x.device, dtype=acc)
        dw = launch_conv2d_wgrad(g, x, (KH, KW), stride, padding, dilation, groups,
                                 allow_tf32=tf32, dbias=db if need_bias else None,
                                 **fused).to(weight.dtype)
    return dx, dw, db


def _conv2d_bwd_fake(g, z, x, weight, stride, padding, dilation, groups, activation, act_param,
                     need_input, need_weight, need_bias):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = torch.empty_like(x) if need_input else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    db = x.new_empty((weight.shape[0],) if need_bias else 0, dtype=acc)
    return dx, dw, db


conv2d_backward_op = fast_op("conv2d_backward", _conv2d_bwd_impl, fake=_conv2d_bwd_fake)

_N_INPUTS = 16


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, stride, padding, dilation, groups, _, activation, act_param,
     post, post_param, _, _, _) = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.acts = (activation, act_param, post, post_param)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.set_materialize_grads(False)  # pre/mid are never differentiated: no zero gradients


def _act_grad(grad, saved, code, param, what):
    if saved.numel() == 0 and grad.numel() != 0:
        raise RuntimeError(f"tilefuse.conv2d: the {what} was not saved; cannot backprop through "
                           f"the fused activation")
    return _act_backward(grad, saved, code, param)


def _backward(ctx, grad_out, grad_pre, grad_mid):
    x, weight, pre, mid = ctx.saved_tensors
    if grad_out is None:
        return (None,) * _N_INPUTS
    return input_grads(grad_out, x, weight, pre, mid, ctx.needs_input_grad, ctx.conv, ctx.acts,
                       ctx.has_bias, ctx.has_residual, ctx.bias_dtype) + (None,) * (_N_INPUTS - 4)


def input_grads(grad_out, x, weight, pre, mid, need, conv, acts, has_bias, has_residual,
                bias_dtype):
    """``(dx, dweight, dbias, dresidual)`` (None where not needed) of the op's backward (its
    autograd formula and the per-signature plans' one, :mod:`tilefuse.fused.conv_plan`).

    The activation gradients are fused into the GEMMs' operand loads where one saved tensor
    suffices: ``act`` alone (``dz = dy * act'(z)``), ``post_activation`` alone with no residual
    gradient (``dz = dy * post'(u)``). ``du = dy * post'(u)`` is one elementwise pass when it is
    itself needed: the residual's gradient, or ``act`` and ``post_activation`` both set (then
    ``dz = du * act'(z)`` is fused)."""
    act, act_param, post, post_param = acts
    need_res = bool(has_residual and need[3])
    if post and (act or need_res):
        du = _act_grad(grad_out, mid, post, post_param, "residual sum")
        g, saved, code, param, what = du, pre, act, act_param, "pre-activation"
    elif post:
        du = None
        g, saved, code, param, what = grad_out, mid, post, post_param, "residual sum"
    else:
        du = grad_out
        g, saved, code, param, what = grad_out, pre, act, act_param, "pre-activation"
    dres = du if need_res else None
    need_bias = bool(has_bias and need[2])
    if not (need[0] or need[1] or need_bias):
        return None, None, None, dres
    if code and saved.numel() == 0 and g.numel() != 0:
        raise RuntimeError(f"tilefuse.conv2d: the {what} was not saved; cannot backprop through "
                           f"the fused activation")
    stride, padding, dilation, groups = conv
    gx, gw, gb = conv2d_backward_op(g.to(x.dtype), saved if code else g.new_empty(0), x, weight,
                                    stride, padding, dilation, groups, code, param,
                                    bool(need[0]), bool(need[1]), need_bias)
    return (gx if need[0] else None, gw if need[1] else None,
            gb.to(bias_dtype) if need_bias else None, dres)


conv2d_op = fast_op("conv2d", _conv2d_impl, fake=_conv2d_fake, setup_context=_setup_context,
                    backward=_backward)


# --------------------------------------------------------------------------------------------
# public functional API (re-exported by tilefuse.ops)
# --------------------------------------------------------------------------------------------
def _one(v):
    """torch accepts one-element sequences for stride/padding/dilation."""
    return v[0] if isinstance(v, (tuple, list)) and len(v) == 1 else v


def _resolve_geometry(in_shape, w_shape, stride, padding, dilation, groups):
    if len(in_shape) not in (3, 4):
        raise ValueError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got "
                         f"input of size: {list(in_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), got "
                         f"shape {tuple(w_shape)}")
    if type(groups) is not int:
        if isinstance(groups, bool) or not isinstance(groups, int):
            raise TypeError(f"groups must be an int, got {type(groups).__name__}")
        groups = int(groups)
    if groups <= 0:
        raise ValueError(f"groups must be a positive int (non-positive groups is not supported), "
                         f"got {groups}")
    C_out, cig, KH, KW = w_shape
    C_in, H, W = in_shape[-3:]
    if C_out % groups != 0:
        raise ValueError(f"Given groups={groups}, expected weight to be divisible by {groups} at "
                         f"dimension 0, but got weight of size {list(w_shape)} instead")
    if C_in != cig * groups:
        raise ValueError(f"Given groups={groups}, weight of size {list(w_shape)}, expected "
                         f"input{list(in_shape)} to have {cig * groups} channels, but got "
                         f"{C_in} channels instead")
    stride = _pair("stride", _one(stride), 1)
    dilation = _pair("dilation", _one(dilation), 1)
    left, right, top, bottom = resolve_padding(_one(padding), (KH, KW), stride, dilation)
    OH = (H + top + bottom - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + left + right - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    if OH <= 0 or OW <= 0:
        raise ValueError(f"Calculated padded input size per channel: ({H + top + bottom} x "
                         f"{W + left + right}). Kernel size: ({dilation[0] * (KH - 1) + 1} x "
                         f"{dilation[1] * (KW - 1) + 1}). Kernel size can't be greater than "
                         f"actual input size")
    return [stride[0], stride[1]], [top, left], [dilation[0], dilation[1]], groups, [OH, OW]


_GEOMETRY: dict = {}


def conv_geometry(in_shape, w_shape, stride=1, padding=0, dilation=1, groups=1):
    """Validated ``(stride, (top, left) padding, dilation, groups, (OH, OW))`` of a conv2d with
    torch's argument rules, cached per argument signature (``ValueError``/``TypeError`` naming
    the argument on bad input)."""
    try:
        # (with the types: True == 1 and 1.0 == 1 as dict keys, and bools and floats raise)
        key = (in_shape[-3:], w_shape, _plan.geometry_key(stride, padding, dilation, groups),
               len(in_shape))
        hit = _GEOMETRY.get(key)
    except TypeError:  # unhashable (list) arguments: no cache
        key = hit = None
    if hit is not None:
        return hit
    geo = _resolve_geometry(tuple(in_shape), tuple(w_shape), stride, padding, dilation, groups)
    if key is not None:
        if len(_GEOMETRY) > 4096:
            _GEOMETRY.clear()
        _GEOMETRY[key] = geo
    return geo


def _channels_last(t: Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
           dilation=1, groups: int = 1, activation=None, residual: Optional[Tensor] = None,
           post_activation=None) -> Tensor:
    """``post_act(act(conv2d(input, weight) + bias) + residual)`` in one implicit-GEMM kernel.

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``; channels_last (the fast
            layout), NCHW or any strides; fp32 / fp16 / bf16 / fp64.
        weight: ``(C_out, C_in / groups, kH, kW)``, any strides.
        bias: optional ``(C_out,)`` (e.g. a folded BatchNorm's shift).
        stride, dilation: int or pair. padding: ``'same'`` (stride 1 only, as in torch),
            ``'valid'``, int, ``(pH, pW)``, or an explicit ``(left, right, top, bottom)``.
        groups: grouped convolution (``C_in`` and ``C_out`` divisible by it).
        activation: applied to ``conv + bias`` (a name, ``(name, param)`` or a torch activation
            module; every activation of the matmul epilogue).
        residual: optional tensor broadcastable to the output (same dtype), added after
            ``activation``.
        post_activation: applied after the residual add (ResNet's final ``relu``).

    The output is channels_last when ``input`` or ``weight`` is (as torch's cuDNN conv does),
    else contiguous NCHW. fp32 uses TF32 on CUDA exactly when
    ``torch.backends.cudnn.allow_tf32`` is set, as torch's conv does. Under ``torch.autocast``
    the floating inputs are cast to the autocast dtype like ``conv2d`` and ``residual`` to the
    output dtype (docs/amp.md).

    >>> import torch, tilefuse
    >>> x, w = torch.randn(2, 4, 9, 7), torch.randn(6, 4, 3, 3)
    >>> y = tilefuse.ops.conv2d(x, w, padding=1, activation="relu")
    >>> bool(torch.allclose(y, torch.relu(torch.nn.functional.conv2d(x, w, padding=1)),
    ...                     atol=1e-4))
    True
    """
    if plans_allowed():
        try:  # the signature: every argument that validation, layout and launch depend on
            grad = is_grad_enabled()
            key = (tkey(input), tkey(weight), tkey(bias), tkey(residual), type(input),
                   type(weight), _plan.geometry_key(stride, padding, dilation, groups),
                   activation, post_activation, _env_backend(),
                   input.is_cuda and _allow_tf32(),
                   grad and _any_requires_grad(input, weight, bias),
                   grad and residual is not None and residual.requires_grad)
            plan = _PLANS[key]
        except KeyError:
            return _plan.first_call(_PLANS, key, _conv2d, input, weight, bias, stride, padding,
                                    dilation, groups, activation, residual, post_activation)
        except (TypeError, AttributeError):  # unhashable arguments, non-tensors: validated below
            pass
        else:
            if plan is not None:
                return plan(input, weight, bias, residual)
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, activation, residual,
                   post_activation)


_PLANS = plan_cache()


def _conv2d(input, weight, bias, stride, padding, dilation, groups, activation, residual,
            post_activation):
    """:func:`conv2d` without the plan lookup: validation, autocast, normalisation, the op."""
    float_tensor("input", input)
    float_tensor("weight", weight)
    optional_float_tensors(bias=bias, residual=residual)
    same_device(input=input, weight=weight, bias=bias, residual=residual)
    if autocast_maybe_on() and _autocast.enabled(input):
        input, weight, bias = _autocast.lower(input, weight, bias)
        if residual is not None:
            (residual,) = _autocast.cast(input.dtype, residual)
    dt = input.dtype
    if weight.dtype != dt or (bias is not None and bias.dtype != dt) or \
            (residual is not None and residual.dtype != dt):
        check_same_dtype(input=input, weight=weight, bias=bias, residual=residual)
    stride, pad, dilation, groups, out_size = conv_geometry(input.shape, weight.shape, stride,
                                                            padding, dilation, groups)
    C_out = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != C_out):
        raise ValueError(f"bias must have shape ({C_out},), got {tuple(bias.shape)}")
    act, act_param = act_code(activation)
    post, post_param = act_code(post_activation)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    out_shape = (x.shape[0], C_out, out_size[0], out_size[1])
    if residual is not None:
        if unbatched and residual.dim() == 3:
            residual = residual.unsqueeze(0)
        if residual.shape != out_shape:
            check_broadcastable("residual", residual, out_shape)
            residual = residual.expand(out_shape)
    channels_last = _channels_last(x) or _channels_last(weight)
    grad = needs_grad(x, weight, bias) if act or post else False
    save_mid = bool(post) and (grad or needs_grad(residual))
    out, _, _ = conv2d_op(x, weight, bias, residual, stride, pad, dilation, groups, out_size,
                          act, act_param, post, post_param, channels_last,
                          bool(act) and grad, save_mid)
    return out.squeeze(0) if unbatched else out

"""Custom ops and public wrapper for fused BatchNorm + residual + activation.

Semantics (ResNet block): ``y = act(batch_norm(x) + residual)``. The custom op computes the
output and, in training, the batch mean and biased variance; the public wrapper then updates the
running statistics in place exactly as torch does (``running = (1 - m) * running + m * stat``,
unbiased variance ``var * n / (n - 1)``). ``momentum=None`` (cumulative average) and
``num_batches_tracked`` are handled by :class:`tilefuse.nn.BatchNormAct2d`, as in torch, which
passes ``1 / num_batches_tracked`` as the momentum.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import backend_for
from tilefuse._validate import (FLOAT_DTYPES_F64, check_broadcastable, check_same_device,
                                check_shape, check_tensor)
from tilefuse.activations import NAMES, activation_code, torch_activation, torch_activation_grad
from tilefuse.fused.norm_group import _empty_like_layout


def _use_torch(x: Tensor) -> bool:
    return backend_for(x) == "torch" or x.dtype == torch.float64 or x.numel() == 0


def _cd(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pre_act(x, residual, weight, bias, mean, var, eps):
    """(xhat, z) in the compute dtype for the torch path; stats are (C,)."""
    cd = _cd(x)
    rstd = torch.rsqrt(var.to(cd) + eps)[None, :, None]
    xhat = (x.to(cd) - mean.to(cd)[None, :, None]) * rstd
    z = xhat
    if weight is not None:
        z = z * weight.to(cd)[None, :, None]
    if bias is not None:
        z = z + bias.to(cd)[None, :, None]
    if residual is not None:
        z = z + residual.to(cd)
    return xhat, z


@torch.library.custom_op("tilefuse::batch_norm_act_fwd", mutates_args=())
def batch_norm_act_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], running_mean: Optional[Tensor],
                       running_var: Optional[Tensor], training: bool, eps: float,
                       activation: int, act_param: float) -> Tuple[Tensor, Tensor, Tensor]:
    """x, residual: (N, C, S) -> (y, mean (C,), var (C,)): batch stats (biased) in training,
    fp32 copies of the running stats in eval."""
    N, C, S = x.shape
    y = _empty_like_layout(x)
    if training:
        mean = x.new_empty(C, dtype=torch.float32)
        var = x.new_empty(C, dtype=torch.float32)
    else:
        mean = running_mean.to(torch.float32, copy=True)
        var = running_var.to(torch.float32, copy=True)
    if _use_torch(x):
        if training:
            h = x.to(_cd(x))
            m = h.mean((0, 2))
            v = (h - m[None, :, None]).pow(2).mean((0, 2))
            mean.copy_(m)
            var.copy_(v)
            stats = (m, v)
        else:
            stats = (mean, var)
        _, z = _pre_act(x, residual, weight, bias, stats[0], stats[1], eps)
        y.copy_(torch_activation(z, NAMES[activation], act_param))
        return y, mean, var
    from tilefuse.kernels.norm_bn import launch_batch_norm_fwd

    launch_batch_norm_fwd(x, residual, weight, bias, y, mean, var, training, eps, activation,
                          act_param)
    return y, mean, var


@batch_norm_act_fwd.register_fake
def _(x, residual, weight, bias, running_mean, running_var, training, eps, activation,
      act_param):
    C = x.shape[1]
    return (_empty_like_layout(x), x.new_empty(C, dtype=torch.float32),
            x.new_empty(C, dtype=torch.float32))


@torch.library.custom_op("tilefuse::batch_norm_act_bwd", mutates_args=())
def batch_norm_act_bwd(dy: Tensor, x: Tensor, residual: Optional[Tensor],
                       weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                       var: Tensor, training: bool, eps: float, activation: int,
                       act_param: float, need_dres: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dw (C,) fp32, db (C,) fp32, dres = dy * act'(z) or empty)."""
    dx = _empty_like_layout(x)
    dres = _empty_like_layout(x) if need_dres else x.new_empty(0)
    if _use_torch(x):
        cd = _cd(x)
        xhat, z = _pre_act(x, residual, weight, bias, mean, var, eps)
        dz = dy.to(cd)
        if activation != 0:
            dz = dz * torch_activation_grad(z, NAMES[activation], act_param)
        scale = torch.rsqrt(var.to(cd) + eps)
        if weight is not None:
            scale = scale * weight.to(cd)
        scale = scale[None, :, None]
        if training:
            dx.copy_((dz - dz.mean((0, 2), keepdim=True)
                      - xhat * (dz * xhat).mean((0, 2), keepdim=True)) * scale)
        else:
            dx.copy_(dz * scale)
        if need_dres:
            dres.copy_(dz)
        return dx, (dz * xhat).sum((0, 2)).float(), dz.sum((0, 2)).float(), dres
    from tilefuse.kernels.norm_bn import launch_batch_norm_bwd

    dw, db = launch_batch_norm_bwd(dy, x, residual, weight, bias, mean, var, dx,
                                   dres if need_dres else None, training, eps, activation,
                                   act_param)
    return dx, dw, db, dres


@batch_norm_act_bwd.register_fake
def _(dy, x, residual, weight, bias, mean, var, training, eps, activation, act_param,
      need_dres):
    C = x.shape[1]
    return (_empty_like_layout(x), x.new_empty(C, dtype=torch.float32),
            x.new_empty(C, dtype=torch.float32),
            _empty_like_layout(x) if need_dres else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _rm, _rv, training, eps, activation, act_param = inputs
    ctx.training, ctx.eps, ctx.activation, ctx.act_param = training, eps, activation, act_param
    ctx.save_for_backward(x, residual, weight, bias, output[1], output[2])


def _backward(ctx, dy, _dmean, _dvar):
    x, residual, weight, bias, mean, var = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dres = residual is not None and need[1] and ctx.activation != 0
    dx, dw, db, dres = batch_norm_act_bwd(dy, x, residual, weight, bias, mean, var, ctx.training,
                                          ctx.eps, ctx.activation, ctx.act_param, need_dres)
    if residual is not None and need[1] and ctx.activation == 0:
        dres = dy
    return (dx if need[0] else None, dres if (residual is not None and need[1]) else None,
            dw.to(weight.dtype) if weight is not None and need[2] else None,
            db.to(bias.dtype) if bias is not None and need[3] else None,
            None, None, None, None, None, None)


batch_norm_act_fwd.register_autograd(_backward, setup_context=_setup_context)


def batch_norm_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                   activation=None, residual: Optional[Tensor] = None) -> Tensor:
    """``act(batch_norm(x, ...) + residual)``, the fused form of
    :func:`torch.nn.functional.batch_norm` (same arguments and running-stat updates) followed by
    the residual add and the activation (ResNet: BN -> add -> ReLU).

    ``x`` is ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)`` (NCHW or channels_last, kept).
    ``x`` may be fp16/bf16 with fp32 ``weight``/``bias``/running stats (as torch allows; the
    output has ``x``'s dtype); ``torch.autocast`` casts nothing here, as for torch's batch_norm.

    >>> import torch, tilefuse
    >>> x = torch.randn(8, 3, 4, 4)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = tilefuse.ops.batch_norm_act(x, rm, rv, training=True, activation="relu")
    >>> ref = torch.relu(torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3),
    ...                                                 training=True))
    >>> bool(torch.allclose(y, ref, atol=1e-5))
    True
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES_F64, min_ndim=2)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias), ("residual", residual)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES_F64, allow_none=True)
    check_same_device(x=x, running_mean=running_mean, running_var=running_var, weight=weight,
                      bias=bias, residual=residual)
    # autocast: no cast (as torch's batch_norm); x may be bf16/fp16 with fp32 params and stats
    x, residual = _autocast.promote_residual(x, residual)
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None:
            check_shape(name, t, (C,))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("batch_norm_act in eval mode (training=False) needs running_mean and "
                         "running_var")
    if residual is not None:
        check_broadcastable("residual", residual, tuple(x.shape))
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float (the module resolves momentum=None), got "
                        f"{momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    S = 1
    for d in x.shape[2:]:
        S *= d
    count = x.shape[0] * S
    if training and count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}")
    act, act_param = activation_code(activation)
    x3 = x.reshape(x.shape[0], C, S)  # a view for NCHW / channels_last; else a copy
    r3 = residual.expand(x.shape).reshape(x.shape[0], C, S) if residual is not None else None
    y, mean, var = batch_norm_act_fwd(x3, r3, weight, bias, None if training else running_mean,
                                      None if training else running_var, bool(training),
                                      float(eps), act, act_param)
    if training and running_mean is not None:
        m = float(momentum)
        with torch.no_grad():
            running_mean.mul_(1.0 - m).add_(mean.detach().to(running_mean.dtype), alpha=m)
            unbiased = var.detach() * (count / (count - 1))
            running_var.mul_(1.0 - m).add_(unbiased.to(running_var.dtype), alpha=m)
    return y.view(x.shape)

"""Custom ops and public wrapper for fused BatchNorm + residual + activation.

Semantics (ResNet block): ``y = act(batch_norm(x) + residual)``. The custom op computes the
output and, in training, the batch mean and biased variance; the public wrapper then updates the
running statistics in place exactly as torch does (``running = (1 - m) * running + m * stat``,
unbiased variance ``var * n / (n - 1)``). ``momentum=None`` (cumulative average) and
``num_batches_tracked`` are handled by :class:`tilefuse.nn.BatchNormAct2d`, as in torch, which
passes ``1 / num_batches_tracked`` as the momentum.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._C import _any_requires_grad, is_grad_enabled
from torch.compiler import is_compiling as _is_compiling

from tilefuse import _autocast
from tilefuse._validate import (check_broadcastable, check_shape, check_tensor, dense,
                                float_tensor, optional_float_tensors, same_device)
from tilefuse.activations import NAMES, torch_activation, torch_activation_grad
from tilefuse.fused import _fast
from tilefuse._backend import _env_backend
from tilefuse.fused import norm_bn_plan as _plan
from tilefuse.fused._fast import (act_code, autocast_maybe_on, fast_op, lazy_module, needs_grad,
                                   plans_allowed, remember, tkey)
from tilefuse.fused._fast import use_torch_path as _use_torch
from tilefuse.fused.norm_group import _empty_like_layout


_kernels = lazy_module("tilefuse.kernels.norm_bn")


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


def _fwd_impl(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
              bias: Optional[Tensor], running_mean: Optional[Tensor],
              running_var: Optional[Tensor], training: bool, eps: float, activation: int,
              act_param: float, save_stats: bool, momentum: float = 0.0,
              num_batches_tracked: Optional[Tensor] = None,
              cumulative: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """x, residual: (N, C, S) -> (y, mean (C,), var (C,)): batch stats (biased) in training,
    fp32 copies of the running stats in eval; in eval with ``save_stats=False`` (no gradient
    will be taken) mean and var come back empty and the running stats are read in place.
    Training also updates the running stats given (``momentum``, or the cumulative average
    ``1 / num_batches_tracked``; not for an empty batch, as torch) and increments
    ``num_batches_tracked`` when given (the finalize kernel: three launches in all)."""
    y = _empty_like_layout(x)
    if _use_torch(x):
        sd = _cd(x)  # fp64 statistics for fp64 inputs: fp64-accurate outputs and gradients
        if training:
            h = x.to(sd)
            mean = h.mean((0, 2))
            var = (h - mean[None, :, None]).pow(2).mean((0, 2))
            if running_mean is not None or num_batches_tracked is not None:
                with torch.no_grad():
                    _running_impl(mean, var, running_mean, running_var, num_batches_tracked,
                                  momentum, x.shape[0] * x.shape[2], cumulative)
        elif save_stats:
            mean = running_mean.to(sd, copy=True)
            var = running_var.to(sd, copy=True)
        else:
            mean, var = running_mean.to(sd), running_var.to(sd)
        _, z = _pre_act(x, residual, weight, bias, mean, var, eps)
        y.copy_(torch_activation(z, NAMES[activation], act_param))
        return (y, mean, var) if training or save_stats else (y, _empty(x), _empty(x))
    if training:
        fused = _dense_stats(running_mean, running_var)  # (else: the update by torch ops)
        mean, var = _kernels().launch_batch_norm_fwd(
            x, residual, weight, bias, y, None, None, True, eps, activation, act_param,
            running_mean if fused else None, running_var if fused else None, momentum,
            num_batches_tracked if fused else None, cumulative)
        if not fused:
            _running_impl(mean, var, running_mean, running_var, num_batches_tracked, momentum,
                          x.shape[0] * x.shape[2], cumulative)
        return y, mean, var
    if save_stats:
        mean = running_mean.to(torch.float32, copy=True)
        var = running_var.to(torch.float32, copy=True)
    else:  # read in place when they already are fp32 and contiguous (the kernel's layout)
        mean, var = _f32_dense(running_mean), _f32_dense(running_var)
    _kernels().launch_batch_norm_fwd(x, residual, weight, bias, y, mean, var, False, eps,
                                     activation, act_param)
    return (y, mean, var) if save_stats else (y, _empty(x), _empty(x))


_f32_dense = _plan.f32_dense


def _empty(x: Tensor) -> Tensor:
    return torch.empty(0, device=x.device, dtype=_cd(x))


def _fwd_fake(x, residual, weight, bias, running_mean, running_var, training, eps, activation,
              act_param, save_stats, momentum=0.0, num_batches_tracked=None, cumulative=False):
    C = x.shape[1] if training or save_stats else 0
    return (_empty_like_layout(x), x.new_empty(C, dtype=_cd(x)), x.new_empty(C, dtype=_cd(x)))


def _bwd_impl(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
              bias: Optional[Tensor], mean: Tensor, var: Tensor, training: bool, eps: float,
              activation: int, act_param: float,
              need_dres: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dw (C,), db (C,) (in the parameters' dtype; without one fp32, fp64 for fp64 x),
    dres = dy * act'(z) or empty)."""
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
        dw, db = (dz * xhat).sum((0, 2)), dz.sum((0, 2))  # (fp32, fp64 for fp64)
        return (dx, dw if weight is None else dw.to(weight.dtype),
                db if bias is None else db.to(bias.dtype), dres)
    dw, db = _kernels().launch_batch_norm_bwd(dy, x, residual, weight, bias, mean, var, dx,
                                              dres if need_dres else None, training, eps,
                                              activation, act_param)
    return dx, dw, db, dres


def _bwd_fake(dy, x, residual, weight, bias, mean, var, training, eps, activation, act_param,
              need_dres):
    C = x.shape[1]
    return (_empty_like_layout(x), x.new_empty(C, dtype=_param_dtype(weight, x)),
            x.new_empty(C, dtype=_param_dtype(bias, x)),
            _empty_like_layout(x) if need_dres else x.new_empty(0))


def _param_dtype(p, x) -> torch.dtype:
    """dw/db come back in the parameter's dtype (no cast op in the backward)."""
    return p.dtype if p is not None else _cd(x)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _rm, _rv, training, eps, activation, act_param = inputs[:10]
    ctx.training, ctx.eps, ctx.activation, ctx.act_param = training, eps, activation, act_param
    ctx.save_for_backward(x, residual, weight, bias, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero gradients built for mean/var (None instead)


def _backward(ctx, dy, _dmean, _dvar):
    if dy is None:  # (grads are not materialised: y unused)
        return (None,) * 14
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
            None, None, None, None, None, None, None, None, None, None)


batch_norm_act_bwd = fast_op("batch_norm_act_bwd", _bwd_impl, fake=_bwd_fake)
batch_norm_act_fwd = fast_op("batch_norm_act_fwd", _fwd_impl, fake=_fwd_fake,
                             setup_context=_setup_context, backward=_backward)


def _running_impl(mean: Tensor, var: Tensor, running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                  momentum: float, count: int, cumulative: bool) -> None:
    """The running-stat update of a training forward (and ``num_batches_tracked += 1``), for
    the traced path: the kernel the fused finalize runs (same bits), or torch ops."""
    if _use_torch(mean) or not _dense_stats(running_mean, running_var):
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if running_mean is not None and count > 0:
            m = 1.0 / num_batches_tracked.item() if cumulative else momentum
            _update_running(running_mean, running_var, mean, var, m, count)
        return
    _kernels().launch_batch_norm_running(mean, var, running_mean, running_var,
                                         num_batches_tracked, momentum, count, cumulative)


_dense_stats = _plan.dense_stats


batch_norm_running = torch.library.custom_op(
    "tilefuse::batch_norm_running",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"))(_running_impl)
batch_norm_running.register_fake(lambda *args: None)


def _traced() -> bool:
    """Whether batch_norm_act_fwd will run as its custom op (compiling, a jit trace, or
    :func:`tilefuse.fused._fast.custom_op_path`): the custom op is functional, so the running
    stats are then updated by torch ops outside it (eager: in its finalize kernel)."""
    return _fast._FORCE_CUSTOM_OP[0] or _is_compiling() or _fast._jit_tracing() is not None


def _check_momentum(momentum) -> float:
    """torch's rule: any real number (an int such as 1 included, as ``F.batch_norm``); a bool
    or a non-number is a TypeError (``momentum=None`` is resolved by the module)."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number (float or int; the module resolves "
                        f"momentum=None), got {momentum!r}")
    return float(momentum)


_SCALARS: dict = {}


def _scalar(value: float, like: Tensor):
    """``value`` as a cached 0-d CPU tensor, fp64 for an fp64 ``like`` and fp32 otherwise: as
    the other operand of an elementwise op on ``like`` it is the same CPU scalar, cast to the
    same compute type, as the Python number (torch wraps a number into a fresh tensor on every
    call, a microsecond or two). The plain number when compiling."""
    if _is_compiling():
        return value
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    try:
        return _SCALARS[(value, dtype)]
    except KeyError:
        if len(_SCALARS) >= 64:  # momentum=None modules pass a new 1 / n each step
            _SCALARS.clear()
        t = _SCALARS[(value, dtype)] = torch.tensor(value, dtype=dtype)
        return t


def _update_running(running_mean, running_var, mean, var, momentum: float, count: int) -> None:
    """torch's update: ``running = (1 - m) * running + m * stat``, unbiased variance."""
    m = momentum
    running_mean.mul_(_scalar(1.0 - m, running_mean)).add_(
        mean if mean.dtype == running_mean.dtype else mean.to(running_mean.dtype), alpha=m)
    unbiased = var * _scalar(count / (count - 1), var)
    running_var.mul_(_scalar(1.0 - m, running_var)).add_(
        unbiased if unbiased.dtype == running_var.dtype else unbiased.to(running_var.dtype),
        alpha=m)


def batch_norm_act(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                   activation=None, residual: Optional[Tensor] = None,
                   num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``act(batch_norm(x, ...) + residual)``, the fused form of
    :func:`torch.nn.functional.batch_norm` (same arguments and running-stat updates) followed by
    the residual add and the activation (ResNet: BN -> add -> ReLU).

    ``x`` is ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)`` (NCHW or channels_last, kept).
    ``x`` may be fp16/bf16 with fp32 ``weight``/``bias``/running stats (as torch allows; the
    output has ``x``'s dtype); ``torch.autocast`` casts nothing here, as for torch's batch_norm.

    ``num_batches_tracked`` (the module's counter, training only) is incremented by the op
    itself, and with ``momentum=None`` the running stats take the cumulative average ``1 /
    num_batches_tracked``, as :class:`torch.nn.BatchNorm2d` does: a training step is then three
    launches (statistics, finalize with the running-stat update, apply) on the kernel backends,
    or one where the whole problem fits one tile.

    >>> import torch, tilefuse
    >>> x = torch.randn(8, 3, 4, 4)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = tilefuse.ops.batch_norm_act(x, rm, rv, training=True, activation="relu")
    >>> ref = torch.relu(torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3),
    ...                                                 training=True))
    >>> bool(torch.allclose(y, ref, atol=1e-5))
    True
    """
    if plans_allowed():
        # eager: the signature's plan (tilefuse.fused.norm_bn_plan); grad as the FastOp sees it
        if not (is_grad_enabled() and
                _any_requires_grad(x, residual, weight, bias, running_mean, running_var)):
            plans = _plan.PLANS
        elif _any_requires_grad(x, residual, weight, bias):
            plans = _plan.GRAD_PLANS
        else:
            plans = None
        if plans is not None:
            try:
                key = (tkey(x), tkey(running_mean), tkey(running_var), tkey(weight), tkey(bias),
                       tkey(residual), tkey(num_batches_tracked), type(num_batches_tracked),
                       training, momentum, type(momentum), eps, type(eps), activation,
                       _env_backend())
                plan = plans[key]
            except KeyError:
                return _first_call(plans, key, x, running_mean, running_var, weight, bias,
                                   training, momentum, eps, activation, residual,
                                   num_batches_tracked)
            except (TypeError, AttributeError):  # unhashable, or not tensors: validated below
                pass
            else:
                return plan(x, running_mean, running_var, weight, bias, training, momentum, eps,
                            activation, residual, num_batches_tracked)
    return _batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps,
                           activation, residual, num_batches_tracked)


def _first_call(plans, key, x, running_mean, running_var, weight, bias, training, momentum, eps,
                activation, residual, num_batches_tracked):
    """A call whose signature has no plan yet: run the full path (validating: an error raises
    and nothing is remembered), then remember the signature's plan, or the full path itself
    where the signature takes none (the next calls go straight to it)."""
    y = _batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps,
                        activation, residual, num_batches_tracked)
    plan = _plan.make_plan(x, running_mean, running_var, weight, bias, training, momentum, eps,
                           activation, residual, num_batches_tracked, y,
                           plans is _plan.GRAD_PLANS, batch_norm_act_bwd)
    remember(plans, key, plan if plan is not None else _batch_norm_act)
    return y


def _batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps,
                    activation, residual, num_batches_tracked):
    """:func:`batch_norm_act` without a plan: validate, normalise, run the op."""
    float_tensor("x", x)
    if x.dim() < 2:
        check_tensor("x", x, min_ndim=2)
    optional_float_tensors(running_mean=running_mean, running_var=running_var, weight=weight,
                           bias=bias, residual=residual)
    same_device(x=x, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias, residual=residual)
    if residual is not None and autocast_maybe_on():
        # autocast: no cast (as torch's batch_norm); x may be bf16/fp16 with fp32 params and
        # stats; a mixed-dtype residual is promoted as eager ``bn(x) + residual`` would be
        x, residual = _autocast.promote_residual(x, residual)
    shape = x.shape
    N, C = shape[0], shape[1]
    if running_mean is not None and running_mean.shape != (C,):
        check_shape("running_mean", running_mean, (C,))
    if running_var is not None and running_var.shape != (C,):
        check_shape("running_var", running_var, (C,))
    if weight is not None and weight.shape != (C,):
        check_shape("weight", weight, (C,))
    if bias is not None and bias.shape != (C,):
        check_shape("bias", bias, (C,))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if type(training) is not bool:
        training = bool(training)
    if not training and running_mean is None:
        raise ValueError("batch_norm_act in eval mode (training=False) needs running_mean and "
                         "running_var")
    if residual is not None:
        if residual.shape != shape:
            check_broadcastable("residual", residual, tuple(shape))
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    cumulative = momentum is None and num_batches_tracked is not None
    if num_batches_tracked is not None and (type(num_batches_tracked) is not torch.Tensor or
                                            num_batches_tracked.numel() != 1):
        raise TypeError(f"num_batches_tracked must be a one-element tensor (the module's "
                        f"counter), got {num_batches_tracked!r}")
    if cumulative:
        momentum = 0.0
    elif type(momentum) is not float:
        momentum = _check_momentum(momentum)
    if type(eps) is not float or not eps >= 0:
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
        eps = float(eps)
    S = math.prod(shape[2:])
    count = N * S
    if training and count == 1:  # (an empty batch returns an empty output, as torch)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{tuple(shape)}")
    act, act_param = act_code(activation)
    weight, bias = dense(weight), dense(bias)
    x3 = x if x.dim() == 3 else x.reshape(N, C, S)  # a view for NCHW / channels_last; else a copy
    r3 = None
    if residual is not None:
        r3 = residual if residual.shape == shape else residual.expand(shape)
        if r3.dim() != 3:
            r3 = r3.reshape(N, C, S)
    save = needs_grad(x3, r3, weight, bias)
    if training and not _traced():  # the op updates the running stats and the counter
        y, _, _ = batch_norm_act_fwd(x3, r3, weight, bias, running_mean, running_var, True, eps,
                                     act, act_param, save, momentum, num_batches_tracked,
                                     cumulative)
    elif training:
        y, mean, var = batch_norm_act_fwd(x3, r3, weight, bias, None, None, True, eps, act,
                                          act_param, True)
        if running_mean is not None or num_batches_tracked is not None:
            batch_norm_running(mean.detach(), var.detach(), running_mean, running_var,
                               num_batches_tracked, momentum, count, cumulative)
    else:
        y, _, _ = batch_norm_act_fwd(x3, r3, weight, bias, running_mean, running_var, False, eps,
                                     act, act_param, save)
    return y if x.dim() == 3 else y.view(*shape)  # (a tuple argument parses slower)

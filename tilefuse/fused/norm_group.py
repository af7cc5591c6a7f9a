"""Custom ops and public wrapper for fused GroupNorm / InstanceNorm + activation.

``tilefuse::group_norm_act_fwd(x3, weight, bias, num_groups, eps, act, param) -> (y, mean, rstd)``
on an ``(N, C, S)`` view of the input (any strides; channels_last stays channels_last: the
output is allocated in the input's memory format). InstanceNorm is ``num_groups == C``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import _env_backend
from tilefuse._validate import (all_dense, check_shape, check_tensor, dense, float_tensor,
                                same_device)
from tilefuse.activations import NAMES, torch_activation, torch_activation_grad
from tilefuse.fused._fast import (_c_apply, act_code, allocator, autocast_maybe_on, fast_op,
                                  lazy_module, needs_grad, node_plan, plan_cache, plans_allowed,
                                  remember, tkey)
from tilefuse.fused._fast import use_torch_path as _use_torch


_kernels = lazy_module("tilefuse.kernels.norm_group")


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_like_layout(x3: Tensor) -> Tensor:
    """(N, C, S) output in ``x3``'s dtype: channels-last (C innermost) if the input is, else
    contiguous."""
    N, C, S = x3.shape
    if C > 1 and S > 1 and x3.stride(1) == 1:
        return x3.new_empty(N, S, C).transpose(1, 2)
    return x3.new_empty(N, C, S)  # (sizes as arguments: cheaper to parse than one tuple)


def _torch_stats(x3, G, eps):
    N, C, S = x3.shape
    cd = _stat_dtype(x3)
    h = x3.to(cd).reshape(N, G, (C // G) * S)
    mean = h.mean(-1)
    rstd = torch.rsqrt((h - mean[..., None]).pow(2).mean(-1) + eps)
    return h, mean, rstd


def _xhat(x3, G, mean, rstd):
    N, C, S = x3.shape
    cd = mean.dtype
    h = x3.to(cd).reshape(N, G, (C // G) * S)
    return ((h - mean.reshape(N, G, 1)) * rstd.reshape(N, G, 1)).reshape(N, C, S)


def _affine(xhat, weight, bias):
    z = xhat
    if weight is not None:
        z = z * weight.to(z.dtype)[None, :, None]
    if bias is not None:
        z = z + bias.to(z.dtype)[None, :, None]
    return z


def _fwd_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       num_groups: int, eps: float, activation: int,
                       act_param: float) -> Tuple[Tensor, Tensor, Tensor]:
    N, C, S = x.shape
    y = _empty_like_layout(x)
    if _use_torch(x):
        _, mean, rstd = _torch_stats(x, num_groups, eps)
        z = _affine(_xhat(x, num_groups, mean, rstd), weight, bias)
        y.copy_(torch_activation(z, NAMES[activation], act_param))
        return y, mean.reshape(-1), rstd.reshape(-1)  # fp64 statistics for fp64 inputs
    mean = x.new_empty(N * num_groups, dtype=torch.float32)
    rstd = x.new_empty(N * num_groups, dtype=torch.float32)
    _kernels().launch_group_norm_fwd(x, weight, bias, y, mean, rstd, num_groups, eps, activation,
                                     act_param)
    return y, mean, rstd


def _fwd_fake(x, weight, bias, num_groups, eps, activation, act_param):
    N, sd = x.shape[0], _stat_dtype(x)
    return (_empty_like_layout(x), x.new_empty(N * num_groups, dtype=sd),
            x.new_empty(N * num_groups, dtype=sd))


def _bwd_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              mean: Tensor, rstd: Tensor, num_groups: int, activation: int, act_param: float,
              need_dw: bool, need_db: bool) -> Tuple[Tensor, Tensor, Tensor]:
    N, C, S = x.shape
    dx = _empty_like_layout(x)
    def empty():
        return x.new_empty(0, dtype=_stat_dtype(x))  # a fresh one each: outputs may not alias
    if _use_torch(x):
        cd = _stat_dtype(x)
        xhat = _xhat(x, num_groups, mean.to(cd), rstd.to(cd))
        dz = dy.to(cd)
        if activation != 0:
            dz = dz * torch_activation_grad(_affine(xhat, weight, bias), NAMES[activation],
                                            act_param)
        g = dz * weight.to(cd)[None, :, None] if weight is not None else dz
        g3 = g.reshape(N, num_groups, (C // num_groups) * S)
        xh3 = xhat.reshape(g3.shape)
        c1 = g3.mean(-1, keepdim=True)
        c2 = (g3 * xh3).mean(-1, keepdim=True)
        r = rstd.to(cd).reshape(N, num_groups, 1)
        dx.copy_(((g3 - c1 - xh3 * c2) * r).reshape(N, C, S))
        dw = (dz * xhat).sum((0, 2)).to(weight.dtype) if need_dw else empty()
        db = dz.sum((0, 2)).to(bias.dtype) if need_db else empty()
        return dx, dw, db
    dw, db = _kernels().launch_group_norm_bwd(dy, x, weight, bias, mean, rstd, dx, num_groups,
                                              activation, act_param, need_dw, need_db)
    return dx, (dw if dw is not None else empty()), (db if db is not None else empty())


def _bwd_fake(dy, x, weight, bias, mean, rstd, num_groups, activation, act_param, need_dw,
              need_db):
    C, sd = x.shape[1], _stat_dtype(x)
    return (_empty_like_layout(x), x.new_empty(C, dtype=weight.dtype) if need_dw else
            x.new_empty(0, dtype=sd), x.new_empty(C, dtype=bias.dtype) if need_db else
            x.new_empty(0, dtype=sd))


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation, act_param = inputs
    ctx.num_groups, ctx.activation, ctx.act_param = num_groups, activation, act_param
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero gradients built for mean/rstd (None instead)


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # (grads are not materialised: y unused)
        return (None,) * 7
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw = weight is not None and need[1]
    need_db = bias is not None and need[2]
    dx, dw, db = group_norm_act_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups,
                                    ctx.activation, ctx.act_param, need_dw, need_db)
    return (dx if need[0] else None, dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db else None, None, None, None, None)


group_norm_act_bwd = fast_op("group_norm_act_bwd", _bwd_impl, fake=_bwd_fake)
group_norm_act_fwd = fast_op("group_norm_act_fwd", _fwd_impl, fake=_fwd_fake,
                             setup_context=_setup_context, backward=_backward)


def _running_impl(mean: Tensor, rstd: Tensor, running_mean: Tensor, running_var: Tensor,
                  N: int, S: int, eps: float, momentum: float) -> None:
    if _use_torch(mean) or not (running_mean.is_contiguous() and running_var.is_contiguous()):
        cd = mean.dtype
        m = mean.reshape(N, -1).mean(0)
        var = (rstd.reshape(N, -1).to(cd).pow(-2) - eps).mean(0)
        var = var * (S / (S - 1) if S > 1 else float("nan"))
        running_mean.mul_(1.0 - momentum).add_(m.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
        return
    _kernels().launch_instance_running(mean, rstd, running_mean, running_var, N, S, eps,
                                       momentum)


instance_norm_running = torch.library.custom_op(
    "tilefuse::instance_norm_running", mutates_args=("running_mean", "running_var"))(_running_impl)
instance_norm_running.register_fake(lambda *args: None)


def instance_norm_act_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            eps: float, activation, running_mean: Tensor, running_var: Tensor,
                            momentum: float) -> Tensor:
    """InstanceNorm in training with running statistics: :func:`group_norm_act` with ``G == C``
    and the running stats updated from its saved per-instance mean/rstd by
    ``tilefuse::instance_norm_running`` (one small kernel; no second read of ``x``)."""
    y, mean, rstd = _group_norm(x, x.shape[1], weight, bias, eps, activation)
    if x.numel() > 0:
        from tilefuse.fused.norm_bn import _traced

        # eager: the kernel directly (no dispatcher round trip); traced: the mutating custom op
        update = instance_norm_running if _traced() else _running_impl
        update(mean.detach(), rstd.detach(), running_mean, running_var, x.shape[0],
               math.prod(x.shape[2:]), eps, float(momentum))
    return y


def group_norm_act(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, activation=None) -> Tensor:
    """``act(group_norm(x, num_groups, weight, bias, eps))`` in one kernel per ``(n, group)``.

    ``x`` is ``(N, C, *spatial)``; NCHW and channels_last are both read in place and the output
    keeps the input's memory format. ``num_groups == C`` is InstanceNorm (per-sample,
    per-channel statistics; running statistics are not tracked by this op). Under
    ``torch.autocast``: fp32 on CUDA, no cast on CPU, as torch's ``group_norm`` (docs/amp.md).

    >>> import torch, tilefuse
    >>> x = torch.randn(2, 6, 5, 5)
    >>> y = tilefuse.ops.group_norm_act(x, 3, activation="silu")
    >>> ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 3))
    >>> bool(torch.allclose(y, ref, atol=1e-5))
    True
    """
    if plans_allowed():
        try:  # the signature: every argument that validation, layout and launch depend on
            grad = needs_grad(x, weight, bias)
            key = (tkey(x), tkey(weight), tkey(bias), num_groups, eps, activation,
                   _env_backend(), grad, type(x), type(num_groups), type(eps))
            plan = _PLANS.get(key)
        except (TypeError, AttributeError):  # unhashable arguments, a non-tensor x
            return _group_norm(x, num_groups, weight, bias, eps, activation)[0]
        if plan is not None:
            return plan(x, weight, bias)
        y = _group_norm(x, num_groups, weight, bias, eps, activation)[0]  # validates, raises
        plan = _build_plan(x, weight, bias, num_groups, eps, activation, y, grad)
        if plan is not None:
            remember(_PLANS, key, plan)
        return y
    return _group_norm(x, num_groups, weight, bias, eps, activation)[0]


# --------------------------------------------------------------------------------------------
# per-signature plans (eager, no autocast): a call whose arguments have the shapes, strides,
# dtypes, devices and scalar values of an earlier valid call skips validation and launch set-up
# --------------------------------------------------------------------------------------------
_PLANS = plan_cache()


class _Plan:
    """What a planned call needs: the output allocator, the bound launch
    (:func:`tilefuse.kernels.norm_group.bind_group_norm_fwd`) and, for the backward, the
    ``(N, C, S)`` view shape and the op's scalars."""

    __slots__ = ("alloc", "launch", "groups", "shape3", "G", "act", "param")

    def __init__(self, alloc, launch, groups, shape3, G, act, param):
        self.alloc, self.launch, self.groups, self.shape3 = alloc, launch, groups, shape3
        self.G, self.act, self.param = G, act, param


def _planned_forward(plan, x, weight, bias):
    """:func:`group_norm_act_fwd` on ``x`` itself with the bound launch: ``y``, mean, rstd."""
    y = plan.alloc(x)
    mean = x.new_empty(plan.groups, dtype=torch.float32)
    rstd = x.new_empty(plan.groups, dtype=torch.float32)
    plan.launch(x, weight, bias, y, mean, rstd)
    return y, mean, rstd


def _planned_grads(p, x, weight, bias, mean, rstd, need, dy):
    """``(dx, dweight, dbias)`` (``need``: per x, weight, bias): ``dy``/``x`` reshaped as the
    full path's view nodes would and the same :func:`group_norm_act_bwd` (the same bits)."""
    if dy is None:
        return None, None, None
    need_dw = weight is not None and need[1]
    need_db = bias is not None and need[2]
    dx, dw, db = group_norm_act_bwd(dy.reshape(p.shape3), x.reshape(p.shape3), weight, bias,
                                    mean, rstd, p.G, p.act, p.param, need_dw, need_db)
    return (dx.reshape(x.shape) if need[0] else None, dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db else None)


def _node_backward(plan, saved, needs, dy):
    """The C++ node's backward (inputs ``(x, weight, bias)``; saved: those and the stats)."""
    return _planned_grads(plan, *saved, needs, dy)


_node_backward.__name__ = "TilefuseGroupNormBackward"  # (the node's name: grad_fn.name())


class _PlannedGroupNorm(torch.autograd.Function):
    """The planned call with a gradient: the forward of :func:`group_norm_act_fwd` on ``x``
    itself (no ``(N, C, S)`` view nodes in the graph); the backward reshapes ``dy``/``x`` as the
    view nodes would and calls the same :func:`group_norm_act_bwd` (the same bits)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan):
        y, mean, rstd = _planned_forward(plan, x, weight, bias)
        ctx.save_for_backward(x, weight, bias)
        ctx.plan, ctx.stats = plan, (mean, rstd)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        return _planned_grads(ctx.plan, x, weight, bias, *ctx.stats, ctx.needs_input_grad,
                              dy) + (None,)


_apply_planned = _c_apply.__get__(None, _PlannedGroupNorm)


def _build_plan(x, weight, bias, num_groups, eps, activation, y, grad):
    """The closure serving later calls with the signature of this (valid) one, or None where
    none may: a module activation (parsed on every call: its parameters may change)."""
    if activation is not None and type(activation) not in (str, tuple):
        return None
    if not all_dense(weight, bias):
        return None  # (strided parameters: the full path copies them)
    G, eps = int(num_groups), float(eps)
    act, param = act_code(activation)
    shape = x.shape
    shape3 = (shape[0], shape[1], math.prod(shape[2:]))
    x3 = x if x.dim() == 3 else x.reshape(shape3)
    if _use_torch(x3) or x3.data_ptr() != x.data_ptr():  # torch path, or x3 is a copy
        return lambda x, weight, bias: _group_norm(x, G, weight, bias, eps, activation)[0]
    y3 = y if y.dim() == 3 else y.view(shape3)
    launch = _kernels().bind_group_norm_fwd(x3, y3.stride(), G, eps, weight is not None,
                                            bias is not None, act, param, grad)
    plan = _Plan(allocator(x, y), launch, shape3[0] * G, shape3, G, act, param)
    if grad:
        def forward(x, weight, bias):
            y, mean, rstd = _planned_forward(plan, x, weight, bias)
            return y, (x, weight, bias, mean, rstd)
        return node_plan(lambda x, weight, bias: _apply_planned(x, weight, bias, plan), forward,
                         _node_backward, plan)
    alloc = plan.alloc

    def run(x, weight, bias):
        y = alloc(x)
        launch(x, weight, bias, y, None, None)
        return y
    return run


def _group_norm(x, num_groups, weight, bias, eps, activation):
    """:func:`group_norm_act` -> ``(y, mean, rstd)`` (the statistics per ``(n, group)``)."""
    float_tensor("x", x)
    if x.dim() < 2:
        check_tensor("x", x, min_ndim=2)
    if weight is not None:
        float_tensor("weight", weight)
    if bias is not None:
        float_tensor("bias", bias)
    same_device(x=x, weight=weight, bias=bias)
    if autocast_maybe_on():  # fp32 where torch runs group_norm in fp32 (CUDA, ...), no cast on CPU
        x, weight, bias = _autocast.norm_fp32("group_norm", x, weight, bias)
    if type(num_groups) is not int:
        if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
            raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
        num_groups = int(num_groups)
    shape = x.shape
    N, C = shape[0], shape[1]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be positive and divide the number of "
                         f"channels C={C} (x of shape {tuple(shape)})")
    if weight is not None and weight.shape != (C,):
        check_shape("weight", weight, (C,))
    if bias is not None and bias.shape != (C,):
        check_shape("bias", bias, (C,))
    if type(eps) is not float or not eps >= 0:
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
        eps = float(eps)
    act, act_param = act_code(activation)
    # a view for NCHW / channels_last; else a copy
    x3 = x if x.dim() == 3 else x.reshape(N, C, math.prod(shape[2:]))
    y, mean, rstd = group_norm_act_fwd(x3, dense(weight), dense(bias), num_groups, eps, act,
                                       act_param)
    return (y if x.dim() == 3 else y.view(*shape)), mean, rstd

"""Per-signature plans of :func:`tilefuse.ops.batch_norm_act` (the eager hot path).

The first eager call with a signature (every tensor's shape, strides, dtype and device, the
scalar arguments, ``TILEFUSE_BACKEND``) runs the op's full path, which validates the arguments
and raises on bad ones; the signature's plan is then built and serves the next calls: the
output allocated with ``torch.empty_like(x)`` (no ``(N, C, S)`` reshape or view back) and the
kernels launched through the :class:`tilefuse.kernels.norm_bn.FwdLaunch` bound for it, the
launcher the full path uses too (the same arguments, the same bits). A signature the plans do
not cover (the torch path, an input that needs a copy, torch ops around the kernels) keeps the
full path.

* no gradient needed: a closure (allocate, launch);
* a gradient needed: :class:`_GradPlan`, one autograd node over the caller's tensors (the C++
  one of :func:`tilefuse.fused._fast.node_plan`, else :class:`_GradFunction`) with one output (no view nodes around it), saving the ``(N, C, S)`` views the full path's op
  saves; its backward reshapes ``dy`` to ``(N, C, S)`` and runs the op's own backward
  (``batch_norm_act_bwd``), as the full path's view / custom-op / view chain does.

Plans are skipped while compiling or tracing, under :func:`tilefuse.fused._fast.custom_op_path`
and under autocast (:func:`tilefuse.fused._fast.plans_allowed`), and under functorch transforms;
a gradient plan serves only calls where ``x``, ``residual``, ``weight`` or ``bias`` requires
grad (running stats that require grad: the full path).
"""
from __future__ import annotations

import math

import torch

from tilefuse._validate import all_dense
from tilefuse.fused import _fast
from tilefuse.fused._fast import act_code, lazy_module, plan_cache
from tilefuse.fused._fast import use_torch_path as _use_torch
from tilefuse.fused.norm_group import _empty_like_layout

_kernels = lazy_module("tilefuse.kernels.norm_bn")
_F32 = torch.float32

PLANS = plan_cache()       # signature -> plan, eager calls without grad
GRAD_PLANS = plan_cache()  # signature -> plan, eager calls with grad


def f32_dense(t):
    """``t`` itself when fp32 and contiguous (the kernels' layout of (C,) stats), else a copy."""
    return t if t.dtype == _F32 and t.is_contiguous() else t.to(_F32, copy=True)


def dense_stats(running_mean, running_var) -> bool:
    """Whether the kernels update the running stats in place (else torch ops do)."""
    return running_mean is None or (running_mean.is_contiguous() and
                                    running_var.is_contiguous())


def make_plan(x, running_mean, running_var, weight, bias, training, momentum, eps, activation,
              residual, num_batches_tracked, y, grad: bool, bwd_op):
    """The plan of a call that the full path ran (validated) and returned ``y`` for, or None.
    A plan is called with :func:`tilefuse.ops.batch_norm_act`'s arguments."""
    if type(training) is not bool or not (activation is None or
                                          type(activation) in (str, tuple)):
        return None  # (an activation module is parsed on every call)
    if _use_torch(x) or not all_dense(weight, bias):
        return None  # (strided parameters: the full path copies them)
    shape = x.shape
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    x3 = x if x.dim() == 3 else x.reshape(N, C, S)
    r3 = None
    if residual is not None:
        if grad and residual.shape != shape:
            return None  # (broadcast: its gradient is reduced by autograd's expand)
        r3 = residual if residual.shape == shape else residual.expand(shape)
        r3 = r3 if r3.dim() == 3 else r3.reshape(N, C, S)
        if r3.data_ptr() != residual.data_ptr():
            return None  # (a copy)
    if x3.data_ptr() != x.data_ptr() or torch.empty_like(x).stride() != y.stride():
        return None  # (``y``: the full path's (N, C, S) output viewed as ``x``'s shape)
    if training and not dense_stats(running_mean, running_var):
        return None  # (the running-stat update by torch ops)
    act, act_param = act_code(activation)
    cumulative = momentum is None and num_batches_tracked is not None
    momentum = 0.0 if cumulative else float(momentum)
    eps = float(eps)
    launch = _kernels().bind_batch_norm_fwd(
        x3, r3, _empty_like_layout(x3), weight is not None, bias is not None, training, eps, act,
        act_param, training and running_mean is not None,
        training and num_batches_tracked is not None, cumulative, momentum, store_stats=grad)
    if grad:
        return _GradPlan(launch, training, eps, act, act_param, (N, C, S), x.dim() == 3,
                         bwd_op).__call__
    if training:
        def plan(x, running_mean, running_var, weight, bias, training, momentum, eps,
                 activation, residual, num_batches_tracked):
            y = torch.empty_like(x)
            launch(x, residual, weight, bias, y, None, None, running_mean, running_var,
                   num_batches_tracked)
            return y
        return plan
    if all(t.dtype == _F32 and t.is_contiguous() for t in (running_mean, running_var)):
        def plan_eval(x, running_mean, running_var, weight, bias, training, momentum, eps,
                      activation, residual, num_batches_tracked):
            y = torch.empty_like(x)
            launch(x, residual, weight, bias, y, running_mean, running_var)
            return y
        return plan_eval

    def plan_eval_cast(x, running_mean, running_var, weight, bias, training, momentum, eps,
                       activation, residual, num_batches_tracked):
        y = torch.empty_like(x)
        launch(x, residual, weight, bias, y, f32_dense(running_mean), f32_dense(running_var))
        return y
    return plan_eval_cast


class _GradPlan:
    """The plan of a signature that needs a gradient: :class:`_GradFunction` with the bound
    launch, and the backward's constants."""

    __slots__ = ("launch", "training", "eps", "act", "act_param", "nchw", "dim3", "bwd_op",
                 "record")
    # (nchw: the (N, C, S) of the full path's views; dim3: x is (N, C, S) already; record:
    # how a call records its autograd node, the C++ node or the Function)

    def __init__(self, launch, training, eps, act, act_param, nchw, dim3, bwd_op):
        self.launch, self.training, self.eps = launch, training, eps
        self.act, self.act_param, self.nchw, self.dim3, self.bwd_op = (act, act_param, nchw,
                                                                        dim3, bwd_op)
        self.record = _fast.node_plan(self.function, self.node_forward, _node_backward, self)

    def __call__(self, x, running_mean, running_var, weight, bias, training, momentum, eps,
                 activation, residual, num_batches_tracked):
        return self.record(x, running_mean, running_var, weight, bias, residual,
                           num_batches_tracked)

    def function(self, x, running_mean, running_var, weight, bias, residual,
                 num_batches_tracked):
        """The call recorded through :class:`_GradFunction`."""
        return _apply(x, running_mean, running_var, weight, bias, residual, num_batches_tracked,
                      self)

    def forward(self, x, running_mean, running_var, weight, bias, residual,
                num_batches_tracked):
        """(y, mean, var): the batch statistics (training) or fp32 copies of the running ones
        (eval), saved for the backward, as the full path's op returns them."""
        y = torch.empty_like(x)
        if self.training:
            mean, var = self.launch(x, residual, weight, bias, y, None, None, running_mean,
                                    running_var, num_batches_tracked)
        else:
            mean, var = running_mean.to(_F32, copy=True), running_var.to(_F32, copy=True)
            self.launch(x, residual, weight, bias, y, mean, var)
        return y, mean, var

    def save(self, ctx, x, residual, weight, bias, mean, var):
        """Save what the full path's op saves: the (N, C, S) views of ``x`` and ``residual``
        (the same saved tensors: ``torch.utils.checkpoint`` compares them between the forward
        and its recomputation, either of which may be the first call of a signature)."""
        if not self.dim3:
            N, C, S = self.nchw
            x = x.view(N, C, S)
            if residual is not None:
                residual = residual.view(N, C, S)
        ctx.save_for_backward(x, residual, weight, bias, mean, var)

    def grads(self, x, residual, weight, bias, mean, var, need, dy, shape):
        """The full path's backward (``batch_norm_act_bwd`` on the (N, C, S) views ``x``,
        ``residual``; ``need`` per op input, ``shape``: ``x``'s): ``(dx, None, None, dweight,
        dbias, dresidual)``."""
        if not self.dim3:
            dy = dy.reshape(self.nchw)
        dres_needed = residual is not None and need[5]
        dx, dw, db, dres = self.bwd_op(dy, x, residual, weight, bias, mean, var, self.training,
                                       self.eps, self.act, self.act_param,
                                       dres_needed and self.act != 0)
        if dres_needed and self.act == 0:
            dres = dy
        return (dx.reshape(shape) if need[0] else None, None, None,
                dw.to(weight.dtype) if weight is not None and need[3] else None,
                db.to(bias.dtype) if bias is not None and need[4] else None,
                dres.reshape(shape) if dres_needed else None)

    def node_forward(self, x, running_mean, running_var, weight, bias, residual,
                     num_batches_tracked):
        """The C++ node's forward (:func:`tilefuse.fused._fast.node_plan`): ``y`` and the
        saved tensors (``x`` and ``residual`` as passed: the node's backward views them)."""
        y, mean, var = self.forward(x, running_mean, running_var, weight, bias, residual,
                                    num_batches_tracked)
        return y, (x, residual, weight, bias, mean, var)


def _node_backward(plan, saved, needs, dy):
    """The C++ node's backward (inputs: ``x, running_mean, running_var, weight, bias,
    residual, num_batches_tracked``)."""
    x, residual, weight, bias, mean, var = saved
    shape = x.shape
    if not plan.dim3:
        x = x.view(plan.nchw)
        residual = None if residual is None else residual.view(plan.nchw)
    return plan.grads(x, residual, weight, bias, mean, var, needs, dy, shape) + (None,)


_node_backward.__name__ = "TilefuseBatchNormBackward"  # (the node's name: grad_fn.name())


class _GradFunction(torch.autograd.Function):
    """``y = batch_norm_act(...)`` over the caller's tensors (one output); the plan's forward
    and backward."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, residual, num_batches_tracked,
                plan):
        y, mean, var = plan.forward(x, running_mean, running_var, weight, bias, residual,
                                    num_batches_tracked)
        ctx.plan, ctx.x_shape = plan, x.shape
        plan.save(ctx, x, residual, weight, bias, mean, var)
        return y

    @staticmethod
    def backward(ctx, dy):
        return ctx.plan.grads(*ctx.saved_tensors, ctx.needs_input_grad, dy,
                              ctx.x_shape) + (None, None)


# (Function.apply's Python preamble does nothing for this function outside functorch
# transforms, for which no plan is made: call the C apply, as FastOp does)
_apply = _fast._c_apply.__get__(None, _GradFunction)

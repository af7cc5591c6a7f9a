"""Per-signature plans of ``layer_norm_act`` / ``rms_norm_act`` (:mod:`tilefuse.fused.norm`):
what an eager call with the shapes, strides, dtypes, devices and scalars of an earlier, validated
call runs instead of the checks and the custom op's set-up.

A plan holds no tensor of the caller's: it allocates the output (and, with grad, the row
statistics) and makes the full path's launch (:func:`tilefuse.kernels.norm.bind_norm_fwd`) on
the caller's tensors, whose rows are read through the bound strides (an N-D ``x`` is passed as
is: the full path's ``(M, N)`` view has the same first element). With grad the plan is one
autograd node (the C++ one of :func:`tilefuse.fused._fast.node_plan`, else an
``autograd.Function``) whose backward reshapes as the full path's view nodes would and calls the
same backward op, so outputs and gradients are the same bits.
"""
from __future__ import annotations

import torch

from tilefuse._validate import all_dense
from tilefuse.fused._fast import _c_apply, act_code, allocator, node_plan, saving_hooked
from tilefuse.fused._fast import use_torch_path as _use_torch


class _Plan:
    """The bound launch and what the backward needs: rows ``M``, row length ``N``, the op's
    scalars, the backward op and the parameters' shapes (a multi-dim ``normalized_shape``)."""

    __slots__ = ("launch", "alloc", "M", "N", "is_rms", "act", "param", "bwd", "x_shape",
                 "p_shape")

    def __init__(self, launch, alloc, M, N, is_rms, act, param, bwd, x_shape, p_shape):
        self.launch, self.alloc, self.M, self.N = launch, alloc, M, N
        self.is_rms, self.act, self.param, self.bwd = is_rms, act, param, bwd
        self.x_shape, self.p_shape = x_shape, p_shape


def _forward(plan, x, residual, weight, bias):
    """The full path's ``norm_act_fwd`` launch: ``y`` and the row statistics."""
    y = plan.alloc(x)
    f32 = torch.float32
    mean = x.new_empty(0 if plan.is_rms else plan.M, dtype=f32)
    rstd = x.new_empty(plan.M, dtype=f32)
    plan.launch(x, residual, weight, bias, y, None if plan.is_rms else mean, rstd, None)
    return y, mean, rstd


def _grads(p, saved, need_x, need_res, need_w, need_b, dy):
    """``(dx, dresidual, dweight, dbias)``: the full path's ``norm_act_bwd`` on the ``(M, N)``
    views of the saved ``(x, residual, weight, bias, mean, rstd)``."""
    x, residual, weight, bias, mean, rstd = saved
    M, N = p.M, p.N
    need_dw = weight is not None and need_w
    need_db = bias is not None and need_b
    dx, dw, db = p.bwd(dy.reshape(M, N), x.reshape(M, N),
                       None if residual is None else residual.reshape(M, N),
                       None if weight is None else weight.reshape(N),
                       None if bias is None else bias.reshape(N), mean, rstd, p.is_rms,
                       p.act, p.param, need_dw, need_db, None)
    dx = dx.view(p.x_shape)
    return (dx if need_x else None,
            dx.to(residual.dtype) if (residual is not None and need_res) else None,
            dw.view(p.p_shape) if need_dw else None, db.view(p.p_shape) if need_db else None)


def _node_backward(plan, saved, needs, dy):
    """The C++ node's backward (inputs ``(x, weight, bias, residual)``)."""
    dx, dres, dw, db = _grads(plan, saved, needs[0], needs[3], needs[1], needs[2], dy)
    return dx, dw, db, dres


_node_backward.__name__ = "TilefuseRowNormBackward"  # (the node's name: grad_fn.name())


class _PlannedRowNorm(torch.autograd.Function):
    """A planned call with grad: the forward stores the statistics as the full path's
    ``norm_act_fwd`` does; the backward is its ``norm_act_bwd`` on the ``(M, N)`` views."""

    @staticmethod
    def forward(ctx, plan, x, residual, weight, bias):
        y, mean, rstd = _forward(plan, x, residual, weight, bias)
        if saving_hooked():  # checkpoint compares them with the full path's: the 2-D views
            M, N = plan.M, plan.N
            x, residual, weight, bias = (t if t is None else t.view(s) for t, s in (
                (x, (M, N)), (residual, (M, N)), (weight, (N,)), (bias, (N,))))
        ctx.save_for_backward(x, residual, weight, bias, mean, rstd)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        return (None,) + _grads(ctx.plan, ctx.saved_tensors, need[1], need[2], need[3], need[4],
                                dy)


_apply_planned = _c_apply.__get__(None, _PlannedRowNorm)


def make_plan(x, N, weight, bias, eps, activation, residual, is_rms, y, grad, bwd):
    """``plan(x, weight, bias, residual)`` for later calls with the signature of this validated
    one (``y``: its output; ``N``: the normalized size; ``eps`` resolved; ``bwd``: the backward
    op), or None where a later call needs more than allocate + launch: the torch path, an empty
    tensor, an activation module, rows that are not a view of ``x``, a broadcast residual,
    strided parameters."""
    if _use_torch(x) or y.numel() == 0 or not (
            activation is None or type(activation) in (str, tuple)):
        return None
    M = x.numel() // N
    if residual is not None and residual.shape != x.shape:
        return None  # (broadcast: the full path expands it)
    views = [t if t is None or t.shape == (M, N) else t.reshape(M, N) for t in (x, residual)]
    for raw, view in zip((x, residual), views):
        if raw is not None and view.data_ptr() != raw.data_ptr():
            return None  # (the full path's reshape copies)
    if not all_dense(weight, bias):
        return None  # (the full path copies strided parameters)
    act, act_param = act_code(activation)
    from tilefuse.kernels.norm import bind_norm_fwd

    launch = bind_norm_fwd(views[0], views[1], weight is not None, bias is not None,
                           float(eps), is_rms, act, act_param, grad)
    alloc = allocator(x, y)
    if grad:
        p_shape = (weight if weight is not None else bias if bias is not None else x).shape
        plan = _Plan(launch, alloc, M, N, is_rms, act, act_param, bwd, x.shape, p_shape)

        def forward(x, weight, bias, residual):
            y, mean, rstd = _forward(plan, x, residual, weight, bias)
            return y, (x, residual, weight, bias, mean, rstd)
        return node_plan(lambda x, weight, bias, residual: _apply_planned(
            plan, x, residual, weight, bias), forward, _node_backward, plan)

    def run(x, weight, bias, residual):
        y = alloc(x)
        launch(x, residual, weight, bias, y, None, None, None)
        return y
    return run

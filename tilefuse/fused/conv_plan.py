"""Per-signature plans of :func:`tilefuse.ops.conv2d` (the eager hot path).

The first eager call with a signature (every tensor's shape, strides, dtype and device, the
scalar arguments with their types, the activations, ``TILEFUSE_BACKEND``, the TF32 setting that
the op reads, which tensors require grad) runs the op's full path, which validates the
arguments and raises on bad ones; the signature's plan is then built and serves the next calls:
the output allocated with the full path's shape and strides, the kernel launched through
:func:`tilefuse.kernels.conv_fwd.bind_conv2d_fwd`, the float launch of the same launcher the
full path runs (the same arguments, the same bits).

* no gradient needed: a closure (allocate, launch);
* a gradient needed: one autograd node over the caller's tensors (the C++ one of
  :func:`tilefuse.fused._fast.node_plan`, else :class:`_PlannedConv`) with one output, saving what the op's ``setup_context`` saves (``x``, ``weight`` and the
  stored ``z`` / ``u`` or an empty tensor); its backward is the op's own
  (:func:`tilefuse.fused.conv.input_grads`, the custom-op backward), so gradients are the bits
  of the full path.

Not planned (the full path on every call): unbatched (3-D) input, a residual broadcast to the
output, the torch backend, activation modules (parsed on every call: their parameters may
change; not remembered). Plans are skipped while compiling or tracing, under
:func:`tilefuse.fused._fast.custom_op_path`, under autocast and under functorch transforms.
"""
from __future__ import annotations

import torch

from tilefuse._backend import backend_of
from tilefuse.fused import _fast
from tilefuse.fused._fast import act_code, lazy_module, remember

_kernels = lazy_module("tilefuse.kernels.conv_fwd")
_CL = torch.channels_last


def geometry_key(stride, padding, dilation, groups):
    """The plan-key part of conv2d's geometry arguments (the op's plans and its cached
    :func:`tilefuse.fused.conv.conv_geometry`): ints as they are, other forms through
    :func:`arg_key`, ``groups`` with its type (``True == 1`` as dict keys; a bool raises)."""
    return (stride if type(stride) is int else arg_key(stride),
            padding if type(padding) is int else arg_key(padding),
            dilation if type(dilation) is int else arg_key(dilation), groups, type(groups))


def arg_key(v):
    """The plan-key part of a stride / padding / dilation that is not an int: the value with
    its type and its elements' types (as dict keys ``True == 1`` and ``1.0 == 1``; a bool or a
    float element raises in validation, on every call); TypeError where unhashable."""
    t = type(v)
    if t is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v  # (the common form as it is: no other form's key equals a pair of ints)
    if t is tuple or t is list:
        return t, tuple(v), tuple(map(type, v))
    hash(v)
    return t, v


def first_call(plans, key, full, input, weight, bias, stride, padding, dilation, groups,
               activation, residual, post_activation):
    """A call whose signature has no plan yet: the full path (validating: an error raises and
    nothing is remembered), then the signature's plan, or None (the full path) where it takes
    none. Module activations are not remembered."""
    y = full(input, weight, bias, stride, padding, dilation, groups, activation, residual,
             post_activation)
    for a in (activation, post_activation):
        if a is not None and type(a) not in (str, tuple):
            return y
    remember(plans, key, make_plan(input, weight, bias, residual, stride, padding, dilation,
                                   groups, activation, post_activation, y, key[-2], key[-1]))
    return y


def make_plan(x, weight, bias, residual, stride, padding, dilation, groups, activation,
              post_activation, y, grad_xwb: bool, grad_res: bool):
    """The plan of a call that the full path ran (validated) and returned ``y`` for, or None.
    ``grad_xwb``: grad mode is on and ``x``, ``weight`` or ``bias`` requires grad;
    ``grad_res``: grad mode is on and ``residual`` requires grad."""
    if x.dim() != 4 or backend_of(x) != "triton":
        return None
    from tilefuse.fused import conv as op

    stride, pad, dilation, groups, out_size = op.conv_geometry(x.shape, weight.shape, stride,
                                                               padding, dilation, groups)
    if residual is not None and residual.shape != y.shape:
        return None  # (broadcast: an expanded view, its gradient reduced by autograd)
    act, act_param = act_code(activation)
    post, post_param = act_code(post_activation)
    channels_last = op._channels_last(x) or op._channels_last(weight)
    # as in the op: channels innermost in a CUDA channels_last weight too (a copy per call)
    to_cl = x.is_cuda and channels_last and weight.stride(1) != 1 and weight.shape[1] > 1
    w = weight.contiguous(memory_format=_CL) if to_cl else weight
    grad = bool(grad_xwb or grad_res)
    save_pre = bool(act) and bool(grad_xwb)   # the op's flags for the same call
    save_mid = bool(post) and grad
    launch = _kernels().bind_conv2d_fwd(x, w, y, bias, residual, save_pre, save_mid, stride,
                                        pad, dilation, groups, act, act_param, post, post_param,
                                        x.is_cuda and op._allow_tf32())
    alloc = _fast.allocator(x, y)
    if grad:
        plan = _Plan(alloc, launch, to_cl, save_pre, save_mid, x.new_empty(0), op.input_grads,
                     ((list(stride), list(pad), list(dilation), groups),
                      (act, act_param, post, post_param), bias is not None,
                      residual is not None, bias.dtype if bias is not None else None))
        return _fast.node_plan(
            lambda x, weight, bias, residual: _apply(x, weight, bias, residual, plan),
            lambda x, weight, bias, residual: _planned_forward(plan, x, weight, bias, residual),
            _node_backward, plan)
    if to_cl:
        def run_cl(x, weight, bias, residual):
            y = alloc(x)
            launch(x, weight.contiguous(memory_format=_CL), bias, residual, y, None, None)
            return y
        return run_cl

    def run(x, weight, bias, residual):
        y = alloc(x)
        launch(x, weight, bias, residual, y, None, None)
        return y
    return run


class _Plan:
    """What a planned call with a gradient needs: the output allocator, the bound launch, the
    op's save flags, an empty tensor (what the op saves for a ``z`` / ``u`` it did not store),
    and the backward (:func:`tilefuse.fused.conv.input_grads`) with its constants."""

    __slots__ = ("alloc", "launch", "to_cl", "save_pre", "save_mid", "empty", "grads", "bwd")

    def __init__(self, alloc, launch, to_cl, save_pre, save_mid, empty, grads, bwd):
        self.alloc, self.launch, self.to_cl = alloc, launch, to_cl
        self.save_pre, self.save_mid, self.empty = save_pre, save_mid, empty
        self.grads, self.bwd = grads, bwd


def _planned_forward(plan, x, weight, bias, residual):
    """The op's forward with the bound launch: ``y`` and what its ``setup_context`` saves."""
    y = plan.alloc(x)
    pre = torch.empty_like(y) if plan.save_pre else None
    mid = torch.empty_like(y) if plan.save_mid else None
    # (detach: the copy is the launch's operand, not a node of the graph)
    plan.launch(x, weight.detach().contiguous(memory_format=_CL) if plan.to_cl else weight,
                bias, residual, y, pre, mid)
    empty = plan.empty
    return y, (x, weight, empty if pre is None else pre, empty if mid is None else mid)


def _node_backward(plan, saved, needs, dy):
    """The C++ node's backward: the op's (inputs ``(x, weight, bias, residual)``)."""
    return plan.grads(dy, *saved, needs, *plan.bwd)


_node_backward.__name__ = "TilefuseConv2dBackward"  # (the node's name: grad_fn.name())


class _PlannedConv(torch.autograd.Function):
    """``y = conv2d(...)`` over the caller's tensors (one output): the forward of the op's
    implementation with the bound launch, saving the tensors its ``setup_context`` saves (the
    same count and metadata: ``torch.utils.checkpoint`` compares them between a forward and its
    recomputation, either of which may be the first call of a signature); the op's backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, plan):
        y, saved = _planned_forward(plan, x, weight, bias, residual)
        ctx.save_for_backward(*saved)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, pre, mid = ctx.saved_tensors
        plan = ctx.plan
        return plan.grads(dy, x, weight, pre, mid, ctx.needs_input_grad, *plan.bwd) + (None,)


# (Function.apply's Python preamble does nothing for this function outside functorch
# transforms, for which no plan is made: call the C apply, as FastOp does)
_apply = _fast._c_apply.__get__(None, _PlannedConv)

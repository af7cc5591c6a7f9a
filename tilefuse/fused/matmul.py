"""Custom ops for the fused matmul: ``tilefuse::matmul`` and ``tilefuse::activation_backward``.

Backward design (measured choice documented in README "Matmul"): when an activation is fused and
grad is needed, the forward epilogue also writes the pre-activation ``z = A@B + bias`` (one extra
store, no extra pass). Backward runs one Triton elementwise pass ``dz = dy * act'(z)``, then
``dA = dz @ B^T`` and ``dB = A^T @ dz`` on the same matmul kernel through strides (no transposed
copies), and ``dbias = dz.sum(rows)``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import backend_of
from tilefuse._validate import (FLOAT_DTYPES_F64, check_broadcastable, check_same_dtype,
                                check_tensor, float_tensor, same_device)
from tilefuse.activations import NAMES, torch_activation, torch_activation_grad
from tilefuse.fused import _fast
from tilefuse.fused._fast import (act_code, autocast_maybe_on, fast_op, needs_grad, node_plan,
                                  saving_hooked)
from tilefuse.fused.matmul_plan import (OpPlans, _allow_tf32, add_plan, find_plan, hot_plan,
                                       launch_transposed)
from torch._C import _any_requires_grad, is_grad_enabled

_is_compiling = _fast._is_compiling
_FORCE_CUSTOM_OP = _fast._FORCE_CUSTOM_OP  # (the list itself: custom_op_path sets its item)


def _torch_matmul(a, b, bias, residual, activation, act_param, out_dtype, want_pre):
    compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    z = torch.matmul(a.to(compute), b.to(compute))
    if bias is not None:
        z = z + bias.to(compute)
    pre = z.to(a.dtype) if want_pre else None
    y = torch_activation(z, NAMES[activation], act_param)
    if residual is not None:
        y = y + residual.to(compute)
    return y.to(out_dtype), pre


def _matmul_impl(a: Tensor, b: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                 activation: int, act_param: float, out_dtype: torch.dtype,
                 save_pre: bool) -> Tuple[Tensor, Tensor]:
    """a (B,M,K) @ b (B,K,N) -> (out (B,M,N), pre-activation (B,M,N) or empty); or the 2-D
    product a (M,K) @ b (K,N) -> (M,N) (no batch views on the hot path)."""
    if backend_of(a) == "torch":
        out, pre = _torch_matmul(a, b, bias, residual, activation, act_param, out_dtype, save_pre)
        return out.contiguous(), (pre.contiguous() if pre is not None else a.new_empty(0))
    from tilefuse.kernels.matmul import launch_matmul

    shape = _out_shape(a, b)
    # sizes as separate ints: a shape tuple costs ~2 us more to parse per call
    out = torch.empty(*shape, device=a.device, dtype=out_dtype)
    pre = torch.empty(*shape, device=a.device, dtype=a.dtype) if save_pre else None
    launch_matmul(a, b, out, bias=bias, residual=residual, pre=pre, activation=activation,
                  act_param=act_param, allow_tf32=a.is_cuda and _allow_tf32())
    return out, (pre if pre is not None else a.new_empty(0))


def _out_shape(a, b):
    if a.dim() == 2:
        return (a.shape[0], b.shape[1])
    return (a.shape[0], a.shape[1], b.shape[2])


def _matmul_fake(a, b, bias, residual, activation, act_param, out_dtype, save_pre):
    shape = _out_shape(a, b)
    out = a.new_empty(shape, dtype=out_dtype)
    pre = a.new_empty(shape) if save_pre else a.new_empty(0)
    return out, pre


def _act_bwd_impl(grad: Tensor, z: Tensor, activation: int, act_param: float,
                  out_dtype: torch.dtype) -> Tensor:
    """dz = grad * act'(z), elementwise; grad and z have the same shape."""
    if backend_of(z) == "torch":
        compute = torch.float64 if z.dtype == torch.float64 else torch.float32
        g = torch_activation_grad(z.to(compute), NAMES[activation], act_param)
        return (grad.to(compute) * g).to(out_dtype)
    from tilefuse.kernels.activations import launch_activation_backward

    grad = grad.contiguous()
    z = z.contiguous()
    dz = torch.empty(z.shape, device=z.device, dtype=out_dtype)
    return launch_activation_backward(grad, z, dz, activation, act_param)


def _act_bwd_fake(grad, z, activation, act_param, out_dtype):
    return z.new_empty(z.shape, dtype=out_dtype)


activation_backward_op = fast_op("activation_backward", _act_bwd_impl, fake=_act_bwd_fake)


def _setup_context(ctx, inputs, output):
    a, b, bias, residual, activation, act_param, out_dtype, save_pre = inputs
    ctx.activation = activation
    ctx.act_param = act_param
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    # (no pre-activation without an activation: the planned call saves none either, and
    # torch.utils.checkpoint compares the count of saved tensors between the two)
    ctx.save_for_backward(a, b, output[1] if activation else None)


def _mm(x, y):
    out, _ = matmul_op(x, y, None, None, 0, 0.0, x.dtype, False)
    return out


def _backward(ctx, grad_out, grad_pre):
    a, b, pre = ctx.saved_tensors
    return _gemm_backward(a, b.transpose(-1, -2), pre, ctx.needs_input_grad, ctx.activation,
                          ctx.act_param, ctx.has_bias, ctx.has_residual, ctx.bias_dtype,
                          grad_out) + (None,) * 4


def _gemm_backward(a, b_t, pre, need, activation, act_param, has_bias, has_residual, bias_dtype,
                   grad_out):
    """``(da, db, dbias, dresidual)`` of ``act(a @ b + bias) + residual`` given ``b_t``, ``b``'s
    transpose (a planned ``linear`` passes its weight), and the saved pre-activation."""
    if grad_out is None:
        return (None,) * 4
    dres = grad_out if (has_residual and need[3]) else None
    if not (need[0] or need[1] or need[2]):
        return None, None, None, dres
    if activation != 0:
        if pre.numel() == 0 and grad_out.numel() != 0:
            raise RuntimeError("tilefuse.matmul: pre-activation was not saved; cannot backprop "
                               "through the fused activation")
        dz = activation_backward_op(grad_out, pre, activation, act_param, a.dtype)
    else:
        dz = grad_out.to(a.dtype)
    da = _mm(dz, b_t) if need[0] else None
    db = _mm(a.transpose(-1, -2), dz) if need[1] else None
    dbias = None
    if has_bias and need[2]:
        acc = torch.float64 if dz.dtype == torch.float64 else torch.float32
        dims = (0,) if dz.dim() == 2 else (0, 1)
        dbias = dz.sum(dim=dims, dtype=acc).to(bias_dtype)
    return da, db, dbias, dres


matmul_op = fast_op("matmul", _matmul_impl, fake=_matmul_fake, setup_context=_setup_context,
                    backward=_backward)


# --------------------------------------------------------------------------------------------
# public functional API (re-exported by tilefuse.ops)
# --------------------------------------------------------------------------------------------
class _PlannedMatmul(torch.autograd.Function):
    """A planned call with a gradient: the forward is the plan's, shared with the C++ node (the
    bound launch, with the pre-activation store when an activation is fused) and the backward
    is the op's own (:func:`_gemm_backward`): the gradients of the full path, bit for bit, with
    one output and no per-call set-up. ``ctx`` holds the plan's constant ``state`` in one attribute
    (autograd's per-call cost is most of a small call's host time). With ``state[5]`` (a
    planned ``linear``) ``b`` is the weight, ``(N, K)``: the full path's ``weight.t()`` view
    and its autograd node are left out, and the weight's gradient is the transpose of ``b``'s,
    as that node would give; ``state[6]``: the saved ``b`` is that weight (under saved-tensor
    hooks, e.g. ``torch.utils.checkpoint``, the forward saves ``weight.t()`` as the full path
    does)."""

    @staticmethod
    def forward(ctx, plan, a, b, bias, residual):  # (plan first: a C partial binds it)
        forward, state, hooked = plan
        out, saved = forward(a, b, bias, residual)
        if hooked is not None and saving_hooked():
            # checkpoint compares the saved tensors with the full path's: weight.t()
            state, saved = hooked, (a, b.t()) + saved[2:]
        ctx.save_for_backward(*saved)
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (None,) + _planned_backward(ctx.state, ctx.saved_tensors,
                                           ctx.needs_input_grad[1:], grad_out)


_apply_planned = _fast._c_apply.__get__(None, _PlannedMatmul)


def _planned_backward(state, saved, needs, grad_out):
    """The gradients ``(da, db, dbias, dresidual)`` of a planned call, recorded by
    :class:`_PlannedMatmul` or by the C++ node (:mod:`tilefuse._graph_node`): ``state`` is the
    plan's, ``saved`` is ``(a, b[, pre])``."""
    act, act_param, has_bias, has_residual, bias_dtype, weight, saved_weight = state
    a, b = saved[0], saved[1]
    da, db, dbias, dres = _gemm_backward(
        a, b if saved_weight else b.transpose(-1, -2), saved[2] if act else None, needs, act,
        act_param, has_bias, has_residual, bias_dtype, grad_out)
    return da, (db.t() if weight and db is not None else db), dbias, dres


_planned_backward.__name__ = "TilefuseMatmulBackward"  # (the node's name: grad_fn.name())


def _plan_2d(a, b, bias, residual, activation, out_dtype, grad=False, weight=False):
    """The plan of a validated call on 2-D operands: ``plan(a, b, bias, residual)`` allocates
    the output and makes :func:`_matmul_impl`'s launch with every non-tensor argument bound
    (:func:`tilefuse.kernels.matmul.bind_matmul`); with ``grad``, through
    :class:`_PlannedMatmul`. None where the call needs more than that (batch dims, autocast
    casts, broadcast residual, split-K, the torch backend): those calls take the full path
    every time. (A signature the sm_90 TMA kernel can read is planned with both launches and
    a per-call test of the operands' alignment.) ``weight``: the plan is called with ``b``'s
    transpose, a ``linear`` weight ``(N, K)`` (a launch that reads only pointers takes it as
    is)."""
    if a.dim() != 2 or b.dim() != 2 or backend_of(a) != "triton":
        return None
    M, N = a.shape[0], b.shape[1]
    od = a.dtype if out_dtype is None else out_dtype
    if residual is not None and (residual.shape != (M, N) or residual.dtype != od):
        return None
    if type(activation) not in (str, tuple, type(None)) or (grad and od != a.dtype):
        return None  # (an activation module is parsed on every call: its parameters may change)
    from tilefuse.kernels.matmul import bind_matmul

    act, act_param = act_code(activation)
    launch = bind_matmul(a, b, torch.empty(M, N, device=a.device, dtype=od), bias, residual,
                         act, act_param, a.is_cuda and _allow_tf32(), save_pre=grad and act != 0)
    if launch is None:
        return None
    if weight and not getattr(launch, "pointers_only", False):
        launch = launch_transposed(launch)
    if not grad:
        return launch
    if act:  # the launch also stores the pre-activation, saved
        def forward(a, b, bias, residual):
            out, pre = launch(a, b, bias, residual)
            return out, (a, b, pre)
    else:
        def forward(a, b, bias, residual):
            return launch(a, b, bias, residual), (a, b)
    state = (act, act_param, bias is not None, residual is not None,
             bias.dtype if bias is not None else None, weight, weight)
    # (weight: under saved-tensor hooks the forward saves weight.t(), as the full path does)
    plan = (forward, state, state[:-1] + (False,) if weight else None)
    function_plan = functools.partial(_apply_planned, plan)  # (a C call: no Python frame)
    return node_plan(function_plan, forward, _planned_backward, state)


def matmul(a: Tensor, b: Tensor, bias: Optional[Tensor] = None, activation=None,
           residual: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``act(a @ b + bias) + residual`` in one kernel.

    Args:
        a: ``(..., M, K)`` or ``(K,)`` floating tensor (fp32/fp16/bf16/fp64; fp64 runs the same
            Triton kernel with an fp64 ``tl.dot`` and fp64 accumulation).
        b: ``(K, N)``, ``(..., K, N)`` or ``(K,)``; batch dims broadcast like :func:`torch.matmul`.
            A 1-D ``a`` (``b``) is treated as ``(1, K)`` (``(K, 1)``) and that dim is removed from
            the output, as torch does (two 1-D inputs give a 0-d dot product).
        bias: optional ``(N,)`` (``(1,)`` when ``b`` is 1-D), added before the activation.
        activation: ``None``, a name (``"relu"``, ``"relu6"``, ``"leaky_relu"``, ``"gelu"``,
            ``"gelu_tanh"``, ``"silu"``, ``"sigmoid"``, ``"tanh"``) or ``(name, param)``.
        residual: optional tensor broadcastable to the output, added after the activation.
        out_dtype: output dtype (default: the inputs' dtype).

    Any strides are accepted; a 2-D ``b`` with an N-D ``a`` folds the batch into M (a copy only if
    ``a``'s leading dims cannot be flattened as a view). fp32 inputs use TF32 on CUDA when
    ``torch.backends.cuda.matmul.allow_tf32`` is set, as torch does.

    Under ``torch.autocast`` the floating inputs (bias included) are cast to the autocast dtype,
    as torch does for ``mm``/``linear``, and ``residual`` to the output dtype (docs/amp.md).

    >>> import torch, tilefuse
    >>> x, w = torch.randn(4, 8), torch.randn(8, 3)
    >>> y = tilefuse.ops.matmul(x, w, bias=torch.zeros(3), activation="relu")
    >>> bool(torch.allclose(y, torch.relu(x @ w), atol=1e-5))
    True
    """
    if _FORCE_CUSTOM_OP[0] or _is_compiling():
        return _matmul(a, b, bias, activation, residual, out_dtype)
    # eager: a call with the signature of an earlier one reuses its plan
    grad = is_grad_enabled() and _any_requires_grad(a, b, bias, residual)
    hot = _MATMUL_HOT.get(grad)
    if hot is not None:
        plan = hot_plan(hot, a, b, bias, residual, activation, out_dtype)
        if plan is not None:
            return plan(a, b, bias, None)
    plan = find_plan(_MATMUL, grad, a, b, bias, residual, activation, out_dtype)
    if plan is not None:
        return plan(a, b, bias, residual)
    out = _matmul(a, b, bias, activation, residual, out_dtype)
    add_plan(_MATMUL, grad, a, b, bias, residual, activation, out_dtype, _plan_2d)
    return out


_MATMUL = OpPlans()
_MATMUL_HOT = _MATMUL.hot


def _matmul(a, b, bias, activation, residual, out_dtype):
    """:func:`matmul` without the plan lookup: validation, autocast, broadcasting, launch."""
    float_tensor("a", a)
    float_tensor("b", b)
    if a.dim() == 0 or b.dim() == 0:
        check_tensor("a", a, min_ndim=1)
        check_tensor("b", b, min_ndim=1)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES_F64, ndim=1)
    if residual is not None:
        float_tensor("residual", residual)
    same_device(a=a, b=b, bias=bias, residual=residual)
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype)
                                  or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    if autocast_maybe_on() and _autocast.enabled(a):
        a, b, bias = _autocast.lower(a, b, bias)
        if residual is not None:
            (residual,) = _autocast.cast(out_dtype or a.dtype, residual)
    if a.dtype != b.dtype or (bias is not None and bias.dtype != a.dtype):
        check_same_dtype(a=a, b=b, bias=bias)
    act, act_param = act_code(activation)
    if out_dtype is None:
        out_dtype = a.dtype
    if b.dim() == 2 and a.dim() >= 2:  # the common case: no 1-D rules, batch folded into M
        return _matmul_2d(a, b, bias, residual, act, act_param, out_dtype)
    squeeze_m, squeeze_n = a.dim() == 1, b.dim() == 1   # torch.matmul's 1-D rules
    if squeeze_m:
        a = a.unsqueeze(0)
    if squeeze_n:
        b = b.unsqueeze(-1)
    M, K = a.shape[-2], a.shape[-1]
    if b.shape[-2] != K:
        raise ValueError(f"inner dimensions do not match: a is {tuple(a.shape)} (K={K}) but b is "
                         f"{tuple(b.shape)} (K={b.shape[-2]})")
    N = b.shape[-1]
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if b.dim() == 2:
        out_shape = tuple(a.shape[:-1]) + (N,)
        a3 = a.reshape(math.prod(a.shape[:-1]), K)
        b3 = b
    else:
        try:
            batch = torch.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
        except RuntimeError:
            raise ValueError(f"batch dimensions of a {tuple(a.shape)} and b {tuple(b.shape)} do "
                             f"not broadcast") from None
        out_shape = tuple(batch) + (M, N)
        nb = math.prod(batch)  # not -1: reshape cannot infer it when M, K or N is 0
        a3 = a.expand(tuple(batch) + (M, K)).reshape(nb, M, K)
        b3 = b.expand(tuple(batch) + (K, N)).reshape(nb, K, N)
    final_shape = out_shape[:-2] + ((M,) if not squeeze_m else ()) + ((N,) if not squeeze_n
                                                                        else ())
    r3 = None
    if residual is not None:
        _check_residual(residual, final_shape, out_dtype)
        r = residual.expand(final_shape)
        if squeeze_n:
            r = r.unsqueeze(-1)
        if squeeze_m:
            r = r.unsqueeze(-2)
        r3 = r.expand(out_shape).reshape(a3.shape[:-1] + (N,))
    save_pre = act != 0 and needs_grad(a3, b3, bias)
    out, _ = matmul_op(a3, b3, bias, r3, act, act_param, out_dtype, save_pre)
    return out.reshape(final_shape)


def _check_residual(residual, shape, out_dtype):
    check_broadcastable("residual", residual, shape)
    if residual.dtype != out_dtype:
        raise TypeError(f"residual must have the output dtype {out_dtype}, got "
                        f"{residual.dtype}")


def _matmul_2d(a, b, bias, residual, act, act_param, out_dtype):
    """``a`` (..., M, K) @ ``b`` (K, N), validated: the batch is folded into M (a view when
    ``a``'s leading dims flatten, else a copy) and the product runs as one 2-D launch."""
    K, N = b.shape
    if a.shape[-1] != K:
        raise ValueError(f"inner dimensions do not match: a is {tuple(a.shape)} "
                         f"(K={a.shape[-1]}) but b is {tuple(b.shape)} (K={K})")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    a2 = a if a.dim() == 2 else a.reshape(math.prod(a.shape[:-1]), K)
    r2 = None
    if residual is not None:
        shape = a.shape[:-1] + (N,)
        if residual.shape != shape:
            _check_residual(residual, shape, out_dtype)
            residual = residual.expand(shape)
        elif residual.dtype != out_dtype:
            _check_residual(residual, shape, out_dtype)
        r2 = residual if residual.dim() == 2 else residual.reshape(a2.shape[0], N)
    save_pre = act != 0 and needs_grad(a2, b, bias)
    out, _ = matmul_op(a2, b, bias, r2, act, act_param, out_dtype, save_pre)
    return out if a.dim() == 2 else out.view(a.shape[:-1] + (N,))

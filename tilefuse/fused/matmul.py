"""Custom ops for the fused matmul: ``tilefuse::matmul`` and ``tilefuse::activation_backward``.

Backward design (measured choice documented in README "Matmul"): when an activation is fused and
grad is needed, the forward epilogue also writes the pre-activation ``z = A@B + bias`` (one extra
store, no extra pass). Backward runs one Triton elementwise pass ``dz = dy * act'(z)``, then
``dA = dz @ B^T`` and ``dB = A^T @ dz`` on the same matmul kernel through strides (no transposed
copies), and ``dbias = dz.sum(rows)``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import backend_for
from tilefuse._validate import (FLOAT_DTYPES_F64, check_broadcastable, check_same_device,
                                check_same_dtype, check_tensor)
from tilefuse.activations import NAMES, activation_code, torch_activation, torch_activation_grad


def _allow_tf32() -> bool:
    # read at run time inside the op (not in traced code), like torch.mm does
    return bool(torch.backends.cuda.matmul.allow_tf32)


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


@torch.library.custom_op("tilefuse::matmul", mutates_args=())
def matmul_op(a: Tensor, b: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
              activation: int, act_param: float, out_dtype: torch.dtype,
              save_pre: bool) -> Tuple[Tensor, Tensor]:
    """a (B,M,K) @ b (B,K,N) -> (out (B,M,N), pre-activation (B,M,N) or empty)."""
    batch, M, _ = a.shape
    N = b.shape[2]
    if backend_for(a) == "torch":
        out, pre = _torch_matmul(a, b, bias, residual, activation, act_param, out_dtype, save_pre)
        return out.contiguous(), (pre.contiguous() if pre is not None else a.new_empty(0))
    from tilefuse.kernels.matmul import launch_matmul

    out = torch.empty((batch, M, N), device=a.device, dtype=out_dtype)
    pre = torch.empty((batch, M, N), device=a.device, dtype=a.dtype) if save_pre else None
    launch_matmul(a, b, out, bias=bias, residual=residual, pre=pre, activation=activation,
                  act_param=act_param, allow_tf32=a.is_cuda and _allow_tf32())
    return out, (pre if pre is not None else a.new_empty(0))


@matmul_op.register_fake
def _(a, b, bias, residual, activation, act_param, out_dtype, save_pre):
    batch, M, _ = a.shape
    N = b.shape[2]
    out = a.new_empty((batch, M, N), dtype=out_dtype)
    pre = a.new_empty((batch, M, N)) if save_pre else a.new_empty(0)
    return out, pre


@torch.library.custom_op("tilefuse::activation_backward", mutates_args=())
def activation_backward_op(grad: Tensor, z: Tensor, activation: int, act_param: float,
                           out_dtype: torch.dtype) -> Tensor:
    """dz = grad * act'(z), elementwise; grad and z have the same shape."""
    if backend_for(z) == "torch":
        g = torch_activation_grad(z.float(), NAMES[activation], act_param)
        return (grad.float() * g).to(out_dtype)
    from tilefuse.kernels.activations import launch_activation_backward

    grad = grad.contiguous()
    z = z.contiguous()
    dz = torch.empty(z.shape, device=z.device, dtype=out_dtype)
    return launch_activation_backward(grad, z, dz, activation, act_param)


@activation_backward_op.register_fake
def _(grad, z, activation, act_param, out_dtype):
    return z.new_empty(z.shape, dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    a, b, bias, residual, activation, act_param, out_dtype, save_pre = inputs
    ctx.activation = activation
    ctx.act_param = act_param
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(a, b, output[1])


def _mm(x, y):
    out, _ = matmul_op(x, y, None, None, 0, 0.0, x.dtype, False)
    return out


def _backward(ctx, grad_out, grad_pre):
    a, b, pre = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    need = ctx.needs_input_grad
    dres = grad_out if (ctx.has_residual and need[3]) else None
    if not (need[0] or need[1] or need[2]):
        return None, None, None, dres, None, None, None, None
    if ctx.activation != 0:
        if pre.numel() == 0 and grad_out.numel() != 0:
            raise RuntimeError("tilefuse.matmul: pre-activation was not saved; cannot backprop "
                               "through the fused activation")
        dz = activation_backward_op(grad_out, pre, ctx.activation, ctx.act_param, a.dtype)
    else:
        dz = grad_out.to(a.dtype)
    da = _mm(dz, b.transpose(1, 2)) if need[0] else None
    db = _mm(a.transpose(1, 2), dz) if need[1] else None
    dbias = None
    if ctx.has_bias and need[2]:
        acc = torch.float64 if dz.dtype == torch.float64 else torch.float32
        dbias = dz.sum(dim=(0, 1), dtype=acc).to(ctx.bias_dtype)
    return da, db, dbias, dres, None, None, None, None


matmul_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public functional API (re-exported by tilefuse.ops)
# --------------------------------------------------------------------------------------------
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
    check_tensor("a", a, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    check_tensor("b", b, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    check_tensor("bias", bias, dtypes=FLOAT_DTYPES_F64, ndim=1, allow_none=True)
    check_tensor("residual", residual, dtypes=FLOAT_DTYPES_F64, allow_none=True)
    check_same_device(a=a, b=b, bias=bias, residual=residual)
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype)
                                  or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    if _autocast.enabled(a):
        a, b, bias = _autocast.lower(a, b, bias)
        if residual is not None:
            (residual,) = _autocast.cast(out_dtype or a.dtype, residual)
    check_same_dtype(a=a, b=b, bias=bias)
    act, act_param = activation_code(activation)
    if out_dtype is None:
        out_dtype = a.dtype
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
        a3 = a.reshape(1, math.prod(a.shape[:-1]), K)
        b3 = b.unsqueeze(0)
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
        check_broadcastable("residual", residual, final_shape)
        if residual.dtype != out_dtype:
            raise TypeError(f"residual must have the output dtype {out_dtype}, got "
                            f"{residual.dtype}")
        r = residual.expand(final_shape)
        if squeeze_n:
            r = r.unsqueeze(-1)
        if squeeze_m:
            r = r.unsqueeze(-2)
        r3 = r.expand(out_shape).reshape(a3.shape[0], a3.shape[1], N)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (a, b, bias))
    out, _ = matmul_op(a3, b3, bias, r3, act, act_param, out_dtype, bool(needs_grad and act != 0))
    return out.reshape(final_shape)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation=None,
           residual: Optional[Tensor] = None) -> Tensor:
    """``act(x @ weight.T + bias) + residual``, the fused form of :func:`torch.nn.functional.linear`.

    ``weight`` is ``(out_features, in_features)`` as in torch; it is read through strides (no
    transposed copy).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES_F64, ndim=2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects in_features="
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    y = matmul(x, weight.t(), bias=bias, activation=activation, residual=residual)
    return y.squeeze(0) if squeeze else y

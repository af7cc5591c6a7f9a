"""Int8 custom ops and their public wrappers.

* ``tilefuse::int8_matmul`` -- one op for both W8A8 (int8 ``a``) and weight-only int8 (float
  ``a``); int8 ``b`` always. Backend: Triton kernel (:mod:`tilefuse.kernels.int8_matmul`) or a
  torch reference path with the same semantics (int64 matmul for the exact int32 accumulator).
* ``tilefuse::quantize_per_row`` -- the fused dynamic per-row quantizer.

Autograd: int8 tensors and scales get no gradient; ``bias`` and ``residual`` do, and so does a
float ``a`` (weight-only; the weight stays frozen). The pre-activation is recomputed with the same
op, ``dz = dy * act'(z)`` runs on the shared activation-backward op, and ``da = (dz * scale) @ q``
dequantizes the weight once, in the backward only.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import _env_backend, backend_of
from tilefuse._validate import (FLOAT_DTYPES, FLOAT_DTYPES_F64, check_broadcastable,
                                check_same_device, check_tensor)
from tilefuse.activations import NAMES, torch_activation
from tilefuse.fused import quant_plans
from tilefuse.fused._fast import (act_code, autocast_maybe_on, fast_op, needs_grad, plan_cache,
                                  plans_allowed, remember, tkey)
from tilefuse.fused.dequant import dequantize_call


def _torch_int8_matmul(a, b, a_scale, b_scale, bias, residual, activation, act_param, out_dtype):
    if a.dtype == torch.int8:
        if a.is_cuda:  # no int64 GEMM on CUDA; fp64 is exact here (|sum| < 2^53 for any K)
            acc = torch.matmul(a.double(), b.double()).long().to(torch.int32)
        else:
            acc = torch.matmul(a.long(), b.long()).to(torch.int32)  # exact; wraps like int32
        if out_dtype == torch.int32:
            return acc
        y = acc.float()
    else:
        y = torch.matmul(a.float(), b.float())
    return _torch_epilogue(y, a_scale, b_scale, bias, residual, activation, act_param, out_dtype)


def _torch_epilogue(y, a_scale, b_scale, bias, residual, activation, act_param, out_dtype):
    """The reference GEMM epilogue on the fp32 product ``y`` (shared with the fp8 op): row and
    column scales (each optional), bias, activation, residual, then the cast to ``out_dtype``."""
    if a_scale is not None:
        y = y * a_scale.float()[:, None]
    if b_scale is not None:
        y = y * b_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    y = torch_activation(y, NAMES[activation], act_param)
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype)


def _int8_impl(a: Tensor, b: Tensor, a_scale: Optional[Tensor], b_scale: Optional[Tensor],
                   bias: Optional[Tensor], residual: Optional[Tensor], activation: int,
                   act_param: float, out_dtype: torch.dtype) -> Tensor:
    """a (M, K) int8|float, b (K, N) int8 -> (M, N) out_dtype (int32 = raw accumulator)."""
    if backend_of(a) == "torch":
        return _torch_int8_matmul(a, b, a_scale, b_scale, bias, residual, activation, act_param,
                                  out_dtype).contiguous()
    from tilefuse.kernels.int8_matmul import launch_int8_matmul

    out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=out_dtype)
    return launch_int8_matmul(a, b, out, a_scale=a_scale, b_scale=b_scale, bias=bias,
                              residual=residual, activation=activation, act_param=act_param)


def _int8_fake(a, b, a_scale, b_scale, bias, residual, activation, act_param, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    a, b, a_scale, b_scale, bias, residual, activation, act_param, out_dtype = inputs
    ctx.activation, ctx.act_param = activation, act_param
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.save_for_backward(a, b, a_scale, b_scale, bias)


def _backward(ctx, grad):
    from tilefuse.fused.matmul import activation_backward_op, matmul_op

    a, b, a_scale, b_scale, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_da = need[0] and a.is_floating_point()
    need_dbias = ctx.has_bias and need[4]
    da = dbias = dres = None
    if need_da or need_dbias:
        if ctx.activation != 0:  # recompute the pre-activation with the same op
            z = int8_matmul_op(a.detach(), b, a_scale, b_scale, bias, None, 0, 0.0, torch.float32)
            dz = activation_backward_op(grad, z, ctx.activation, ctx.act_param, torch.float32)
        else:
            dz = grad.float()
        if need_da:
            dzs = (dz * b_scale.float()[None, :]) if b_scale is not None else dz
            w = b.t().to(a.dtype)  # (N, K): the one dequantization, backward only
            da, _ = matmul_op(dzs.to(a.dtype), w, None, None, 0, 0.0, a.dtype, False)
        if need_dbias:
            dbias = dz.sum(0).to(bias.dtype)
    if ctx.has_residual and need[5]:
        dres = grad
    # no gradient for the scales (quantization parameters are not trained here)
    return da, None, None, None, dbias, dres, None, None, None


int8_matmul_op = fast_op("int8_matmul", _int8_impl, fake=_int8_fake,
                         setup_context=_setup_context, backward=_backward)


def _quantize_impl(x: Tensor) -> Tuple[Tensor, Tensor]:
    """x (M, N) float -> (q (M, N) int8, scale (M,) fp32)."""
    from tilefuse.kernels.quant import torch_quantize_rows

    if backend_of(x) == "torch":
        q, s = torch_quantize_rows(x)
        return q.contiguous(), s.contiguous()
    from tilefuse.kernels.quant import launch_quantize_rows

    q = torch.empty(x.shape, device=x.device, dtype=torch.int8)
    s = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    launch_quantize_rows(x, q, s)
    return q, s


def _quantize_fake(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


quantize_per_row_op = fast_op("quantize_per_row", _quantize_impl, fake=_quantize_fake)


# --------------------------------------------------------------------------------------------
# public functional API (re-exported by tilefuse.ops)
# --------------------------------------------------------------------------------------------
_OUT_DTYPES = (torch.int32, torch.float32, torch.float16, torch.bfloat16)


def _per_row_scale(name: str, s, lead_shape: tuple, M: int) -> Optional[Tensor]:
    """Accept a per-tensor scale (one element) or one per row (shape ``lead`` or ``lead + (1,)``);
    return it as (M,) (stride 0 for per-tensor)."""

    if s is None:
        return None
    check_tensor(name, s, dtypes=FLOAT_DTYPES)
    if s.dim() == 1 and s.shape[0] == M and M != 1:
        return s
    if s.numel() == 1:
        return s.reshape(1).expand(M)
    if tuple(s.shape) in (tuple(lead_shape), tuple(lead_shape) + (1,)):
        return s.reshape(M)
    raise ValueError(f"{name} must have one element (per-tensor) or shape {tuple(lead_shape)} / "
                     f"{tuple(lead_shape) + (1,)} (per-row), got {tuple(s.shape)}")


def _per_col_scale(name: str, s, N: int) -> Optional[Tensor]:
    """Per-tensor (one element) or per-output-channel ((N,), (N, 1) or (1, N)) scale -> (N,)."""
    if s is None:
        return None
    check_tensor(name, s, dtypes=FLOAT_DTYPES)
    if s.dim() == 1 and s.shape[0] == N and N != 1:
        return s
    if s.numel() == 1:
        return s.reshape(1).expand(N)
    if tuple(s.shape) in ((N,), (N, 1), (1, N)):
        return s.reshape(N)
    raise ValueError(f"{name} must have one element (per-tensor) or shape ({N},) (per-channel), "
                     f"got {tuple(s.shape)}")


def _epilogue_args(N: int, out_shape: tuple, bias, residual, activation):
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    r2 = None
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES)
        check_broadcastable("residual", residual, out_shape)
        r2 = residual.expand(out_shape).reshape(math.prod(out_shape[:-1]), N)
    act, act_param = act_code(activation)
    return r2, act, act_param


_PLANS = plan_cache()       # int8_matmul
_WO_PLANS = plan_cache()    # weight_only_int8_linear
_W8A8_PLANS = plan_cache()  # w8a8_linear
_DQ_PLANS = plan_cache()    # dequantize_per_row


def int8_matmul(a: Tensor, b: Tensor, a_scale: Optional[Tensor] = None,
                b_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None, activation=None,
                residual: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``act((a @ b) * a_scale * b_scale + bias) + residual`` with int8 ``a``, ``b`` and an exact
    int32 accumulator, in one kernel.

    Args:
        a: int8 ``(..., M, K)`` (leading dims fold into M) or ``(K,)``.
        b: int8 ``(K, N)``, any strides (pass ``qweight.t()`` for an ``(N, K)`` weight).
        a_scale: per-row ``(..., M)`` / ``(..., M, 1)`` or per-tensor (one element); float.
        b_scale: per-column ``(N,)`` or per-tensor; float.
        bias: ``(N,)`` float, added after the scales. activation: as :func:`tilefuse.ops.matmul`.
        residual: float, broadcastable to the output, added after the activation.
        out_dtype: ``torch.int32`` (raw accumulator, ``torch._int_mm`` semantics; only without
            scales/bias/activation/residual), fp32, fp16 or bf16. Default: int32 when no epilogue
            is requested, else fp32.

    >>> import torch, tilefuse
    >>> a = torch.randint(-127, 128, (4, 32), dtype=torch.int8)
    >>> b = torch.randint(-127, 128, (32, 8), dtype=torch.int8)
    >>> bool(torch.equal(tilefuse.ops.int8_matmul(a, b), (a.long() @ b.long()).int()))
    True
    """
    key = None
    if plans_allowed() and not needs_grad(a_scale, b_scale, bias, residual):
        try:
            key = (tkey(a), tkey(b), tkey(a_scale), tkey(b_scale), tkey(bias), tkey(residual),
                   activation, out_dtype, _env_backend())
            plan = _PLANS.get(key)
        except (TypeError, AttributeError):  # unhashable / not a tensor: the checks say which
            key = plan = None
        if plan is not None:
            out = plan(a, b, a_scale, b_scale, bias, residual)
            if out is not None:
                return out
    check_tensor("a", a, dtypes=(torch.int8,), min_ndim=1)
    check_tensor("b", b, dtypes=(torch.int8,), ndim=2)
    check_same_device(a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias, residual=residual)
    K, N = b.shape
    if a.shape[-1] != K:
        raise ValueError(f"inner dimensions do not match: a is {tuple(a.shape)} (K={a.shape[-1]}) "
                         f"but b is {tuple(b.shape)} (K={K})")
    lead = tuple(a.shape[:-1])
    out_shape = lead + (N,)
    M = math.prod(lead)
    a2 = a if a.dim() == 2 else a.reshape(M, K)
    sa = _per_row_scale("a_scale", a_scale, lead, M)
    sb = _per_col_scale("b_scale", b_scale, N)
    r2, act, act_param = _epilogue_args(N, out_shape, bias, residual, activation)
    epilogue = sa is not None or sb is not None or bias is not None or r2 is not None or act != 0
    if out_dtype is None:
        out_dtype = torch.float32 if epilogue else torch.int32
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of int32, float32, float16, bfloat16; got "
                        f"{out_dtype!r}")
    if out_dtype == torch.int32 and epilogue:
        raise ValueError("out_dtype=torch.int32 is the raw accumulator mode: it takes no a_scale, "
                         "b_scale, bias, activation or residual")
    out = int8_matmul_op(a2, b, sa, sb, bias, r2, act, act_param, out_dtype)
    if key is not None:
        quant_plans.remember_gemm(_PLANS, key, activation, quant_plans.int8_gemm,
                                  (a, b, a_scale, b_scale, bias, residual),
                                  (a2, b, sa, sb, bias, r2), act, act_param, out_dtype, (M, N),
                                  None if a.dim() == 2 else out_shape)
    return out if a.dim() == 2 else out.reshape(out_shape)


def weight_only_int8_linear(x: Tensor, qweight: Tensor, scale: Tensor,
                            bias: Optional[Tensor] = None, activation=None,
                            residual: Optional[Tensor] = None) -> Tensor:
    """``act(x @ (qweight * scale).T + bias) + residual`` with the int8 weight dequantized in the
    GEMM's load path (never materialised in memory).

    Args:
        x: ``(..., K)`` fp16/bf16/fp32. qweight: int8 ``(N, K)`` (torch Linear layout).
        scale: per-output-channel ``(N,)`` / ``(N, 1)`` or per-tensor; float.
        bias: ``(N,)`` float. Output has ``x``'s dtype. Gradients flow to ``x`` (weight frozen).

    Under ``torch.autocast``, ``x``, ``bias`` and ``residual`` are cast to the autocast dtype
    (the output follows), as for ``torch.nn.functional.linear``.
    """
    key = None
    if plans_allowed() and not needs_grad(x, scale, bias, residual):
        try:
            key = (tkey(x), tkey(qweight), tkey(scale), tkey(bias), tkey(residual), activation,
                   _env_backend())
            plan = _WO_PLANS.get(key)
        except (TypeError, AttributeError):
            key = plan = None
        if plan is not None:
            out = plan(x, qweight, None, scale, bias, residual)
            if out is not None:
                return out
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("qweight", qweight, dtypes=(torch.int8,), ndim=2)
    if scale is None:
        raise TypeError("scale must be a torch.Tensor, got None")
    check_same_device(x=x, qweight=qweight, scale=scale, bias=bias, residual=residual)
    if autocast_maybe_on():
        x, bias, residual = _autocast.lower(x, bias, residual)  # linear's autocast policy
    N, K = qweight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but qweight expects in_features={K} "
                         f"(qweight shape {tuple(qweight.shape)})")
    out_shape = tuple(x.shape[:-1]) + (N,)
    sb = _per_col_scale("scale", scale, N)
    r2, act, act_param = _epilogue_args(N, out_shape, bias, residual, activation)
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), K)
    out = int8_matmul_op(x2, qweight.t(), None, sb, bias, r2, act, act_param, x.dtype)
    if key is not None:
        quant_plans.remember_gemm(_WO_PLANS, key, activation, quant_plans.int8_gemm,
                                  (x, qweight, None, scale, bias, residual),
                                  (x2, qweight.t(), None, sb, bias, r2), act, act_param, x.dtype,
                                  (x2.shape[0], N), None if x.dim() == 2 else out_shape)
    return out if x.dim() == 2 else out.reshape(out_shape)


def quantize_per_row(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric dynamic int8 quantization per row (last dim), fused in one kernel.

    Returns ``(q, scale)``: ``q`` int8 with ``x``'s shape, ``scale`` fp32 of shape
    ``x.shape[:-1] + (1,)`` such that ``q * scale ~= x`` (error <= scale / 2 per element).
    Not differentiable (``x`` is read detached).

    >>> import torch, tilefuse
    >>> x = torch.randn(3, 16)
    >>> q, s = tilefuse.ops.quantize_per_row(x)
    >>> bool(((q * s - x).abs() <= s / 2 + 1e-6).all())
    True
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    x = x.detach()
    if x.dim() == 2:
        q, s = quantize_per_row_op(x)
        return q, s.view(x.shape[0], 1)
    q, s = quantize_per_row_op(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]))
    return q.reshape(x.shape), s.reshape(tuple(x.shape[:-1]) + (1,))


def dequantize_per_row(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale`` in ``dtype`` (the inverse of :func:`quantize_per_row`, up to rounding):
    ``(q.float() * scale.float()).to(dtype)`` bit for bit, in one kernel
    (:mod:`tilefuse.fused.dequant`; ``scale`` broadcasts as in torch)."""
    return dequantize_call(q, scale, dtype, _DQ_PLANS, _check_dequantize)


def _check_dequantize(q, scale):
    check_tensor("q", q, dtypes=(torch.int8,))
    check_tensor("scale", scale, dtypes=FLOAT_DTYPES)


def w8a8_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                activation=None, residual: Optional[Tensor] = None) -> Tensor:
    """Dynamic W8A8 linear: ``x`` is quantized per row on the fly (:func:`quantize_per_row`), then
    one int8 GEMM applies both scales, bias, activation and residual and writes ``x``'s dtype.
    Inference only (no gradient through the quantizer). Under ``torch.autocast``, ``x``,
    ``bias`` and ``residual`` are cast to the autocast dtype first (the output follows)."""
    key = None
    if plans_allowed() and not needs_grad(scale, bias, residual):  # x is quantized detached
        try:
            key = (tkey(x), tkey(qweight), tkey(scale), tkey(bias), tkey(residual), activation,
                   _env_backend())
            plan = _W8A8_PLANS.get(key)
        except (TypeError, AttributeError):
            key = plan = None
        if plan is not None:
            out = plan(x, qweight, scale, bias, residual)
            if out is not None:
                return out
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if autocast_maybe_on():
        x, bias, residual = _autocast.lower(x, bias, residual)
    check_tensor("qweight", qweight, dtypes=(torch.int8,), ndim=2)
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but qweight expects in_features="
                         f"{qweight.shape[1]} (qweight shape {tuple(qweight.shape)})")
    if scale is None:
        raise TypeError("scale must be a torch.Tensor, got None")
    qx, sx = quantize_per_row(x)
    out = int8_matmul(qx, qweight.t(), sx, scale, bias=bias, activation=activation,
                      residual=residual, out_dtype=x.dtype)
    if key is not None and quant_plans.plannable_activation(activation):
        plan = quant_plans.quant_linear_plan(x.detach(), qweight, scale, bias, residual,
                                             activation, torch.int8, quant_plans.int8_gemm)
        if plan is not None:
            remember(_W8A8_PLANS, key, plan)
    return out

"""fp8 custom ops and their public wrappers (inference only).

* ``tilefuse::fp8_matmul`` -- fp8 x fp8 GEMM (``float8_e4m3fn`` / ``float8_e5m2``, any mix) with
  fp32 accumulation and a scaled epilogue. Backend: the Triton kernel
  (:mod:`tilefuse.kernels.fp8_matmul`; CUDA needs sm_89+, a clear RuntimeError elsewhere) or a
  torch reference path with the same semantics (fp32 matmul of the upcast operands: the products
  of fp8 values are exact in fp32, so only the accumulation order differs).
* ``tilefuse::quantize_fp8_per_row`` -- the fused dynamic per-row fp8 quantizer
  (:mod:`tilefuse.kernels.quant`, shared with int8).

No backward is registered: fp8 operands and their scales are quantization results, not trained
values. A call whose inputs require grad raises a RuntimeError that says so (instead of torch's
late "no autograd formula"); :func:`fp8_linear` quantizes its input detached, as
:func:`tilefuse.ops.w8a8_linear` does, so a float input that requires grad is fine.

The scale/epilogue argument helpers are shared with the int8 ops (:mod:`tilefuse.fused.int8`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import _env_backend, backend_of
from tilefuse._validate import FLOAT_DTYPES_F64, check_tensor, float_tensor, same_device
from tilefuse.fused import quant_plans
from tilefuse.fused._fast import (autocast_maybe_on, fast_op, needs_grad, plan_cache,
                                  plans_allowed, remember, tkey)
from tilefuse.fused.dequant import dequantize_call
from tilefuse.fused.int8 import (_epilogue_args, _per_col_scale, _per_row_scale,
                                  _torch_epilogue)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP8_SET = frozenset(FP8_DTYPES)
_SCALE_DTYPES = (torch.float32,)


def _torch_fp8_matmul(a, b, a_scale, b_scale, bias, residual, activation, act_param, out_dtype):
    y = torch.matmul(a.float(), b.float())  # fp8 products are exact in fp32 (and in TF32)
    return _torch_epilogue(y, a_scale, b_scale, bias, residual, activation, act_param, out_dtype)


def _fp8_impl(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Optional[Tensor],
              residual: Optional[Tensor], activation: int, act_param: float,
              out_dtype: torch.dtype, fast_accum: bool) -> Tensor:
    """a (M, K), b (K, N) fp8; a_scale (M,), b_scale (N,) fp32 -> (M, N) out_dtype."""
    if backend_of(a) == "torch":
        return _torch_fp8_matmul(a, b, a_scale, b_scale, bias, residual, activation, act_param,
                                 out_dtype).contiguous()
    from tilefuse.kernels.fp8_matmul import check_capability, launch_fp8_matmul

    if a.device.type == "cuda":
        check_capability(a.device)
    out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=out_dtype)
    return launch_fp8_matmul(a, b, out, a_scale, b_scale, bias=bias, residual=residual,
                             activation=activation, act_param=act_param, fast_accum=fast_accum)


def _fp8_fake(a, b, a_scale, b_scale, bias, residual, activation, act_param, out_dtype,
              fast_accum):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


fp8_matmul_op = fast_op("fp8_matmul", _fp8_impl, fake=_fp8_fake)


def _quantize_impl(x: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """x (M, N) float -> (q (M, N) ``dtype``, scale (M,) fp32)."""
    from tilefuse.kernels.quant import torch_quantize_rows

    if backend_of(x) == "torch":
        q, s = torch_quantize_rows(x, dtype)
        return q.contiguous(), s.contiguous()
    from tilefuse.kernels.quant import launch_quantize_rows

    q = torch.empty(x.shape, device=x.device, dtype=dtype)
    s = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    launch_quantize_rows(x, q, s)
    return q, s


def _quantize_fake(x, dtype):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0],), dtype=torch.float32)


quantize_fp8_per_row_op = fast_op("quantize_fp8_per_row", _quantize_impl, fake=_quantize_fake)


# --------------------------------------------------------------------------------------------
# public functional API (re-exported by tilefuse.ops)
# --------------------------------------------------------------------------------------------
def _fp8_tensor(name: str, t, ndim=None) -> None:
    if not isinstance(t, Tensor) or t.dtype not in _FP8_SET:
        check_tensor(name, t, dtypes=FP8_DTYPES)
    if ndim is not None and t.dim() != ndim:
        check_tensor(name, t, ndim=ndim)


def _scale(name: str, s) -> None:
    if not isinstance(s, Tensor) or s.dtype is not torch.float32:
        check_tensor(name, s, dtypes=_SCALE_DTYPES)


def _fp8_dtype(dtype) -> torch.dtype:
    if dtype not in _FP8_SET:
        raise TypeError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype!r}")
    return dtype


_PLANS = plan_cache()         # fp8_matmul
_LINEAR_PLANS = plan_cache()  # fp8_linear
_DQ_PLANS = plan_cache()      # dequantize_fp8


def _no_grad_check(*tensors) -> None:
    if needs_grad(*tensors):
        raise RuntimeError("tilefuse fp8 ops are inference-only (no backward): an input "
                           "(operand, scale, bias or residual) requires grad. Call them under "
                           "torch.no_grad() / torch.inference_mode(), or detach the tensors")


def fp8_matmul(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor,
               bias: Optional[Tensor] = None, activation=None, residual: Optional[Tensor] = None,
               out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False) -> Tensor:
    """``act((a @ b) * a_scale * b_scale + bias) + residual`` on fp8 operands, in one kernel.

    Args:
        a: ``float8_e4m3fn`` or ``float8_e5m2``, ``(..., M, K)`` (leading dims fold into M) or
            ``(K,)``.
        b: fp8 ``(K, N)``, any strides; pass ``qweight.t()`` for an ``(N, K)`` weight (K
            contiguous: the fast layout for fp8 tensor cores). ``a`` and ``b`` may mix formats.
        a_scale: fp32, per-tensor (one element) or per-row (``(..., M)`` / ``(..., M, 1)``).
        b_scale: fp32, per-tensor or per-column (``(N,)``, ``(N, 1)``, ``(1, N)``).
        bias: ``(N,)`` float, added after the scales. activation: as :func:`tilefuse.ops.matmul`.
        residual: float, broadcastable to the output, added after the activation.
        out_dtype: ``torch.bfloat16`` (default), ``torch.float16`` or ``torch.float32``.
        fast_accum: let Hopper's tensor cores accumulate the whole K in their reduced precision
            (faster, less accurate; ``torch._scaled_mm(use_fast_accum=True)``). Default: the
            partial sum is promoted to fp32 every K block of at most 128.

    Inference only (a RuntimeError if an input requires grad). On CUDA it needs compute
    capability 8.9+ (a RuntimeError otherwise).

    >>> import torch, tilefuse
    >>> a = torch.randn(4, 32).to(torch.float8_e4m3fn)
    >>> b = torch.randn(32, 8).to(torch.float8_e4m3fn)
    >>> one = torch.ones(1)
    >>> y = tilefuse.ops.fp8_matmul(a, b, one, one, out_dtype=torch.float32)
    >>> bool(torch.allclose(y, a.float() @ b.float(), atol=1e-4))
    True
    """
    key = None
    if plans_allowed() and not needs_grad(a_scale, b_scale, bias, residual):
        try:  # (fast_accum=1 would hash as True: only a bool may share True's plan)
            key = (tkey(a), tkey(b), tkey(a_scale), tkey(b_scale), tkey(bias), tkey(residual),
                   activation, out_dtype, fast_accum if type(fast_accum) is bool else None,
                   _env_backend())
            plan = _PLANS.get(key)
        except (TypeError, AttributeError):  # unhashable / not a tensor: the checks say which
            key = plan = None
        if plan is not None:
            return plan(a, b, a_scale, b_scale, bias, residual)
    _fp8_tensor("a", a)
    if a.dim() == 0:
        check_tensor("a", a, min_ndim=1)
    _fp8_tensor("b", b, ndim=2)
    _scale("a_scale", a_scale)
    _scale("b_scale", b_scale)
    same_device(a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias, residual=residual)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16, torch.float16 or torch.float32, "
                        f"got {out_dtype!r}")
    if type(fast_accum) is not bool:
        raise TypeError(f"fast_accum must be a bool, got {type(fast_accum).__name__}")
    K, N = b.shape
    if a.shape[-1] != K:
        raise ValueError(f"inner dimensions do not match: a is {tuple(a.shape)} (K={a.shape[-1]}) "
                         f"but b is {tuple(b.shape)} (K={K})")
    _no_grad_check(a, b, a_scale, b_scale, bias, residual)
    if a.dim() == 2:
        M = a.shape[0]
        lead = (M,)
        out_shape = (M, N)
        a2 = a
    else:
        lead = tuple(a.shape[:-1])
        out_shape = lead + (N,)
        M = math.prod(lead)
        a2 = a.reshape(M, K)
    sa = _per_row_scale("a_scale", a_scale, lead, M)
    sb = _per_col_scale("b_scale", b_scale, N)
    r2, act, act_param = _epilogue_args(N, out_shape, bias, residual, activation)
    out = fp8_matmul_op(a2, b, sa, sb, bias, r2, act, act_param, out_dtype, fast_accum)
    if key is not None:
        quant_plans.remember_gemm(_PLANS, key, activation,
                                  lambda *g: quant_plans.fp8_gemm(*g, fast_accum),
                                  (a, b, a_scale, b_scale, bias, residual),
                                  (a2, b, sa, sb, bias, r2), act, act_param, out_dtype, (M, N),
                                  None if a.dim() == 2 else out_shape)
    return out if a.dim() == 2 else out.reshape(out_shape)


def quantize_fp8_per_row(x: Tensor, dtype: torch.dtype = torch.float8_e4m3fn
                         ) -> Tuple[Tensor, Tensor]:
    """Dynamic fp8 quantization per row (last dim), absmax-based, fused in one kernel.

    Returns ``(q, scale)``: ``q`` in ``dtype`` (``float8_e4m3fn``: max 448, or ``float8_e5m2``:
    max 57344) with ``x``'s shape and ``scale`` fp32 of shape ``x.shape[:-1] + (1,)``, with
    ``q = fp8(x / scale)`` rounded to nearest even, so ``q * scale ~= x`` (relative error <= 2^-4
    for e4m3 normals). A row with NaN/Inf gets ``scale = NaN`` and ``q = 0``. Not differentiable
    (``x`` is read detached).

    >>> import torch, tilefuse
    >>> x = torch.randn(3, 16)
    >>> q, s = tilefuse.ops.quantize_fp8_per_row(x)
    >>> bool(((q.float() * s - x).abs() <= x.abs() / 16 + 1e-6).all())
    True
    """
    float_tensor("x", x)
    if x.dim() == 0:
        check_tensor("x", x, min_ndim=1)
    _fp8_dtype(dtype)
    x = x.detach()
    if x.dim() == 2:
        q, s = quantize_fp8_per_row_op(x, dtype)
        return q, s.view(x.shape[0], 1)
    q, s = quantize_fp8_per_row_op(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), dtype)
    return q.reshape(x.shape), s.reshape(tuple(x.shape[:-1]) + (1,))


def fp8_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
               activation=None, residual: Optional[Tensor] = None,
               fast_accum: bool = False) -> Tensor:
    """Dynamic fp8 linear: ``x`` is quantized per row on the fly (:func:`quantize_fp8_per_row`,
    in ``qweight``'s fp8 format), then one fp8 GEMM applies both scales, bias, activation and
    residual and writes ``x``'s dtype. ``qweight`` is fp8 ``(N, K)`` (torch Linear layout) with a
    per-output-channel (or per-tensor) fp32 ``scale``. Inference only (``x`` is quantized
    detached). Under ``torch.autocast``, ``x``, ``bias`` and ``residual`` are cast to the
    autocast dtype first (the output follows)."""
    key = None
    if plans_allowed() and not needs_grad(qweight, scale, bias, residual):  # x: read detached
        try:
            key = (tkey(x), tkey(qweight), tkey(scale), tkey(bias), tkey(residual), activation,
                   fast_accum if type(fast_accum) is bool else None, _env_backend())
            plan = _LINEAR_PLANS.get(key)
        except (TypeError, AttributeError):
            key = plan = None
        if plan is not None:
            return plan(x, qweight, scale, bias, residual)
    float_tensor("x", x, allow_f64=False)
    if autocast_maybe_on():
        x, bias, residual = _autocast.lower(x, bias, residual)
    _fp8_tensor("qweight", qweight, ndim=2)
    if x.dim() == 0 or x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)} but qweight expects in_features="
                         f"{qweight.shape[1]} (qweight shape {tuple(qweight.shape)})")
    qx, sx = quantize_fp8_per_row(x, qweight.dtype)
    out = fp8_matmul(qx, qweight.t(), sx, scale, bias=bias, activation=activation,
                     residual=residual, out_dtype=x.dtype, fast_accum=fast_accum)
    if key is not None and quant_plans.plannable_activation(activation):
        plan = quant_plans.quant_linear_plan(x.detach(), qweight, scale, bias, residual,
                                             activation, qweight.dtype,
                                             lambda *g: quant_plans.fp8_gemm(*g, fast_accum))
        if plan is not None:
            remember(_LINEAR_PLANS, key, plan)
    return out


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale`` in ``dtype`` (the inverse of :func:`quantize_fp8_per_row`, up to
    rounding): ``(q.float() * scale.float()).to(dtype)`` bit for bit, in one kernel
    (:mod:`tilefuse.fused.dequant`; ``scale`` broadcasts as in torch)."""
    return dequantize_call(q, scale, dtype, _DQ_PLANS, _check_dequantize)


def _check_dequantize(q, scale):
    _fp8_tensor("q", q)
    check_tensor("scale", scale, dtypes=FLOAT_DTYPES_F64)

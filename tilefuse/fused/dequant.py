"""``tilefuse::dequantize``: ``(q.float() * scale.float()).to(dtype)`` in one kernel.

The op behind :func:`tilefuse.ops.dequantize_per_row` (int8 ``q``) and
:func:`tilefuse.ops.dequantize_fp8` (``float8_e4m3fn`` / ``float8_e5m2`` ``q``): ``scale``
broadcasts against ``q`` as in torch (per row ``(..., M, 1)``, per tensor, per column or
elementwise), the product is formed in fp32 and rounded once to ``dtype``, so the result is the
torch expression's bit for bit (:func:`tilefuse.kernels.quant.dequantize_kernel`; the output is
contiguous). fp16/bf16/fp32 outputs from fp16/bf16/fp32 scales run the kernel on the triton
backend; any other ``dtype`` (fp64...), an fp64 scale, an empty result and the torch backend run
the torch expression. A ``scale`` that requires grad (or lives on another device, e.g. a CPU
scalar with CUDA ``q``) takes the torch expression outside the op, so gradients flow as before.

Eager calls keep a per-signature plan (:func:`tilefuse.fused._fast.plan_cache`): one
allocation and one launch with every launch argument precomputed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tilefuse._backend import _env_backend, backend_of
from tilefuse.fused._fast import (fast_op, lazy_module, needs_grad, plans_allowed, remember,
                                  tkey)

_kernels = lazy_module("tilefuse.kernels.quant")
_KERNEL_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))


def torch_dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The reference expression (what the ops computed before the kernel)."""
    return (q.float() * scale.float()).to(dtype)


def _on_kernel(q: Tensor, scale: Tensor, dtype: torch.dtype) -> bool:
    return (dtype in _KERNEL_DTYPES and scale.dtype in _KERNEL_DTYPES
            and backend_of(q) != "torch")


def _dequant_impl(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    if not _on_kernel(q, scale, dtype):
        return torch_dequantize(q, scale, dtype).contiguous()
    shape = torch.broadcast_shapes(q.shape, scale.shape)
    out = q.new_empty(shape, dtype=dtype)
    if out.numel() == 0:
        return out
    k = _kernels()
    bound = k.bind_dequantize(q, scale, out)
    if bound is None:  # no common 2-D layout: contiguous broadcasts (exact copies) have one
        q, scale = q.expand(shape).contiguous(), scale.expand(shape).contiguous()
        bound = k.bind_dequantize(q, scale, out)
    return k.dequant_launcher(bound)(q, scale, out)


def _dequant_fake(q, scale, dtype):
    return q.new_empty(torch.broadcast_shapes(q.shape, scale.shape), dtype=dtype)


dequantize_op = fast_op("dequantize", _dequant_impl, fake=_dequant_fake)


def _plan(q: Tensor, scale: Tensor, dtype: torch.dtype, out: Tensor):
    """The plan of a validated call that ran the kernel: allocate ``out``'s shape, launch the
    bound kernel (None: not plannable, e.g. a layout that needed copies)."""
    if out.numel() == 0 or not _on_kernel(q, scale, dtype):
        return None
    k = _kernels()
    bound = k.bind_dequantize(q, scale, out)
    if bound is None:
        return None
    shape, launch = tuple(out.shape), k.dequant_launcher(bound)
    if not shape:
        return lambda q, scale: launch(q, scale, q.new_empty((), dtype=dtype))

    def plan(q, scale):  # (sizes as separate ints: a tuple costs ~0.5 us more to parse)
        return launch(q, scale, q.new_empty(*shape, dtype=dtype))
    return plan


def dequantize_call(q: Tensor, scale: Tensor, dtype, plans: dict, check) -> Tensor:
    """What :func:`tilefuse.ops.dequantize_per_row` / ``dequantize_fp8`` run: an eager call with
    a planned signature takes its plan; any other call is validated by ``check(q, scale)``
    (raises on bad input), runs :func:`dequantize` and plans its signature."""
    key = None
    if plans_allowed():
        try:
            key = (tkey(q), tkey(scale), dtype, _env_backend())
            plan = plans.get(key)
        except (TypeError, AttributeError):
            key = plan = None
        if plan is not None and not needs_grad(scale):
            return plan(q, scale)
    check(q, scale)
    return dequantize(q, scale, dtype, plans, key)


def dequantize(q: Tensor, scale: Tensor, dtype, plans: dict, key) -> Tensor:
    """The checked ops' common tail: ``q`` and ``scale`` validated by the caller; ``key`` (or
    None) is the call's plan key in ``plans``."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if needs_grad(scale) or scale.device != q.device:  # differentiable / mixed-device torch
        return torch_dequantize(q, scale, dtype)
    out = dequantize_op(q, scale, dtype)
    if key is not None:
        plan = _plan(q, scale, dtype, out)
        if plan is not None:
            remember(plans, key, plan)
    return out

"""``torch.autocast`` policy for the public fused-op wrappers (see docs/amp.md).

torch's autocast only acts on aten ops; a ``torch.library.custom_op`` falls through it. So each
public wrapper applies torch's policy itself, *outside* the custom op, with the helpers below: the
op then sees consistent dtypes, autograd flows back through the casts to the original-dtype
tensors, and the casts trace under ``torch.compile(fullgraph=True)``.

=====================================  ==========================================================
op                                     policy (as torch does for the aten op it fuses)
=====================================  ==========================================================
matmul, linear, dropconnect_linear,    :func:`lower`: floating inputs (bias included) cast to
depthwise_conv2d, int8 weight-only /   ``torch.get_autocast_dtype(device)``, like ``mm``/
w8a8 linear                            ``linear``/``conv2d``; ``residual`` cast to the output
                                       dtype (it is part of the GEMM epilogue, like ``addmm``'s
                                       ``input``)
layer_norm_act, rms_norm_act,          :func:`norm_fp32`: fp32 exactly where the installed
group_norm_act                         torch's autocast has a kernel for the aten op (read from
                                       the dispatcher: CUDA/XPU/MPS for layer/group norm; CUDA
                                       rms_norm only from torch 2.12); no cast on CPU, where
                                       AutocastCPU falls through for these ops
cross_entropy                          :func:`fp32` on every device (``cross_entropy_loss`` is on
                                       the CPU fp32 list; on CUDA it decomposes into
                                       ``log_softmax``/``nll_loss``, both fp32)
batch_norm_act, dropout*               no cast (torch: fallthrough); mixed bf16/fp16 ``x`` with
                                       fp32 weight / running stats is accepted, as torch does
=====================================  ==========================================================

As in torch, only floating tensors other than fp64 are cast, and only while autocast is enabled
for the tensors' device type. Verified against torch 2.13's dispatch table
(``torch._C._dispatch_dump_table("aten::layer_norm")``: ``AutocastCPU: fallthrough``,
``AutocastCUDA: kernel``).
"""
from __future__ import annotations

from typing import Optional

import torch

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU",
                  "mps": "AutocastMPS", "hpu": "AutocastHPU", "mtia": "AutocastMTIA",
                  "maia": "AutocastMAIA"}


def _autocast_table(ops=("layer_norm", "rms_norm", "group_norm")) -> dict:
    """{(op, device_type): True} where the *running* torch's autocast has a kernel (the fp32
    policy) for ``aten::op`` on that device; fallthrough entries read False. Read once at import
    from the dispatcher, so it follows the installed torch (e.g. ``rms_norm`` joined the CUDA fp32
    list in torch 2.12; on 2.11 it passes through) and stays a plain dict lookup under
    ``torch.compile``."""
    table = {}
    has = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    for op in ops:
        for dev, key in _AUTOCAST_KEYS.items():
            try:
                table[(op, dev)] = bool(has(f"aten::{op}", key)) if has else dev != "cpu"
            except Exception:  # noqa: BLE001 - dispatch keys this build does not know
                table[(op, dev)] = False
    return table


_NORM_FP32 = _autocast_table()


def _device_type(tensors) -> Optional[str]:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device.type
    return None


def enabled(*tensors) -> bool:
    """True when autocast is on for the device type of the first tensor among ``tensors``."""
    dt = _device_type(tensors)
    if dt is None:
        return False
    try:
        return bool(torch.is_autocast_enabled(dt))
    except (RuntimeError, TypeError):  # device types autocast does not know (e.g. meta)
        return False


def autocast_dtype(device_type: str) -> torch.dtype:
    return torch.get_autocast_dtype(device_type)


def _eligible(t) -> bool:
    return (isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.dtype != torch.float64)


def cast(dtype: torch.dtype, *tensors):
    """Cast the eligible tensors (floating, not fp64) to ``dtype``; others pass through."""
    return tuple(t.to(dtype) if _eligible(t) and t.dtype != dtype else t for t in tensors)


def lower(*tensors):
    """torch's lower-precision policy (``mm``/``linear``/``conv2d``): a tuple of ``tensors`` with
    the eligible ones cast to the autocast dtype when autocast is enabled, else unchanged."""
    if not enabled(*tensors):
        return tensors
    return cast(autocast_dtype(_device_type(tensors)), *tensors)


def fp32(*tensors):
    """torch's fp32 policy: eligible tensors cast to fp32 when autocast is enabled."""
    if not enabled(*tensors):
        return tensors
    return cast(torch.float32, *tensors)


def norm_fp32(op: str, *tensors):
    """fp32 policy for ``op`` in ("layer_norm", "rms_norm", "group_norm"): applied only on the
    device types where the running torch's autocast applies it to ``aten::op``."""
    if not _NORM_FP32.get((op, _device_type(tensors)), False):
        return tensors
    return fp32(*tensors)


def promote_residual(x, residual):
    """Under autocast, ``norm(x + residual)`` with mixed dtypes (a bf16 branch added to an fp32
    skip path) follows eager ``x + residual``: both go to ``torch.result_type``."""
    if (residual is None or not isinstance(x, torch.Tensor) or residual.dtype == x.dtype
            or not enabled(x) or not (_eligible(x) and _eligible(residual))):
        return x, residual
    dtype = torch.result_type(x, residual)
    return x.to(dtype), residual.to(dtype)

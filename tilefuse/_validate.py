"""One place for input validation. Every public op validates through these helpers so bad input
raises a ``TypeError``/``ValueError`` naming the argument, never a Triton compile trace."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES_F64 = FLOAT_DTYPES + (torch.float64,)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | Sequence[int] | None = None, min_ndim: int | None = None,
                 allow_none: bool = False) -> None:
    """Check that argument ``name`` is a tensor with an allowed dtype and rank."""
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got "
                        f"{str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got a {t.dim()}-D tensor of shape "
                             f"{tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_float(name: str, t, allow_none: bool = False, allow_f64: bool = True) -> None:
    check_tensor(name, t, dtypes=FLOAT_DTYPES_F64 if allow_f64 else FLOAT_DTYPES,
                 allow_none=allow_none)


def check_same_device(**tensors) -> torch.device:
    """All non-None tensors must share one device; returns it."""
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: all tensors must "
                             f"be on the same device")
    return device


def check_same_dtype(**tensors) -> torch.dtype:
    """All non-None tensors must share one dtype (torch's matmul rule: no implicit promotion)."""
    dtype = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dtype is None:
            dtype, first = t.dtype, name
        elif t.dtype != dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but {first} has "
                            f"{str(dtype).replace('torch.', '')}: expected the same dtype")
    return dtype


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_broadcastable(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    try:
        out = torch.broadcast_shapes(tuple(t.shape), tuple(shape))
    except RuntimeError:
        out = None
    if out != tuple(shape):
        raise ValueError(f"{name} of shape {tuple(t.shape)} cannot be broadcast to the output shape "
                         f"{tuple(shape)}")


def check_probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return p


# --------------------------------------------------------------------------------------------
# hot-path forms: one membership test per argument when the input is valid; the descriptive
# check above only runs to build the error message
# --------------------------------------------------------------------------------------------
_FLOAT_SET = frozenset(FLOAT_DTYPES)
_FLOAT_SET_F64 = frozenset(FLOAT_DTYPES_F64)


def float_tensor(name: str, t, allow_f64: bool = True) -> None:
    """``check_float(name, t)`` (not None) at the cost of one isinstance and one set probe."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (_FLOAT_SET_F64 if allow_f64
                                                          else _FLOAT_SET):
        check_float(name, t, allow_f64=allow_f64)


def optional_float_tensors(**tensors) -> None:
    """:func:`float_tensor` on each of ``tensors`` that is not None, in the order given."""
    for name, t in tensors.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_SET_F64):
            check_float(name, t)


def dense(t):
    """``t`` (None allowed) with unit stride: the kernels read per-channel parameters (norm
    weights and biases) as ``ptr + index``; a strided view (``w[::2]``) is copied (a
    differentiable ``contiguous()``: its gradient reaches the view)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def all_dense(*tensors) -> bool:
    """Whether every one of ``tensors`` (None allowed) is contiguous, i.e. what :func:`dense`
    passes as is (a per-signature plan then takes the caller's tensors as the full path does)."""
    return all(t is None or t.is_contiguous() for t in tensors)


def same_device(**tensors) -> None:
    """:func:`check_same_device` without building names unless a device differs."""
    device = None
    for t in tensors.values():
        if t is not None:
            if device is None:
                device = t.device
            elif t.device != device:
                check_same_device(**tensors)

"""``tilefuse.ops.linear``: ``act(x @ weight.T + bias) + residual`` on the fused matmul
(:mod:`tilefuse.fused.matmul`), with per-signature plans of its own.

``linear`` is the most called op of a patched model, and its full path is a whole ``matmul``
call plus checks and a transposed view. Its plans are keyed on its own arguments (``weight`` as
passed, ``(out_features, in_features)``) and reuse the matmul plan of the 2-D product: an
``x`` with more than two dims is viewed as ``(M, K)`` (planned only where that is a view, i.e.
``x`` contiguous) and the output viewed back, exactly as the full path does, so results and
gradients are the same bits. The hot slot (:class:`tilefuse.fused.matmul_plan.OpPlans`)
serves calls with or without ``bias``.
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor
from torch._C import _any_requires_grad, is_grad_enabled

from tilefuse._backend import backend_of
from tilefuse._validate import check_tensor, float_tensor
from tilefuse.fused.matmul import (_FORCE_CUSTOM_OP, OpPlans, _is_compiling, _plan_2d, add_plan,
                                   find_plan, hot_plan, matmul)

_LINEAR = OpPlans()
_LINEAR_HOT = _LINEAR.hot


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation=None,
           residual: Optional[Tensor] = None) -> Tensor:
    """``act(x @ weight.T + bias) + residual``, the fused form of :func:`torch.nn.functional.linear`.

    ``weight`` is ``(out_features, in_features)`` as in torch; it is read through strides (no
    transposed copy).

    >>> import torch, tilefuse
    >>> x, w, b = torch.randn(2, 3, 8), torch.randn(4, 8), torch.randn(4)
    >>> y = tilefuse.ops.linear(x, w, b, activation="relu")
    >>> bool(torch.allclose(y, torch.relu(torch.nn.functional.linear(x, w, b)), atol=1e-5))
    True
    """
    if _FORCE_CUSTOM_OP[0] or _is_compiling():
        return _linear(x, weight, bias, activation, residual)
    grad = is_grad_enabled() and _any_requires_grad(x, weight, bias, residual)
    hot = _LINEAR_HOT.get(grad)
    if hot is not None:
        plan = hot_plan(hot, x, weight, bias, residual, activation, None)
        if plan is not None:
            return plan(x, weight, bias, None)
    plan = find_plan(_LINEAR, grad, x, weight, bias, residual, activation, None)
    if plan is not None:
        return plan(x, weight, bias, residual)
    out = _linear(x, weight, bias, activation, residual)
    add_plan(_LINEAR, grad, x, weight, bias, residual, activation, None, _plan_linear)
    return out


def _linear(x, weight, bias, activation, residual):
    """:func:`linear` without the plans: checks, then :func:`tilefuse.fused.matmul.matmul`."""
    float_tensor("x", x)
    float_tensor("weight", weight)
    if x.dim() == 0 or weight.dim() != 2:
        check_tensor("x", x, min_ndim=1)
        check_tensor("weight", weight, ndim=2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects in_features="
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    y = matmul(x, weight.t(), bias=bias, activation=activation, residual=residual)
    return y.squeeze(0) if squeeze else y


def _plan_linear(x, weight, bias, residual, activation, out_dtype, grad):
    """The plan of a validated :func:`linear` call: ``plan(x, weight, bias, residual)`` runs the
    matmul plan of ``x (M, K) @ weight.T`` (:func:`tilefuse.fused.matmul._plan_2d`) on the
    caller's tensors. None where the full path would copy or broadcast (a 1-D or non-contiguous
    N-D ``x``, a residual that is not a contiguous output-shaped tensor) or the matmul plan
    declines."""
    if x.dim() < 2 or backend_of(x) != "triton":
        return None
    if x.dim() == 2:  # (the matmul plan takes the weight as is: no weight.t() per call)
        return _plan_2d(x, weight.t(), bias, residual, activation, None, grad, weight=True)
    K, N = x.shape[-1], weight.shape[0]
    M = math.prod(x.shape[:-1])
    shape = x.shape[:-1] + (N,)
    if not x.is_contiguous() or (residual is not None and (
            residual.shape != shape or not residual.is_contiguous())):
        return None
    mm = _plan_2d(x.view(M, K), weight.t(), bias,
                  None if residual is None else residual.view(M, N), activation, None, grad,
                  weight=True)
    if mm is None:
        return None

    def plan(x, weight, bias, residual):
        r = None if residual is None else residual.view(M, N)
        return mm(x.view(M, K), weight, bias, r).view(shape)
    return plan

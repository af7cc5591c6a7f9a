"""Custom ops and public wrappers for fused LayerNorm / RMSNorm + activation.

``tilefuse::norm_act_fwd`` returns ``(y, mean, rstd)`` (``mean`` empty for RMSNorm) and
``tilefuse::norm_act_bwd`` returns ``(dx, dw, db)`` (empty where not requested). Both dispatch
with :func:`tilefuse._backend.backend_for`: Triton (CUDA or the interpreter) or the plain torch
reference below. fp64 and empty inputs always take the torch path (the kernels compute in fp32).

Residual semantics (pre-norm): ``y = act(norm(x + residual))``. The sum ``x + residual`` is not
materialised: backward re-reads ``x`` and ``residual``, and ``d residual = d x``.

``prenorm=True`` (the pre-norm transformer block's residual stream, as flash-attn's / Liger's
``layer_norm_fn(..., prenorm=True)``): ``tilefuse::norm_act_prenorm_fwd`` also writes
``h = x + residual`` (x's dtype) in the same kernel and returns ``(y, h, mean, rstd)``; ``y``
normalizes that ``h`` (rounded to x's dtype, as eager ``h = x + residual; y = norm(h)``). The
backward reads ``h`` (not ``x`` and ``residual``) and adds ``dh``, the gradient flowing into the
stream, to ``dx`` in the same kernel: ``d x = d residual = dnorm + dh``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._validate import (check_broadcastable, check_shape, dense, float_tensor,
                                optional_float_tensors, same_device)
from tilefuse.activations import NAMES, torch_activation, torch_activation_grad
from tilefuse._backend import _env_backend
from tilefuse.fused import norm_plan as _norm_plan
from tilefuse.fused._fast import (act_code, autocast_maybe_on, fast_op, needs_grad, plan_cache,
                                  plans_allowed, remember, tkey)
from tilefuse.fused._fast import use_torch_path as _use_torch


_F32_EPS = torch.finfo(torch.float32).eps
_F64_EPS = torch.finfo(torch.float64).eps


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _torch_stats(h: Tensor, eps: float, is_rms: bool):
    if is_rms:
        mean = torch.zeros(h.shape[0], 1, dtype=h.dtype, device=h.device)
    else:
        mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def _torch_fwd(x, residual, weight, bias, eps, is_rms, activation, act_param):
    cd = _compute_dtype(x)
    h = x.to(cd) if residual is None else x.to(cd) + residual.to(cd)
    return _torch_norm(x, h, weight, bias, eps, is_rms, activation, act_param)


def _torch_norm(x, h, weight, bias, eps, is_rms, activation, act_param):
    """The reference norm of ``h`` (the compute dtype) -> (y in x's dtype, mean, rstd)."""
    cd = h.dtype
    mean, rstd = _torch_stats(h, eps, is_rms)
    z = (h - mean) * rstd
    if weight is not None:
        z = z * weight.to(cd)
    if bias is not None:
        z = z + bias.to(cd)
    y = torch_activation(z, NAMES[activation], act_param).to(x.dtype)
    sd = _stat_dtype(x)  # fp64 statistics for fp64 inputs: fp64-accurate gradients
    mean_out = x.new_empty(0, dtype=sd) if is_rms else mean.squeeze(-1).to(sd)
    return y.contiguous(), mean_out, rstd.squeeze(-1).to(sd)


def _fwd_impl(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
              bias: Optional[Tensor], eps: float, is_rms: bool, activation: int,
              act_param: float, save_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """x, residual: (M, N) with any strides -> (y (M, N), mean (M,) fp32 or empty, rstd (M,)).
    ``save_stats=False`` (no gradient will be taken): mean and rstd come back empty."""
    if _use_torch(x):
        y, mean, rstd = _torch_fwd(x, residual, weight, bias, eps, is_rms, activation, act_param)
        return (y, mean, rstd) if save_stats else (y, _empty(x, mean.dtype), _empty(x, mean.dtype))
    from tilefuse.kernels.norm import launch_norm_fwd

    M, N = x.shape
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if not save_stats:
        launch_norm_fwd(x, residual, weight, bias, y, None, None, eps, is_rms, activation,
                        act_param)
        return y, _empty(x), _empty(x)
    mean = torch.empty(0 if is_rms else M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    launch_norm_fwd(x, residual, weight, bias, y, None if is_rms else mean, rstd, eps, is_rms,
                    activation, act_param)
    return y, mean, rstd


def _empty(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.empty(0, device=x.device, dtype=dtype)


def _fwd_fake(x, residual, weight, bias, eps, is_rms, activation, act_param, save_stats):
    M, N = x.shape
    m, sd = (M if save_stats else 0), _stat_dtype(x)
    return (x.new_empty((M, N)), x.new_empty(0 if is_rms else m, dtype=sd),
            x.new_empty(m, dtype=sd))


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _torch_bwd(dy, x, residual, weight, bias, mean, rstd, is_rms, activation, act_param,
               need_dw, need_db, dh=None):
    cd = _compute_dtype(x)
    h = x.to(cd) if residual is None else x.to(cd) + residual.to(cd)
    if h.numel() == 0:
        dw = torch.zeros(x.shape[1], dtype=cd, device=x.device)
        dx = torch.zeros_like(x)
        return dx, (dw if need_dw else x.new_empty(0)), (dw.clone() if need_db else x.new_empty(0))
    mean = torch.zeros_like(rstd).unsqueeze(-1) if is_rms else mean.to(cd).reshape(-1, 1)
    rstd = rstd.to(cd).reshape(-1, 1)
    xhat = (h - mean) * rstd
    w = weight.to(cd) if weight is not None else torch.ones(1, dtype=cd, device=x.device)
    dz = dy.to(cd)
    if activation != 0:
        z = xhat * w + (bias.to(cd) if bias is not None else 0.0)
        dz = dz * torch_activation_grad(z, NAMES[activation], act_param)
    g = dz * w
    c2 = (g * xhat).mean(-1, keepdim=True)
    c1 = 0.0 if is_rms else g.mean(-1, keepdim=True)
    dx = (g - c1 - xhat * c2) * rstd
    dx = (dx if dh is None else dx + dh.to(cd)).to(x.dtype)
    dw = (dz * xhat).sum(0) if need_dw else x.new_empty(0)
    db = dz.sum(0) if need_db else x.new_empty(0)
    return dx, dw, db


def _bwd_impl(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
              bias: Optional[Tensor], mean: Tensor, rstd: Tensor, is_rms: bool,
              activation: int, act_param: float, need_dw: bool,
              need_db: bool, dh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (dx (M, N) in x's dtype, dw (N,) in weight's dtype or empty, db (N,) in bias's dtype
    or empty): the Triton path writes them in two or three launches (no casts afterwards).
    ``dh`` (or None): the pre-norm stream's gradient, added to ``dx`` in the same kernel."""
    if _use_torch(x):
        dx, dw, db = _torch_bwd(dy, x, residual, weight, bias, mean, rstd, is_rms, activation,
                                act_param, need_dw, need_db, dh)
        return (dx.contiguous(), dw.to(weight.dtype) if need_dw else dw,
                db.to(bias.dtype) if need_db else db)
    from tilefuse.kernels.norm import launch_norm_bwd

    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dw, db = launch_norm_bwd(dy, x, residual, weight, bias, None if is_rms else mean, rstd, dx,
                             is_rms, activation, act_param, need_dw, need_db, dh=dh)
    # a fresh empty tensor each: custom-op outputs may not alias
    return dx, (dw if dw is not None else _empty(x)), (db if db is not None else _empty(x))


def _bwd_fake(dy, x, residual, weight, bias, mean, rstd, is_rms, activation, act_param, need_dw,
              need_db, dh=None):
    N = x.shape[1]
    return (x.new_empty(x.shape), weight.new_empty(N) if need_dw else _empty(x),
            bias.new_empty(N) if need_db else _empty(x))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms, activation, act_param, _ = inputs
    _, mean, rstd = output
    ctx.is_rms, ctx.activation, ctx.act_param = is_rms, activation, act_param
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients built for mean/rstd (None instead)
    ctx.save_for_backward(x, residual, weight, bias, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return (None,) * 9
    x, residual, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw = weight is not None and need[2]
    need_db = bias is not None and need[3]
    dx, dw, db = norm_act_bwd(dy, x, residual, weight, bias, mean, rstd, ctx.is_rms,
                              ctx.activation, ctx.act_param, need_dw, need_db, None)
    dres = dx.to(residual.dtype) if (residual is not None and need[1]) else None
    return (dx if need[0] else None, dres, dw if need_dw else None, db if need_db else None,
            None, None, None, None, None)


norm_act_bwd = fast_op("norm_act_bwd", _bwd_impl, fake=_bwd_fake)
norm_act_fwd = fast_op("norm_act_fwd", _fwd_impl, fake=_fwd_fake, setup_context=_setup_context,
                       backward=_backward)


def _prenorm_impl(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float, is_rms: bool, activation: int, act_param: float,
                  save_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: (M, N) any strides -> (y, h = x + residual (x's dtype), mean, rstd), one
    kernel; ``y`` normalizes the rounded ``h``."""
    if _use_torch(x):
        h = (x + residual).contiguous()
        y, mean, rstd = _torch_norm(x, h.to(_compute_dtype(x)), weight, bias, eps, is_rms,
                                    activation, act_param)
        if not save_stats:
            mean, rstd = _empty(x, mean.dtype), _empty(x, mean.dtype)
        return y, h, mean, rstd
    from tilefuse.kernels.norm import launch_norm_fwd

    M, N = x.shape
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    h = torch.empty(M, N, device=x.device, dtype=x.dtype)
    mean = torch.empty(0 if is_rms or not save_stats else M, device=x.device,
                       dtype=torch.float32)
    rstd = torch.empty(M if save_stats else 0, device=x.device, dtype=torch.float32)
    launch_norm_fwd(x, residual, weight, bias, y, mean if save_stats and not is_rms else None,
                    rstd if save_stats else None, eps, is_rms, activation, act_param, h=h)
    return y, h, mean, rstd


def _prenorm_fake(x, residual, weight, bias, eps, is_rms, activation, act_param, save_stats):
    y, mean, rstd = _fwd_fake(x, residual, weight, bias, eps, is_rms, activation, act_param,
                              save_stats)
    return y, x.new_empty(x.shape), mean, rstd


def _prenorm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms, activation, act_param, _ = inputs
    _, h, mean, rstd = output
    ctx.is_rms, ctx.activation, ctx.act_param = is_rms, activation, act_param
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, weight, bias, mean, rstd)


def _prenorm_backward(ctx, dy, dh, _dmean, _drstd):
    if dy is None and dh is None:
        return (None,) * 9
    need = ctx.needs_input_grad
    h, weight, bias, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and need[2] and dy is not None
    need_db = bias is not None and need[3] and dy is not None
    dw = db = None
    if dy is None:  # only the stream is used downstream: d x = d residual = dh
        dx = dh
    else:
        dx, dw, db = norm_act_bwd(dy, h, None, weight, bias, mean, rstd, ctx.is_rms,
                                  ctx.activation, ctx.act_param, need_dw, need_db, dh)
    return (dx if need[0] else None, dx if need[1] else None, dw if need_dw else None,
            db if need_db else None, None, None, None, None, None)


norm_act_prenorm_fwd = fast_op("norm_act_prenorm_fwd", _prenorm_impl, fake=_prenorm_fake,
                               setup_context=_prenorm_setup, backward=_prenorm_backward)


# --------------------------------------------------------------------------------------------
# public functional API (re-exported by tilefuse.ops)
# --------------------------------------------------------------------------------------------
def _normalized_shape(normalized_shape) -> Tuple[Tuple[int, ...], int]:
    """``(shape, number of elements)``; an int or a 1-tuple of an int (the common forms) without
    the ``numbers.Integral`` checks, which cost microseconds per call."""
    if type(normalized_shape) is int and normalized_shape >= 0:
        return (normalized_shape,), normalized_shape
    if type(normalized_shape) is tuple and len(normalized_shape) == 1 \
            and type(normalized_shape[0]) is int and normalized_shape[0] >= 0:
        return normalized_shape, normalized_shape[0]
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        return (int(normalized_shape),), int(normalized_shape)
    if isinstance(normalized_shape, torch.Size) or isinstance(normalized_shape, (tuple, list)):
        if all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0
               for d in normalized_shape):
            shape = tuple(int(d) for d in normalized_shape)
            return shape, math.prod(shape)
    raise TypeError(f"normalized_shape must be an int or a sequence of non-negative ints, got "
                    f"{normalized_shape!r}")


def _row_norm(x, normalized_shape, weight, bias, eps, activation, residual, is_rms, name,
              prenorm=False):
    if prenorm is not False or not plans_allowed():
        return _row_norm_full(x, normalized_shape, weight, bias, eps, activation, residual,
                              is_rms, name, prenorm)
    try:  # a call with the signature of an earlier one reuses its plan
        grad = needs_grad(x, weight, bias, residual)
        key = (tkey(x), tkey(weight), tkey(bias), tkey(residual), normalized_shape,
               type(normalized_shape), eps, type(eps), activation, is_rms, _env_backend(), grad)
        plan = _PLANS.get(key)
    except (TypeError, AttributeError):  # unhashable arguments (a list shape), a non-tensor
        return _row_norm_full(x, normalized_shape, weight, bias, eps, activation, residual,
                              is_rms, name)
    if plan is not None:
        return plan(x, weight, bias, residual)
    y = _row_norm_full(x, normalized_shape, weight, bias, eps, activation, residual, is_rms,
                       name)  # (validates: raises on bad arguments)
    if key not in _PLANS:
        if eps is None:  # (rms_norm's default, as the full path resolves it)
            eps = _F64_EPS if x.dtype == torch.float64 else _F32_EPS
        remember(_PLANS, key, _norm_plan.make_plan(
            x, _normalized_shape(normalized_shape)[1], weight, bias, eps, activation, residual,
            is_rms, y, grad, norm_act_bwd))
    return y


# per-signature plans (eager, no autocast, with or without grad): tilefuse.fused.norm_plan
_PLANS = plan_cache()


def _row_norm_full(x, normalized_shape, weight, bias, eps, activation, residual, is_rms, name,
                   prenorm=False):
    float_tensor("x", x)
    shape, N = _normalized_shape(normalized_shape)
    k = len(shape)
    if k == 0 or x.dim() < k or x.shape[x.dim() - k:] != shape:
        raise ValueError(f"{name}: normalized_shape {shape} must be non-empty and match the "
                         f"trailing dims of x, got x of shape {tuple(x.shape)}")
    optional_float_tensors(weight=weight, bias=bias, residual=residual)
    same_device(x=x, weight=weight, bias=bias, residual=residual)
    if autocast_maybe_on():
        # autocast (docs/amp.md): fp32 where torch runs layer_norm/rms_norm in fp32 (CUDA,
        # ...), no cast on CPU; a mixed-dtype residual is promoted as eager ``x + residual``
        x, weight, bias, residual = _autocast.norm_fp32("rms_norm" if is_rms else "layer_norm",
                                                        x, weight, bias, residual)
        x, residual = _autocast.promote_residual(x, residual)
    if eps is None and is_rms:  # torch's rms_norm default: eps of the *compute* dtype (fp32 for
        # fp16/bf16 inputs: at::opmath_type), not of the input dtype as its docs say
        eps = _F64_EPS if x.dtype == torch.float64 else _F32_EPS
    elif type(eps) is not float or not eps >= 0:
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
        eps = float(eps)
    if weight is not None and weight.shape != shape:
        check_shape("weight", weight, shape)
    if bias is not None and bias.shape != shape:
        check_shape("bias", bias, shape)
    if residual is not None:
        check_broadcastable("residual", residual, tuple(x.shape))
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    act, act_param = act_code(activation)
    # a view where the leading dims can be flattened; otherwise reshape copies (documented)
    if x.dim() == 2 and k == 1:
        x2 = x
    else:  # (also a 2-D x normalised over both dims: one row)
        x2 = x.reshape(math.prod(x.shape[:x.dim() - k]), N)  # not -1: N may be 0
    r2 = (residual.expand(x.shape).reshape(x2.shape) if residual is not None else None)
    w1 = dense(weight if weight is None or k == 1 else weight.reshape(N))
    b1 = dense(bias if bias is None or k == 1 else bias.reshape(N))
    save = needs_grad(x2, r2, w1, b1)
    if prenorm:
        if type(prenorm) is not bool:
            raise TypeError(f"prenorm must be a bool, got {prenorm!r}")
        if r2 is None:  # h = x: nothing to add or store (flash-attn returns x as well)
            y, _, _ = norm_act_fwd(x2, None, w1, b1, eps, is_rms, act, act_param, save)
            return (y if x2 is x else y.view(x.shape)), x
        y, h, _, _ = norm_act_prenorm_fwd(x2, r2, w1, b1, eps, is_rms, act, act_param, save)
        return ((y, h) if x2 is x else (y.view(x.shape), h.view(x.shape)))
    y, _, _ = norm_act_fwd(x2, r2, w1, b1, eps, is_rms, act, act_param, save)
    return y if x2 is x else y.view(x.shape)


def layer_norm_act(x: Tensor, normalized_shape, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, activation=None,
                   residual: Optional[Tensor] = None, prenorm: bool = False):
    """``act(layer_norm(x + residual))`` in one row-wise kernel (fp32 statistics).

    Same semantics as :func:`torch.nn.functional.layer_norm` followed by the activation; the
    optional ``residual`` is added *before* the norm (pre-norm transformer block). ``activation``
    is ``None``, a name (``"relu"``, ``"gelu"``, ``"silu"``, ...), ``(name, param)`` or a torch
    activation module. ``prenorm=True`` returns ``(y, h)`` with ``h = x + residual`` (x's dtype)
    written by the same kernel, ``y = act(layer_norm(h))``: the residual stream of a pre-norm
    block (``h`` is ``x`` itself without a residual); gradients of ``h`` flow into ``x`` and
    ``residual`` in the norm's backward kernel.

    Under ``torch.autocast`` this follows torch's policy for ``layer_norm`` on the input's
    device: fp32 inputs and output on CUDA, no cast on CPU (docs/amp.md).

    >>> import torch, tilefuse
    >>> x = torch.randn(4, 10)
    >>> y = tilefuse.ops.layer_norm_act(x, 10, activation="relu")
    >>> bool(torch.allclose(y, torch.relu(torch.nn.functional.layer_norm(x, (10,))), atol=1e-5))
    True
    """
    return _row_norm(x, normalized_shape, weight, bias, eps, activation, residual, False,
                     "layer_norm_act", prenorm)


def rms_norm_act(x: Tensor, normalized_shape, weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, activation=None,
                 residual: Optional[Tensor] = None, prenorm: bool = False):
    """``act(rms_norm(x + residual))``: :func:`torch.nn.functional.rms_norm` semantics
    (``eps=None``: the fp32 machine eps, fp64's for fp64 inputs, as torch computes it),
    activation fused, residual added first. ``prenorm=True``: returns ``(y, h = x + residual)``
    as :func:`layer_norm_act` does.

    >>> import torch, tilefuse
    >>> x = torch.randn(4, 10)
    >>> y = tilefuse.ops.rms_norm_act(x, [10], activation="silu")
    >>> ref = torch.nn.functional.silu(torch.nn.functional.rms_norm(x, [10]))
    >>> bool(torch.allclose(y, ref, atol=1e-5))
    True
    """
    return _row_norm(x, normalized_shape, weight, None, eps, activation, residual, True,
                     "rms_norm_act", prenorm)

"""The per-signature plans of the GEMM ops ``matmul`` and ``linear`` (:mod:`tilefuse.fused.matmul`,
:mod:`tilefuse.fused.linear`): where an eager call finds the plan made for an earlier call with
its signature, and how that plan becomes the op's hot one (docs/host_path.md)."""
from __future__ import annotations

import torch
from torch._C import _set_grad_enabled, is_grad_enabled

from tilefuse._backend import _ENV_DATA, _ENV_KEY, _env_backend
from tilefuse.fused._fast import plan_cache, plans_allowed, remember, tensor_guard, tkey


def _allow_tf32() -> bool:
    # read at run time inside the op (not in traced code), like torch.mm does
    return bool(torch.backends.cuda.matmul.allow_tf32)


class OpPlans:
    """The per-signature plans of one GEMM op (``matmul``, ``linear``): a keyed dict per grad
    mode (key: the two operands, bias and residual through their shapes, strides, dtypes and
    devices, the activation, out_dtype, ``TILEFUSE_BACKEND`` and TF32), and the hot slot.

    The hot slot (per grad mode) holds the plan of the signature that the last two keyed
    lookups both found, with a guard that checks a call against it in one C call
    (:func:`tilefuse.fused._fast.tensor_guard`) instead of building and hashing a key
    (:func:`hot_plan`): ``hot = (activation, out_dtype, bias is None, TILEFUSE_BACKEND, guard,
    TF32 or None, plan)``, scalars compared by identity. Any other call empties it
    (:func:`find_plan`), so a caller that alternates signatures pays one failed check, then
    keyed lookups only. The guard also fails under autocast, functorch transforms and jit
    tracing (their dispatch keys are part of what it checks; ``_fast._guards_work`` tests
    that), so the slot needs no checks of its own for those modes."""

    __slots__ = ("plans", "hot", "last")

    def __init__(self):
        self.plans = (plan_cache(), plan_cache())  # no grad, grad
        self.hot = plan_cache()
        self.last = [None, None]  # per grad mode: the plan the last keyed lookup found


def _key(a, b, bias, residual, activation, out_dtype):
    key = (a.shape, a.stride(), a.dtype, a.device, b.shape, b.stride(), b.dtype, b.device,
           activation, out_dtype, _env_backend(), a.is_cuda and _allow_tf32())
    if bias is not None or residual is not None:
        key += (tkey(bias), tkey(residual))
    return key


def hot_plan(hot, a, b, bias, residual, activation, out_dtype):
    """The hot slot's plan when this call matches it (one guard call, no key), else None."""
    if (residual is None and activation is hot[0] and out_dtype is hot[1]
            and (bias is None) is hot[2] and hot[3] == _ENV_DATA.get(_ENV_KEY)
            and (hot[4](a, b) if bias is None else hot[4](a, b, bias))
            and (hot[5] is None or hot[5] == _allow_tf32())):
        return hot[6]
    return None


def find_plan(ops, grad, a, b, bias, residual, activation, out_dtype):
    """The keyed plan of this eager call (not compiling, not under ``custom_op_path``), for a
    caller whose inlined hot-slot check missed: the slot is emptied (any other signature
    empties it; pop: another thread may have emptied it since), then the key is looked up.
    None for a new or unplannable signature (then the op takes its full path and calls
    :func:`add_plan`)."""
    ops.hot.pop(grad, None)
    if not plans_allowed():
        return None
    try:
        plan = ops.plans[grad][_key(a, b, bias, residual, activation, out_dtype)]
    except KeyError:  # a new signature
        return None
    except (TypeError, AttributeError):  # an unhashable activation, a non-tensor argument
        return None
    if plan is not None:
        if plan is ops.last[grad] and residual is None:
            _promote(ops, grad, plan, a, b, bias, activation, out_dtype)
        ops.last[grad] = plan
    return plan


def add_plan(ops, grad, a, b, bias, residual, activation, out_dtype, planner):
    """After a validated full-path call: store ``planner(a, b, bias, residual, activation,
    out_dtype, grad)`` (None: the signature cannot be planned) under the call's key."""
    if not plans_allowed():
        return
    try:
        key = _key(a, b, bias, residual, activation, out_dtype)
    except (TypeError, AttributeError):
        return
    plans = ops.plans[grad]
    if key not in plans:
        remember(plans, key, planner(a, b, bias, residual, activation, out_dtype, grad))


def _promote(ops, grad, plan, a, b, bias, activation, out_dtype):
    """Make ``plan`` (found by key for this call, no residual) the hot one: the guard is built
    from this call's tensors, the scalars are this call's objects (the slot compares them by
    identity: an equal but distinct activation tuple misses it)."""
    if _ENV_DATA is None:  # pragma: no cover - not CPython's os.environ
        return
    check = tensor_guard(a, b) if bias is None else tensor_guard(a, b, bias)
    if check is not None:
        ops.hot[grad] = (activation, out_dtype, bias is None, _ENV_DATA.get(_ENV_KEY), check,
                         _allow_tf32() if a.is_cuda else None, plan)


def launch_transposed(launch):
    """``launch`` for a ``linear`` plan that is passed the weight ``(N, K)``: the launch of
    ``weight.t()``, that view taken without an autograd node (grad mode off around it)."""
    def transposed(a, w, bias, residual):
        enabled = is_grad_enabled()
        _set_grad_enabled(False)
        try:
            return launch(a, w.t(), bias, residual)
        finally:
            _set_grad_enabled(enabled)
    return transposed

"""Shared test helpers: compare a kernel against an fp64 reference with a tolerance tied to eager
torch's own error in the same dtype (DEVELOPERS.md, correctness rules)."""
from __future__ import annotations

import math

import torch

# absolute floor per dtype (assert_close_to_ref), for outputs whose eager error happens to be ~0
_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def eps(dtype):
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def maxerr(x, ref):
    if x.numel() == 0:
        return 0.0
    d = (x.double() - ref.double()).abs()
    both_nan = torch.isnan(x.double()) & torch.isnan(ref.double())
    same_inf = torch.isinf(ref.double()) & (x.double() == ref.double())
    d = torch.where(both_nan | same_inf, torch.zeros_like(d), d)
    return torch.nan_to_num(d, nan=math.inf).max().item()


def check(name, out, ref64, eager=None, factor=4.0, scale=None, n_reduce=1, cond=1.0,
          floor=None, rounding=True):
    """``out`` (kernel) vs ``ref64`` (fp64), with a tolerance tied to ``eager`` torch's error in
    the same dtype (and, with ``rounding``, to the unavoidable error of rounding the fp64 result
    to ``out``'s dtype). The project's one tolerance rule (``tests/utils.assert_close_to_ref``
    calls it): ``tol = factor * base + atol``, ``atol`` = 2 ulps grown with the reduction length
    and ``cond``, or ``floor * scale`` when a per-dtype ``floor`` is given."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if eager is not None:
        assert eager.shape == ref64.shape
    if out.numel() == 0:
        return
    dt = out.dtype
    finite = torch.isfinite(ref64)
    # magnitude of the values involved: the reference output's, or more when the caller says so
    out_mag = ref64.double()[finite].abs().max().item() if finite.any() else 1.0
    scale = max(1.0, out_mag, scale or 0.0)
    base = maxerr(ref64.to(dt), ref64) if rounding else 0.0
    if eager is not None:
        base = max(base, maxerr(eager, ref64))
    # the tiny atol: 2 ulps of the magnitude involved, grown like a random walk with the length of
    # the longest fp32 reduction behind the value (eager CPU torch often accumulates in fp64) and
    # by ``cond``
    # the reduction; ``cond`` is the problem's condition number where fp32 statistics amplify
    # rounding (normalising a group whose |mean| >> std: error ~ eps * |mean| / std)
    atol = (floor * scale if floor is not None
            else 2 * eps(dt) * scale * math.sqrt(max(1, n_reduce)) * max(1.0, cond))
    tol = factor * base + atol
    err = maxerr(out, ref64)
    assert err <= tol, (f"{name}: max error {err:.3e} > tol {tol:.3e} (baseline eager/rounding "
                        f"error {base:.3e}, dtype {dt}, shape {tuple(out.shape)})")


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return maxerr(x, ref)


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor | None = None,
                        factor: float = 4.0, name: str = "output") -> None:
    """``out`` must be within ``factor`` x eager torch's error (vs the fp64 ``ref64``) plus a
    dtype floor scaled by the reference's magnitude: :func:`check` with ``floor``."""
    check(name, out, ref64, eager, factor, floor=_FLOOR.get(out.dtype, 1e-5), rounding=False)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """The optimizer tests' model: Linear(6,10) -> Tanh -> Linear(10,3, no bias)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(),
                               torch.nn.Linear(10, 3, bias=False))


def tiny_data():
    """A fixed (7x6 input, 7x3 target) regression batch for :func:`tiny_model`."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 6, generator=g), torch.randn(7, 3, generator=g)


def steps_in_lockstep(pa, pb, opt_a, opt_b, n: int = 5, seed: int = 2) -> None:
    """``n`` steps of ``opt_a`` (over params ``pa``) and ``opt_b`` (over their copies ``pb``) with
    the same seeded random gradients, drawn on the CPU and moved to each param's device."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p, q in zip(pa, pb):
            grad = torch.randn(p.shape, generator=g).to(p.device)
            p.grad, q.grad = grad, grad.clone()
        opt_a.step()
        opt_b.step()


def torch_test_db(kind: str = "op_db"):
    """PyTorch's own test-sample databases (``op_db`` OpInfos, ``module_db`` ModuleInfos).

    Their modules import ``expecttest``, a torch test-only dependency not installed here: a
    stand-in providing ``TestCase`` is registered first (only the sample generators are used).
    Importing them also freezes ``torch.backends`` flags for the whole process
    (``torch.backends.disable_global_flags()``); that is undone, so later tests in the same
    worker may still set e.g. ``torch.backends.cudnn.benchmark``."""
    import sys
    import types
    import unittest

    if "expecttest" not in sys.modules:
        try:
            import expecttest  # noqa: F401
        except ImportError:
            stub = types.ModuleType("expecttest")
            stub.TestCase = unittest.TestCase
            sys.modules["expecttest"] = stub
    frozen = torch.backends.flags_frozen()
    try:
        if kind == "module_db":
            from torch.testing._internal.common_modules import module_db as db
        else:
            from torch.testing._internal.common_methods_invocations import op_db as db
    finally:
        if not frozen:  # the flag lives in the globals of torch/backends/__init__.py
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return db

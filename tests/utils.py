"""Shared test helpers: compare a kernel against an fp64 reference with a tolerance tied to eager
torch's own error in the same dtype (DEVELOPERS.md, correctness rules)."""
from __future__ import annotations

import torch

# absolute floor per dtype, for outputs whose eager error happens to be ~0
_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor | None = None,
                        factor: float = 4.0, name: str = "output") -> None:
    """``out`` must be within ``factor`` x eager torch's error (vs the fp64 ``ref64``) plus a
    dtype floor scaled by the reference's magnitude."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    scale = max(1.0, ref64.double().abs().max().item())
    floor = _FLOOR.get(out.dtype, 1e-5) * scale
    eager_err = max_err(eager, ref64) if eager is not None else 0.0
    tol = factor * eager_err + floor
    err = max_err(out, ref64)
    assert err <= tol, (f"{name}: max error {err:.3e} > tol {tol:.3e} (eager torch error "
                        f"{eager_err:.3e}, dtype {out.dtype})")


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

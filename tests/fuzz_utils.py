"""Helpers shared by the hypothesis fuzz tests (test_fuzz_ops.py, test_fuzz_modules.py): the
fast / slow-twin decorator and the tolerance check tied to eager torch's error in the same dtype."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


_HC = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
       HealthCheck.filter_too_much]


def fuzz(n_fast: int, n_slow: int, fast_kw: dict | None = None, slow_kw: dict | None = None):
    """Decorator turning ``body(data)`` into a fast hypothesis test (returned) and a slow-marked
    twin ``<name>_slow`` with more examples (put in the module namespace). ``fast_kw`` /
    ``slow_kw``: keyword arguments passed to ``body`` in that lane only (e.g. a cheap
    ``torch.compile`` backend in the fast lane, inductor in the slow one)."""

    def wrap(body):
        def fast(data):
            body(data, **(fast_kw or {}))

        def slow(data):
            body(data, **(slow_kw or {}))

        fast.__name__ = body.__name__
        slow.__name__ = body.__name__ + "_slow"
        f = settings(max_examples=n_fast, deadline=None, derandomize=True,
                     suppress_health_check=_HC, print_blob=True)(given(data=st.data())(fast))
        s = pytest.mark.slow(settings(max_examples=n_slow, deadline=None,
                                      suppress_health_check=_HC,
                                      print_blob=True)(given(data=st.data())(slow)))
        body.__globals__[slow.__name__] = s   # the slow twin, collected as <name>_slow
        return f

    return wrap


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


def check(name, out, ref64, eager=None, factor=4.0, scale=None, n_reduce=1, cond=1.0):
    """``out`` (kernel) vs ``ref64`` (fp64), with a tolerance tied to ``eager`` torch's error in
    the same dtype (and to the unavoidable error of rounding the fp64 result to ``out``'s dtype)."""
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
    base = maxerr(ref64.to(dt), ref64)
    if eager is not None:
        base = max(base, maxerr(eager, ref64))
    # the tiny atol: 2 ulps of the magnitude involved, grown like a random walk with the length of
    # the longest fp32 reduction behind the value (eager CPU torch often accumulates in fp64) and
    # by ``cond``
    # the reduction; ``cond`` is the problem's condition number where fp32 statistics amplify
    # rounding (normalising a group whose |mean| >> std: error ~ eps * |mean| / std)
    tol = factor * base + 2 * eps(dt) * scale * math.sqrt(max(1, n_reduce)) * max(1.0, cond)
    err = maxerr(out, ref64)
    assert err <= tol, (f"{name}: max error {err:.3e} > tol {tol:.3e} (baseline eager/rounding "
                        f"error {base:.3e}, dtype {dt}, shape {tuple(out.shape)})")


def randn(g, shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def seed(data):
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

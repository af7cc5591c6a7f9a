"""Helpers shared by the hypothesis fuzz tests (test_fuzz_ops.py, test_fuzz_modules.py): the
fast / slow-twin decorator and the tolerance check tied to eager torch's error in the same dtype."""
from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils import check, eps, maxerr  # noqa: F401  (the tolerance rule lives in tests/utils.py)


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


def randn(g, shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def seed(data):
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

"""LayerNorm / RMSNorm memory-traffic and launch budgets (issue 17), counted in the interpreter
with tilefuse.bench.traffic: deterministic counts, not timings.

Budgets per call, forward and backward: distinct bytes <= 1.15x the minimal traffic (each input
read once, each output written once), issued bytes <= 2.05x, at most 3 launches (Triton kernels
plus torch ops other than views and allocations).
"""
import pytest
import torch

import tilefuse
import tilefuse.kernels.norm as kn
from tilefuse.bench.traffic import count_traffic, nbytes

DISTINCT, ISSUED, LAUNCHES = 1.15, 2.05, 3


def _check(t, minimal, extra=0):
    assert t.launches <= LAUNCHES, (t.kernels, t.torch_ops)
    assert t.distinct_bytes <= DISTINCT * minimal, t.distinct_bytes / minimal
    assert t.issued_bytes <= ISSUED * minimal + extra, t.issued_bytes / minimal


def _run(M, N, rms, act, dtype=torch.bfloat16, wide=False):
    x = torch.randn(M, N, dtype=dtype, requires_grad=True)
    w = torch.randn(N, dtype=dtype, requires_grad=True)
    b = None if rms else torch.randn(N, dtype=dtype, requires_grad=True)
    with count_traffic() as fwd:
        y = (tilefuse.ops.rms_norm_act(x, N, w, activation=act) if rms
             else tilefuse.ops.layer_norm_act(x, N, w, b, activation=act))
    # rows wider than the on-chip block stream one row per program: weight and bias are
    # re-read per row (a share that vanishes for the <= 32K-wide rows kept on chip)
    _check(fwd, nbytes(x, w, b, y), extra=(M - 1) * nbytes(w, b) if wide else 0)
    g = torch.randn_like(y)
    with count_traffic() as bwd:
        y.backward(g)
    _check(bwd, nbytes(g, x, w, b, x.grad, w.grad, None if b is None else b.grad))
    return fwd, bwd


@pytest.mark.parametrize("rms,act", [(False, None), (True, "silu"), (False, "gelu")])
@pytest.mark.parametrize("M,N", [(64, 256), (4, 1000), (1, 64)])
def test_rows_in_registers(M, N, rms, act):
    _run(M, N, rms, act)


@pytest.mark.parametrize("rms,act", [(False, None), (True, "silu")])
def test_wide_rows(monkeypatch, rms, act):
    """Rows wider than the on-chip block (cap lowered so a small shape takes that path): the
    row-statistics pass and the column pass, dw/db kept in registers."""
    for cap in ("MAX_BLOCK", "FUSED_MAX_BLOCK", "BWD_MAX_BLOCK"):  # every on-chip row cap
        monkeypatch.setattr(kn, cap, 64)
    _, bwd = _run(8, 520, rms, act, wide=True)
    assert bwd.kernels >= 2  # the wide path ran


def test_no_stats_stored_in_inference():
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    with torch.no_grad(), count_traffic() as t:
        y = tilefuse.ops.layer_norm_act(x, 128)
    assert t.distinct_bytes == nbytes(x, y) and t.launches == 1


@pytest.mark.parametrize("rms", [False, True])
def test_float64_gradients_are_float64_accurate(rms):
    """fp64 statistics are kept in fp64 (they used to be saved as fp32)."""
    torch.manual_seed(1)
    x = (torch.randn(6, 33, dtype=torch.float64) * 3 + 5).requires_grad_()
    w = torch.randn(33, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 33, dtype=torch.float64)
    if rms:
        y = tilefuse.ops.rms_norm_act(x, 33, w, eps=1e-6)
        ref = torch.nn.functional.rms_norm(x, (33,), w, eps=1e-6)
    else:
        y = tilefuse.ops.layer_norm_act(x, 33, w)
        ref = torch.nn.functional.layer_norm(x, (33,), w)
    got = torch.autograd.grad(y, (x, w), g)
    want = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)

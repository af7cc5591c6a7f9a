"""Depthwise conv2d memory-traffic and launch budgets (issue 18 item 3), counted in the
interpreter with tilefuse.bench.traffic: deterministic counts, not timings.

3x3 + relu6 (+ bias), bf16, NCHW and channels_last. Minimal traffic: every input read once, every
output written once (forward: x, w, b, y; backward: dy, x, w, the saved output y, dx, dw, db).
Budgets: forward distinct bytes <= 1.15x minimal, backward <= 1.35x; <= 3 launches each (Triton
kernels plus torch ops other than views and allocations).
"""
import pytest
import torch

import tilefuse
import tilefuse.kernels as K
from tilefuse.bench.traffic import count_traffic, nbytes

FWD, BWD, LAUNCHES = 1.15, 1.35, 3


def _inputs(layout, N=2, C=16, H=16, W=16, dtype=torch.bfloat16):
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, 1, 3, 3) / 3).to(dtype)
    b = torch.randn(C, dtype=dtype)
    return [t.requires_grad_() for t in (x, w, b)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 16, 16, 16), (1, 24, 14, 14)])
def test_relu6_budgets(layout, shape):
    x, w, b = _inputs(layout, *shape)
    with count_traffic() as fwd:
        y = tilefuse.ops.depthwise_conv2d(x, w, b, padding=1, activation="relu6")
    assert fwd.launches == 1, (fwd.kernels, fwd.torch_ops)
    assert fwd.distinct_bytes <= FWD * nbytes(x, w, b, y), fwd.distinct_bytes / nbytes(x, w, b, y)
    g = torch.randn_like(y)
    with count_traffic() as bwd:
        y.backward(g)
    minimal = nbytes(g, x, w, y, x.grad, w.grad, b.grad)
    assert bwd.launches <= LAUNCHES, (bwd.kernels, bwd.torch_ops)
    assert bwd.distinct_bytes <= BWD * minimal, bwd.distinct_bytes / minimal


def test_relu_forward_stores_no_pre_activation():
    """relu/relu6 without a residual: only y is written, also when grad is needed."""
    x, w, b = _inputs("nchw")
    with count_traffic() as t:
        y = tilefuse.ops.depthwise_conv2d(x, w, b, padding=1, activation="relu")
    assert t.distinct_bytes == nbytes(x, w, b, y)


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", None])
def test_folded_backward_matches_torch(act):
    """The activation gradient folded into grad_input/grad_weight/grad_bias (from y for
    relu/relu6, from z otherwise) matches torch."""
    torch.manual_seed(1)
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64) * 3
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    g = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    got = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    y = tilefuse.ops.depthwise_conv2d(*got, padding=1, activation=act)
    z = torch.nn.functional.conv2d(ref[0], ref[1], ref[2], padding=1, groups=6)
    yr = {"relu": torch.relu, "relu6": torch.nn.functional.relu6,
          "silu": torch.nn.functional.silu, None: lambda v: v}[act](z)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(y, yr)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-10)


def test_weight_grad_reads_dy_once():
    """One program computes all taps of its tile: dy is read once (issued), not once per tap."""
    x, w, b = _inputs("nchw")
    y = tilefuse.ops.depthwise_conv2d(x, w, None, padding=1)
    g = torch.randn_like(y)
    from tilefuse.kernels.depthwise_wgrad import launch_backward_weight

    with count_traffic() as t:
        launch_backward_weight(g, x.detach(), (3, 3), (1, 1), (1, 1), (1, 1))
    # dy once + x once per tap (re-read from cache) + the small partials
    assert t.issued_bytes <= nbytes(g) + 9 * nbytes(x) + 64 * 1024


def test_offsets_are_int32_below_2_31():
    from tilefuse.kernels.depthwise import _idx
    import triton.language as tl

    small = torch.empty(2, 3, 4, 5)
    assert _idx(small) == tl.int32
    huge = torch.empty((2, 2), device="meta").as_strided((2, 2), (2 ** 31, 1))  # span 2**31+2
    assert _idx(huge) == tl.int64
    assert K.sm_count("cpu") >= 1

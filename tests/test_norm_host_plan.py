"""The per-signature plans of ``layer_norm_act`` / ``rms_norm_act`` (tilefuse.fused.norm,
norm_plan): a repeated call allocates and makes the full path's launch
(``kernels.norm.bind_norm_fwd``) on the caller's tensors; with grad through one
autograd.Function. Checked here: the planned call equals the custom-op path bit for bit
(outputs and gradients) and launches one kernel without the full path; signatures the plan
cannot serve (copies, broadcast residuals, strided parameters, modules) keep the full path;
autocast and prenorm step aside; bad input still raises.
"""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
from fast_path_utils import (assert_checkpoint_matches_custom_op, assert_plans_match_custom_op,
                             assert_same)
from tilefuse.bench.host import stub_launches
from tilefuse.fused import norm as fn
from tilefuse.fused._fast import custom_op_path

ops = tilefuse.ops


def _cases():
    x2, x3, r3 = torch.randn(5, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    w, b = torch.randn(16), torch.randn(16)
    w2, xt, r1, ws = torch.randn(3, 16), torch.randn(16, 5).t(), torch.randn(16), \
        torch.randn(32)[::2]
    return {
        "ln 2d": lambda: ops.layer_norm_act(x2, 16, w, b),
        "ln 3d gelu": lambda: ops.layer_norm_act(x3, (16,), w, b, activation="gelu"),
        "ln residual": lambda: ops.layer_norm_act(x3, 16, w, b, residual=r3),
        "ln no affine": lambda: ops.layer_norm_act(x3, 16),
        "ln two dims": lambda: ops.layer_norm_act(x3, (3, 16), w2),
        "ln 2d both dims": lambda: ops.layer_norm_act(x2, (5, 16)),
        "ln transposed x": lambda: ops.layer_norm_act(xt, 16, w, b),
        "ln eps int": lambda: ops.layer_norm_act(x2, 16, w, b, eps=1),
        "rms default eps": lambda: ops.rms_norm_act(x3, 16, w),
        "rms silu residual": lambda: ops.rms_norm_act(x3, [16], w, 1e-6, "silu", r3),
        "rms fp16": lambda: ops.rms_norm_act(x3.half(), 16, w.half()),
        "ln bf16": lambda: ops.layer_norm_act(x2.bfloat16(), 16, w.bfloat16(), b.bfloat16()),
        "ln broadcast residual": lambda: ops.layer_norm_act(x3, 16, w, b, residual=r1),
        "ln strided weight": lambda: ops.layer_norm_act(x2, 16, ws, b),
        "ln non-contiguous 3d": lambda: ops.layer_norm_act(x3.transpose(0, 1), 16, w, b),
        "ln module act": lambda: ops.layer_norm_act(x2, 16, w, b,
                                                    activation=torch.nn.LeakyReLU(0.2)),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_planned_norm_equals_custom_op(name):
    call = _cases()[name]
    with torch.no_grad():
        with custom_op_path():
            ref = call()
        for _ in range(3):  # full path (plans), then the plan
            assert_same(call(), ref)


def test_plan_hit_skips_the_full_path_and_launches_once(monkeypatch):
    x, w, b = torch.randn(2, 3, 16), torch.randn(16), torch.randn(16)
    with torch.no_grad():
        ref = ops.layer_norm_act(x, 16, w, b, activation="relu")
    monkeypatch.setattr(fn, "_row_norm_full", lambda *a: pytest.fail("full path ran"))
    with torch.no_grad(), stub_launches() as count:
        ops.layer_norm_act(x, 16, w, b, activation="relu")
    assert count.n == 1
    with torch.no_grad():
        assert_same(ops.layer_norm_act(x, 16, w, b, activation="relu"), ref)


def test_unservable_signatures_are_not_planned():
    x2, w, b = torch.randn(5, 16), torch.randn(16), torch.randn(16)
    with torch.no_grad():
        for call in (lambda: ops.layer_norm_act(x2, 16, torch.randn(32)[::2], b),
                     lambda: ops.layer_norm_act(x2, 16, w, b, residual=torch.randn(16)),
                     lambda: ops.layer_norm_act(torch.randn(3, 2, 16).transpose(0, 1), 16)):
            fn._PLANS.clear()
            call()
            assert list(fn._PLANS.values()) == [None]


def test_autocast_and_prenorm_take_the_full_path(monkeypatch):
    x, w, b = torch.randn(4, 16), torch.randn(16), torch.randn(16)
    with torch.no_grad():
        ops.layer_norm_act(x, 16, w, b)
    n = len(fn._PLANS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ops.layer_norm_act(x, 16, w, b)
    with torch.no_grad():
        y, h = ops.layer_norm_act(x, 16, w, b, residual=x, prenorm=True)
    assert len(fn._PLANS) == n
    torch.testing.assert_close(h, 2 * x)


def test_bad_input_raises_after_a_plan():
    x, w = torch.randn(4, 16), torch.randn(16)
    with torch.no_grad():
        ops.layer_norm_act(x, 16, w)
        with pytest.raises(ValueError):
            ops.layer_norm_act(x, 8, w)
        with pytest.raises(ValueError):
            ops.layer_norm_act(x, 16, w, eps=-1.0)
        with pytest.raises(ValueError):
            ops.layer_norm_act(x, 16, w, eps=True)
        with pytest.raises((TypeError, ValueError)):
            ops.layer_norm_act(x, 16, torch.randn(8))


def test_two_dim_x_normalised_over_both_dims():
    """normalized_shape covering both dims of a 2-D x is one row (it normalised each row)."""
    x, w = torch.randn(3, 4), torch.randn(3, 4)
    for fn_, ref in ((ops.layer_norm_act, F.layer_norm), (ops.rms_norm_act, F.rms_norm)):
        for grad in (False, True):
            xs = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y = fn_(xs, (3, 4), w)
            torch.testing.assert_close(y, ref(x, (3, 4), w), rtol=1e-5, atol=1e-5)


GRAD_CASES = {
    "ln 2d": (lambda x, w, b, r: ops.layer_norm_act(x, 16, w, b), (5, 16), (16,)),
    "ln 3d gelu": (lambda x, w, b, r: ops.layer_norm_act(x, 16, w, b, activation="gelu"),
                   (2, 3, 16), (16,)),
    "ln residual": (lambda x, w, b, r: ops.layer_norm_act(x, 16, w, b, residual=r),
                    (2, 3, 16), (16,)),
    "ln two dims": (lambda x, w, b, r: ops.layer_norm_act(x, (3, 16), w, b), (2, 3, 16),
                    (3, 16)),
    "rms silu residual": (lambda x, w, b, r: ops.rms_norm_act(x, 16, w, None, "silu", r) +
                          0 * b.sum(), (2, 3, 16), (16,)),
    "rms 2d both dims": (lambda x, w, b, r: ops.rms_norm_act(x, (5, 16), w) + 0 * b.sum(),
                         (5, 16), (5, 16)),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_planned_norm_with_grad_equals_custom_op(name):
    """With grad the plan is one autograd.Function; outputs and the gradients of every input
    (also when only some require grad) equal the custom-op path's bit for bit."""
    fn_, shape, pshape = GRAD_CASES[name]
    inputs = (torch.randn(shape), torch.randn(pshape) + 1, torch.randn(pshape),
              torch.randn(shape))
    for mask in ([True] * 4, [False, True, True, False], [True, False, False, True]):
        assert_plans_match_custom_op(fn_, inputs, mask,
                                     dy=lambda y: torch.linspace(-1, 1, y.numel()).view(y.shape))


def test_grad_plan_hit_skips_the_full_path(monkeypatch):
    x, w = torch.randn(2, 3, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    ops.layer_norm_act(x, 16, w)  # plans
    monkeypatch.setattr(fn, "_row_norm_full", lambda *a: pytest.fail("full path ran"))
    with stub_launches() as count:
        y = ops.layer_norm_act(x, 16, w)
    assert count.n == 1 and y.requires_grad


@pytest.mark.parametrize("name", ["ln 3d gelu", "ln residual", "ln two dims", "ln 2d"])
def test_checkpoint_forward_and_recomputation_on_either_path(name):
    """The plan with grad saves, under saved-tensor hooks (checkpoint), the full path's 2-D
    views: the forward (full path on a new signature) and its recomputation (plan) agree."""
    fn_, shape, pshape = GRAD_CASES[name]
    inputs = (torch.randn(shape), torch.randn(pshape) + 1, torch.randn(pshape),
              torch.randn(shape))
    assert_checkpoint_matches_custom_op(fn_, inputs, fn._PLANS.clear)

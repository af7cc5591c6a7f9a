"""The per-signature plans and the hot slot of ``tilefuse.ops.linear`` (tilefuse.fused.linear).

A linear plan is keyed on linear's own arguments and runs the matmul plan of ``x (M, K) @
weight.T`` on the caller's tensors (an N-D contiguous ``x`` viewed as 2-D, the output viewed
back, as the full path does). Checked here: every planned call, with and without grad, equals
the custom-op path bit for bit (outputs and gradients); a hot call skips the full path and the
keyed lookup and launches one kernel; other signatures miss the slot; compiling still traces
the custom op.
"""
import pytest
import torch

import tilefuse
from fast_path_utils import (assert_checkpoint_matches_custom_op, assert_same, compiled_targets,
                             record_launches)
from tilefuse.bench.host import stub_launches
from tilefuse.fused import linear as fl
from tilefuse.fused import matmul_plan
from tilefuse.fused._fast import custom_op_path

ops = tilefuse.ops


def _cases():
    x2, x3, w, b = torch.randn(5, 16), torch.randn(2, 3, 16), torch.randn(12, 16), torch.randn(12)
    return {
        "2d": (lambda x, w: ops.linear(x, w), (x2, w)),
        "2d bias": (lambda x, w, b: ops.linear(x, w, b), (x2, w, b)),
        "2d bias gelu": (lambda x, w, b: ops.linear(x, w, b, activation="gelu"), (x2, w, b)),
        "2d residual": (lambda x, w, b, r: ops.linear(x, w, b, "relu", residual=r),
                        (x2, w, b, torch.randn(5, 12))),
        "3d": (lambda x, w: ops.linear(x, w), (x3, w)),
        "3d bias silu": (lambda x, w, b: ops.linear(x, w, b, activation="silu"), (x3, w, b)),
        "3d residual": (lambda x, w, r: ops.linear(x, w, residual=r),
                        (x3, w, torch.randn(2, 3, 12))),
        "3d broadcast residual": (lambda x, w, r: ops.linear(x, w, residual=r),
                                  (x3, w, torch.randn(12))),
        "3d non-contiguous x": (lambda x, w: ops.linear(x.transpose(0, 1), w), (x3, w)),
        "transposed x": (lambda x, w: ops.linear(x.t(), w), (torch.randn(16, 5), w)),
        "transposed weight": (lambda x, w: ops.linear(x, w.t()), (x2, torch.randn(16, 12))),
        "1d x": (lambda x, w, b: ops.linear(x, w, b), (torch.randn(16), w, b)),
        "fp16": (lambda x, w, b: ops.linear(x, w, b, "relu"), (x2.half(), w.half(), b.half())),
    }


def _fresh(t):
    """A copy of ``t`` (a fresh leaf) whose base has ``t``'s 16-byte alignment."""
    if not t.data_ptr() % 16:
        return t.detach().clone()
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    return out.copy_(t)


def _run(fn, inputs, grad, mask=None):
    mask = mask or [True] * len(inputs)
    xs = [_fresh(t).requires_grad_(grad and m) for t, m in zip(inputs, mask)]
    with torch.set_grad_enabled(grad):
        y = fn(*xs)
        if grad:
            y.backward(torch.ones_like(y))
    return [y.detach()] + ([t.grad for t in xs] if grad else [])


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(_cases()))
def test_planned_linear_equals_custom_op(name, grad):
    fn, inputs = _cases()[name]
    masks = [None] if not grad else [None, [False] + [True] * (len(inputs) - 1),
                                     [True] + [False] * (len(inputs) - 1)]
    for mask in masks:
        with custom_op_path():
            ref = _run(fn, inputs, grad, mask)
        for _ in range(4):  # full path, keyed plan, keyed plan (promoted), hot slot
            for got, want in zip(_run(fn, inputs, grad, mask), ref):
                assert (got is None) == (want is None)
                if got is not None:
                    assert_same(got, want)


@pytest.mark.parametrize("bias", [False, True])
def test_hot_linear_skips_the_full_path(monkeypatch, bias):
    x, w, b = torch.randn(2, 3, 16), torch.randn(12, 16), torch.randn(12)
    args = (x, w, b) if bias else (x, w)
    with torch.no_grad():
        for _ in range(3):
            ops.linear(*args, activation="relu")
        with custom_op_path():
            ref = ops.linear(*args, activation="relu")
    assert fl._LINEAR.hot.get(False) is not None
    monkeypatch.setattr(fl, "_linear", lambda *a: pytest.fail("full path ran"))
    monkeypatch.setattr(fl, "find_plan", lambda *a: pytest.fail("keyed lookup ran"))
    with torch.no_grad(), stub_launches() as count:
        ops.linear(*args, activation="relu")
    assert count.n == 1
    with torch.no_grad():
        assert_same(ops.linear(*args, activation="relu"), ref)


def test_other_signatures_miss_the_hot_slot():
    x, w, b = torch.randn(5, 16), torch.randn(12, 16), torch.randn(12)
    with torch.no_grad():
        for _ in range(3):
            ops.linear(x, w, b)
        assert fl._LINEAR.hot.get(False) is not None
        for args, kw in (((x, w), {}), ((x, w, b.double()), {}),
                         ((x, w, b), {"activation": "relu"}), ((x.t().contiguous().t(), w, b), {}),
                         ((x, w.t().contiguous().t(), b), {}),
                         ((x, w, b), {"residual": torch.randn(5, 12)}), ((x[:3], w, b), {})):
            try:
                out = ops.linear(*args, **kw)
            except (TypeError, ValueError):
                continue  # (bias of another dtype: the checks raise, as before)
            with custom_op_path():
                assert_same(out, ops.linear(*args, **kw))
        with custom_op_path():
            ref = ops.linear(x, w, b)
        assert_same(ops.linear(x, w, b), ref)  # the first signature, served right again


def test_compile_traces_linear_after_a_hot_slot():
    x, w, b = torch.randn(5, 16), torch.randn(12, 16), torch.randn(12)
    with torch.no_grad():
        for _ in range(3):
            ops.linear(x, w, b)
    seen, out, ref = compiled_targets(lambda x, w, b: ops.linear(x, w, b), (x, w, b))
    assert any("tilefuse.matmul" in s for s in seen), seen
    assert torch.equal(out, ref)


def test_nn_linear_uses_the_plans():
    lin = tilefuse.nn.Linear(16, 12)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        for _ in range(3):
            torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    assert any(p is not None for p in fl._LINEAR.plans[0].values())


def test_the_gemm_plan_helpers_are_shared():
    """matmul and linear keep separate plans, made by one OpPlans / find_plan / add_plan."""
    from tilefuse.fused import matmul as fm

    assert isinstance(fl._LINEAR, matmul_plan.OpPlans) and fl._LINEAR is not fm._MATMUL


@pytest.mark.parametrize("grad", [False, True])
def test_planned_linear_on_the_tma_path(monkeypatch, grad):
    """Under TMA_ON_CPU the fp16 product can take the TMA kernel, whose launch reads shapes:
    the linear plan then passes weight.t() (inside the autograd function with grad), and a
    misaligned x takes the classic kernel; every call equals the custom-op path."""
    from tilefuse.kernels import gemm_common as gc

    monkeypatch.setattr(gc, "TMA_ON_CPU", True)
    x, w, b = torch.randn(24, 32).half(), torch.randn(16, 32).half(), torch.randn(16).half()
    base = torch.empty(x.numel() + 1, dtype=x.dtype)
    x_odd = base[1:].view(x.shape)
    x_odd.copy_(x)
    fn = lambda x, w, b: ops.linear(x, w, b, activation="gelu")  # noqa: E731
    seen = []
    record_launches(monkeypatch, lambda kernel, args, kwargs: seen.append(kernel.fn.__name__))
    for inputs in ((x, w, b), (x_odd, w, b), (x, w, b), (x, w, b), (x_odd, w, b)):
        with custom_op_path():
            ref = _run(fn, inputs, grad)
        del seen[:]
        for got, want in zip(_run(fn, inputs, grad), ref):
            assert_same(got, want)
        assert seen[0] == ("matmul_kernel" if inputs[0] is x_odd else "gemm_tma_kernel")


CKPT_CASES = {
    "matmul": (lambda a, b, c: ops.matmul(a, b), [(4, 8), (8, 6), (6,)]),
    "matmul gelu bias": (lambda a, b, c: ops.matmul(a, b, c, activation="gelu"),
                         [(4, 8), (8, 6), (6,)]),
    "linear": (lambda x, w, b: ops.linear(x, w, b), [(4, 8), (6, 8), (6,)]),
    "linear 3d relu": (lambda x, w, b: ops.linear(x, w, b, activation="relu"),
                       [(2, 3, 8), (6, 8), (6,)]),
}


@pytest.mark.parametrize("name", sorted(CKPT_CASES))
def test_checkpoint_forward_and_recomputation_on_either_path(name):
    """``torch.utils.checkpoint`` compares the count and metadata of the tensors saved by the
    forward and by its recomputation: the first call of a signature (full path) and its plan
    (recomputation) must save alike (the linear plan saves weight.t() under the hooks)."""
    from tilefuse.fused import matmul as fm

    fn, shapes = CKPT_CASES[name]

    def clear():
        for ops_plans in (fm._MATMUL, fl._LINEAR):
            ops_plans.plans[1].clear()
            ops_plans.hot.clear()

    assert_checkpoint_matches_custom_op(fn, [torch.randn(s) for s in shapes], clear, calls=4)

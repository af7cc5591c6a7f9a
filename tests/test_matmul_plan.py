"""The per-signature plans of ``tilefuse.ops.matmul`` / ``linear`` (tilefuse.fused.matmul).

An eager call without grad or autocast looks its signature (shapes, strides, dtypes, devices,
activation, out_dtype, TILEFUSE_BACKEND, TF32) up in a plan cache; the first call of a signature
takes the full path (validation, launch parameters) and plans it, later calls allocate and launch
with every non-tensor argument bound. Checked here: the planned call equals the custom-op path
bit for bit, launches the same one kernel, never serves another signature, never skips
validation, and steps aside for the torch backend, grad, autocast and compiling.
"""
import pytest
import torch

import tilefuse
from fast_path_utils import assert_plans_match_custom_op, assert_same, record_launches
from tilefuse.bench.host import stub_launches
from tilefuse.fused import matmul as fm
from tilefuse.kernels import matmul as km
from tilefuse.fused._fast import custom_op_path

ops = tilefuse.ops


def _planned_twice(fn, *args):
    """``fn(*args)`` three times under no_grad (the 2nd and 3rd from the plan) and once on the
    custom-op path: all four bit-identical; returns the planned output."""
    with torch.no_grad():
        first, second, third = fn(*args), fn(*args), fn(*args)
        with custom_op_path():
            ref = fn(*args)
    for out in (first, second, third):
        assert_same(out, ref)
    return third


CASES = {
    "plain": (lambda a, b: ops.matmul(a, b), lambda: (torch.randn(5, 8), torch.randn(8, 6))),
    "one_row_primes": (lambda a, b: ops.matmul(a, b),
                       lambda: (torch.randn(1, 13), torch.randn(13, 7))),
    "bias_act": (lambda a, b, c: ops.matmul(a, b, c, activation="gelu"),
                 lambda: (torch.randn(5, 8), torch.randn(8, 6), torch.randn(6))),
    "residual": (lambda a, b, r: ops.matmul(a, b, activation=("leaky_relu", 0.2), residual=r),
                 lambda: (torch.randn(5, 8), torch.randn(8, 6), torch.randn(5, 6))),
    "transposed_a": (lambda a, b: ops.matmul(a.t(), b),
                     lambda: (torch.randn(8, 5), torch.randn(8, 6))),
    "linear": (lambda x, w, b: ops.linear(x, w, b, activation="relu"),
               lambda: (torch.randn(3, 16), torch.randn(10, 16), torch.randn(10))),
    "fp16": (lambda a, b: ops.matmul(a, b),
             lambda: (torch.randn(4, 16).half(), torch.randn(16, 8).half())),
    "bf16_out_fp32": (lambda a, b: ops.matmul(a, b, out_dtype=torch.float32),
                      lambda: (torch.randn(4, 16).bfloat16(), torch.randn(16, 8).bfloat16())),
    "batched_a": (lambda a, b: ops.matmul(a, b),  # 3-D a: not planned, same result
                  lambda: (torch.randn(2, 3, 8), torch.randn(8, 4))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_planned_call_equals_custom_op(name):
    fn, make = CASES[name]
    _planned_twice(fn, *make())


def test_plan_hit_launches_one_kernel_and_is_cached():
    a, b = torch.randn(6, 12), torch.randn(12, 5)
    with torch.no_grad(), stub_launches() as count:
        ops.matmul(a, b)  # plans the signature
        n = len([p for p in fm._MATMUL.plans[0].values() if p is not None])
        start = count.n
        ops.matmul(a, b)
        assert count.n - start == 1
    assert n >= 1


def test_signature_change_takes_a_new_plan():
    a, b = torch.randn(6, 12), torch.randn(12, 5)
    _planned_twice(ops.matmul, a, b)
    for a2, b2 in ((torch.randn(7, 12), b), (a, torch.randn(12, 9)),  # shapes
                   (a.double(), b.double()), (a.half(), b.half()),        # dtypes
                   (torch.randn(12, 6).t(), b),                           # strides
                   (a, torch.randn(5, 12).t())):
        _planned_twice(ops.matmul, a2, b2)


def test_validation_runs_for_every_new_signature():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    _planned_twice(ops.matmul, a, b)
    for _ in range(2):
        with pytest.raises(TypeError):
            ops.matmul(a, b.double())
        with pytest.raises(ValueError, match="inner dimensions"):
            ops.matmul(a, torch.randn(9, 3))
        with pytest.raises(ValueError, match="bias"):
            ops.matmul(a, b, bias=torch.randn(4))
        with pytest.raises((TypeError, ValueError)):
            ops.matmul(a, b, activation="nope")
        with pytest.raises(TypeError):
            ops.matmul(a, [[1.0]])
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            ops.matmul(a, torch.randn(8, 3, device="meta"))


def test_torch_backend_after_a_plan(monkeypatch):
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    _planned_twice(ops.matmul, a, b)
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    with torch.no_grad(), stub_launches() as count:
        out = ops.matmul(a, b)
    assert count.n == 0
    torch.testing.assert_close(out, a @ b)


def test_grad_and_autocast_step_aside():
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(8, 3)
    _planned_twice(ops.matmul, a.detach(), b)
    y = ops.matmul(a, b, activation="relu")  # grad: the autograd path, not the plan
    assert y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(a.grad, (a @ b > 0).float() @ b.t())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.matmul(a.detach(), b).dtype == torch.bfloat16


def test_activation_modules_are_not_planned():
    """A module is parsed on every call (its parameters may change between calls)."""
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    act = torch.nn.LeakyReLU(0.1)
    with torch.no_grad():
        for slope in (0.1, 0.1, 0.5):
            act.negative_slope = slope
            torch.testing.assert_close(ops.matmul(a, b, activation=act),
                                       torch.nn.functional.leaky_relu(a @ b, slope))


GRAD_CASES = {
    "plain": (lambda a, b: ops.matmul(a, b), lambda: (torch.randn(5, 8), torch.randn(8, 6))),
    "bias_gelu": (lambda a, b, c: ops.matmul(a, b, c, activation="gelu"),
                  lambda: (torch.randn(5, 8), torch.randn(8, 6), torch.randn(6))),
    "residual_silu": (lambda a, b, r: ops.matmul(a, b, activation="silu", residual=r),
                      lambda: (torch.randn(5, 8), torch.randn(8, 6), torch.randn(5, 6))),
    "linear_relu": (lambda x, w, b: ops.linear(x, w, b, activation="relu"),
                    lambda: (torch.randn(3, 16), torch.randn(10, 16), torch.randn(10))),
    "bf16": (lambda a, b: ops.matmul(a, b, activation=("leaky_relu", 0.2)),
             lambda: (torch.randn(4, 16).bfloat16(), torch.randn(16, 8).bfloat16())),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_planned_grad_call_equals_custom_op(name):
    """With grad: the first call plans, the next ones run _PlannedMatmul; outputs and every
    input gradient equal the custom-op path's bit for bit, also when only some inputs (or only
    the residual) require grad."""
    fn, make = GRAD_CASES[name]
    inputs = make()
    for mask in ([True] * len(inputs), [False] + [True] * (len(inputs) - 1),
                 [False] * (len(inputs) - 1) + [True]):
        assert_plans_match_custom_op(fn, inputs, mask)


def test_grad_plan_hit_skips_the_full_path(monkeypatch):
    a, b, c = (torch.randn(5, 8, requires_grad=True), torch.randn(8, 6, requires_grad=True),
               torch.randn(6, requires_grad=True))
    ops.matmul(a, b, c, activation="gelu")  # plans
    monkeypatch.setattr(fm, "_matmul", lambda *args: pytest.fail("full path ran"))
    with stub_launches() as count:
        y = ops.matmul(a, b, c, activation="gelu")
    assert count.n == 1 and y.requires_grad and y.grad_fn is not None



# ------------------------------------------------------------- the TMA path (sm_90) in plans
@pytest.fixture
def kernels_run(monkeypatch):
    """Every kernel launch (the kernel objects, in order); the launches still run."""
    seen = []
    record_launches(monkeypatch, lambda kernel, args, kwargs: seen.append(kernel))
    return seen


def _misaligned(t):
    """A copy of ``t`` with the same shape and strides whose base is not 16-byte aligned."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = base[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("grad", [False, True])
def test_tma_plan_tests_alignment_and_the_switch_per_call(monkeypatch, kernels_run, grad):
    """On an sm_90 device (here: the interpreter under TMA_ON_CPU) aligned TMA-readable operands
    take the persistent TMA kernel and misaligned ones the classic kernel, on the full path; the
    plan of such a signature makes the same choice on every call (and follows TMA_ON_CPU for
    CPU tensors), so each call equals the custom-op path bit for bit."""
    from tilefuse.kernels import gemm_common as gc
    from tilefuse.kernels.matmul_tma import gemm_tma_kernel

    monkeypatch.setattr(gc, "TMA_ON_CPU", True)
    a, w = torch.randn(24, 32).half(), torch.randn(16, 32).half()
    a_odd = _misaligned(a)

    def call(x):
        if grad:  # (fresh leaves with x's base alignment)
            xs = ((_misaligned(x) if x.data_ptr() % 16 else x.clone()).requires_grad_(),
                  w.clone().requires_grad_())
        else:
            xs = (x, w)
        with torch.set_grad_enabled(grad):
            y = ops.matmul(xs[0], xs[1].t(), activation="gelu")
            if grad:
                y.backward(torch.ones_like(y))
                return [y.detach(), xs[0].grad, xs[1].grad]
        return [y]

    def ref(x):
        with custom_op_path():
            return call(x)

    for x, kernel in ((a, gemm_tma_kernel), (a_odd, km.matmul_kernel), (a, gemm_tma_kernel),
                      (a_odd, km.matmul_kernel), (a, gemm_tma_kernel)):
        if x is a_odd:
            assert (x.data_ptr() % 16) and x.stride() == a.stride()
        del kernels_run[:]
        got = call(x)
        assert kernels_run[0] is kernel  # (the forward's launch)
        for g, r in zip(got, ref(x)):
            assert_same(g, r)
    plans = fm._MATMUL.plans[grad]
    assert any(p is not None for p in plans.values())
    monkeypatch.setattr(gc, "TMA_ON_CPU", False)  # CPU tensors: classic again, same plan
    del kernels_run[:]
    got = call(a)
    assert kernels_run[0] is km.matmul_kernel
    for g, r in zip(got, ref(a)):
        assert_same(g, r)


def test_fp32_without_tf32_binds_no_switch(monkeypatch):
    """Operands TMA cannot read (fp32 without TF32) keep the one classic launch."""
    from tilefuse.kernels import gemm_common as gc

    monkeypatch.setattr(gc, "TMA_ON_CPU", True)
    a, b = torch.randn(4, 32), torch.randn(32, 16)
    assert gc.tma_layouts(a, b) is None and gc.tma_layouts(a.half(), b.half()) == ("row", "row")
    launch = km.bind_matmul(a, b, torch.empty(4, 16))
    assert launch.__name__ == "launch" and "classic" not in launch.__code__.co_freevars

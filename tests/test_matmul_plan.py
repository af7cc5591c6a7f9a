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
from fast_path_utils import assert_same
from tilefuse.bench.host import stub_launches
from tilefuse.fused import matmul as fm
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
        n = len([p for p in fm._PLANS.values() if p is not None])
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


def test_unhashable_activation_is_not_planned():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    act = torch.nn.ReLU()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(ops.matmul(a, b, activation=act), torch.relu(a @ b))


def test_linear_weight_is_read_through_strides_by_the_plan():
    x, w = torch.randn(3, 16), torch.randn(10, 16)
    with torch.no_grad():
        y1 = ops.linear(x, w)
        w.mul_(2)  # same signature, new values: the plan reads the tensor, not a copy
        y2 = ops.linear(x, w)
    torch.testing.assert_close(y2, 2 * y1)

"""Per-signature plans of the int8 / fp8 / dequantize ops (tilefuse.fused.quant_plans): a repeated
eager call with the shapes, strides, dtypes and scalar arguments of an earlier one skips the
checks and the op and launches the kernels bound at the first call.

* the plan path (second call, with every check and op of the per-call path made to fail) equals
  the custom-op path bit for bit, for raw / scaled / per-tensor / 3-D / 1-D / split-K / empty
  signatures of every op;
* a change of shape, strides, dtypes or scalar arguments is a new signature (no stale plan);
  a normalisation that copies is never planned;
* bad input raises on every call, also once the valid signature has a plan;
* ``TILEFUSE_BACKEND=torch``, the TMA switch and the operands' alignment are honoured after a
  plan exists; a gradient takes the autograd path.
"""
import contextlib

import pytest
import torch

import tilefuse
from fast_path_utils import assert_fast_equals_custom_op, assert_same, record_launches
from tilefuse.fused import dequant as fdq
from tilefuse.fused import fp8 as ff
from tilefuse.fused import int8 as fi
from tilefuse.fused._fast import custom_op_path
from tilefuse.kernels import gemm_common as gc
from tilefuse.kernels import int8_matmul as ki
from tilefuse.kernels import matmul_tma, quant

ops = tilefuse.ops
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def f8(*shape, dtype=E4):
    return (torch.randn(*shape) * 4).to(dtype)


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch (the kernel objects, in order); the launches still run."""
    seen = []
    record_launches(monkeypatch, lambda kernel, args, kwargs: seen.append(kernel))
    return seen


@contextlib.contextmanager
def no_per_call_path(monkeypatch):
    """Inside: every check and op of the per-call path raises (only a plan can answer)."""
    def boom(*args, **kwargs):
        raise AssertionError("the per-call path ran")

    with monkeypatch.context() as m:
        for name in ("check_tensor", "int8_matmul_op", "quantize_per_row", "_check_dequantize"):
            m.setattr(fi, name, boom)
        for name in ("_fp8_tensor", "float_tensor", "fp8_matmul_op", "quantize_fp8_per_row",
                     "_check_dequantize"):
            m.setattr(ff, name, boom)
        m.setattr(fdq, "dequantize", boom)
        yield


def assert_plan(monkeypatch, fn, *args, plans=None):
    """First call (builds the plan), second call (the plan alone) and the custom-op path agree
    bit for bit; ``plans``: the op's plan dict, which must have grown by one."""
    n = None if plans is None else len(plans)
    first = fn(*args)
    if plans is not None:
        assert len(plans) == n + 1
    with no_per_call_path(monkeypatch):
        second = fn(*args)
    with custom_op_path():
        slow = fn(*args)
    assert_same(first, slow)
    assert_same(second, slow)
    return slow


# ------------------------------------------------------------------------------ plan == op
def _int8_cases():
    a, b, q = i8(5, 32), i8(32, 7), i8(7, 32)
    sa, sb, bias, res = torch.rand(5), torch.rand(7), torch.randn(7), torch.randn(7)
    s1, s0 = torch.rand(1), torch.tensor(0.3)
    a3, s3, r3 = i8(2, 3, 32), torch.rand(2, 3, 1), torch.randn(2, 3, 7)
    ak, bk, sk = i8(4, 256), i8(16, 256).t(), torch.rand(4, 1)  # split-K in the interpreter
    return {
        "raw": lambda: ops.int8_matmul(a, b),
        "k-major raw": lambda: ops.int8_matmul(a, q.t()),
        "scaled": lambda: ops.int8_matmul(a, q.t(), sa, s0, bias, "gelu", res, torch.bfloat16),
        "per-tensor": lambda: ops.int8_matmul(a, b, s1, sb.view(7, 1), None, ("leaky_relu", 0.1),
                                              None, torch.float16),
        "3-D": lambda: ops.int8_matmul(a3, b, s3, sb, residual=r3),
        "1-D": lambda: ops.int8_matmul(a[0], b),
        "split-K": lambda: ops.int8_matmul(ak, bk, sk, s0),
        "split-K 3-D raw": lambda: ops.int8_matmul(ak.view(2, 2, 256), bk),
        "M=0": lambda: ops.int8_matmul(a[:0], b, out_dtype=torch.float32),
    }


@pytest.mark.parametrize("case", list(_int8_cases()))
def test_int8_matmul_plan_equals_op(monkeypatch, case):
    assert_plan(monkeypatch, _int8_cases()[case], plans=fi._PLANS)


def _linear_cases():
    x, q, s, bias = torch.randn(5, 32), i8(7, 32), torch.rand(7) * 0.01, torch.randn(7)
    x3, b16 = torch.randn(2, 3, 32, dtype=torch.bfloat16), bias.bfloat16()
    r16, r3 = torch.randn(7, dtype=torch.bfloat16), torch.randn(2, 3, 7, dtype=torch.bfloat16)
    xk, qk, sk = torch.randn(4, 256), i8(16, 256), torch.rand(16)
    xs = torch.randn(64, 5).t()[:, :32]
    w, w5, sw, s0, s1 = f8(7, 32), f8(7, 32, dtype=E5), torch.rand(7), torch.tensor(0.01), \
        torch.tensor(0.25)
    fa, fa3, fb5, fs3, fr = f8(5, 32), f8(2, 3, 32), f8(32, 7, dtype=E5), torch.rand(2, 3, 1), \
        torch.randn(2, 3, 7)
    q12, s12, q0, sq0, f39 = i8(5, 12), torch.rand(5, 1), i8(), torch.rand(()), f8(3, 4, 9)
    return {
        "weight-only": (fi._WO_PLANS, lambda: ops.weight_only_int8_linear(x, q, s, bias,
                                                                          "relu")),
        "weight-only 3-D bf16": (fi._WO_PLANS, lambda: ops.weight_only_int8_linear(
            x3, q, s, b16, residual=r16)),
        "weight-only split-K": (fi._WO_PLANS, lambda: ops.weight_only_int8_linear(xk, qk, s0)),
        "w8a8": (fi._W8A8_PLANS, lambda: ops.w8a8_linear(x, q, s, bias)),
        "w8a8 3-D bf16 residual": (fi._W8A8_PLANS, lambda: ops.w8a8_linear(
            x3, q, s, activation="silu", residual=r3)),
        "w8a8 M=1": (fi._W8A8_PLANS, lambda: ops.w8a8_linear(x[:1], q, s)),
        "w8a8 split-K": (fi._W8A8_PLANS, lambda: ops.w8a8_linear(xk, qk, sk)),
        "w8a8 strided x": (fi._W8A8_PLANS, lambda: ops.w8a8_linear(xs, q, s)),
        "fp8_matmul": (ff._PLANS, lambda: ops.fp8_matmul(fa, w.t(), s1, s0)),
        "fp8_matmul epilogue": (ff._PLANS, lambda: ops.fp8_matmul(
            fa3, fb5, fs3, sw, bias, "gelu", fr, torch.float32, True)),
        "fp8_linear": (ff._LINEAR_PLANS, lambda: ops.fp8_linear(x, w, sw)),
        "fp8_linear 3-D e5m2": (ff._LINEAR_PLANS, lambda: ops.fp8_linear(
            x3, w5, sw, b16, "relu6", fast_accum=True)),
        "dequantize int8": (fi._DQ_PLANS, lambda: ops.dequantize_per_row(q12, s12,
                                                                         torch.bfloat16)),
        "dequantize int8 0-D": (fi._DQ_PLANS, lambda: ops.dequantize_per_row(q0, sq0)),
        "dequantize fp8 per-tensor": (ff._DQ_PLANS, lambda: ops.dequantize_fp8(
            f39, sq0, torch.float16)),
    }


@pytest.mark.parametrize("case", list(_linear_cases()))
def test_other_ops_plan_equals_op(monkeypatch, case):
    plans, fn = _linear_cases()[case]
    assert_plan(monkeypatch, fn, plans=plans)


def test_split_k_plan_launches_the_reduction(launches):
    a, b = i8(4, 256), i8(256, 16)
    for _ in range(2):
        ops.int8_matmul(a, b, torch.rand(4), torch.rand(16))
    assert launches == [ki.int8_matmul_kernel, gc.splitk_reduce_kernel] * 2


def test_linear_plan_is_two_launches(launches):
    x, q = torch.randn(5, 32), i8(7, 32)
    ops.w8a8_linear(x, q, torch.rand(7))
    del launches[:]
    ops.w8a8_linear(x, q, torch.rand(7))
    assert launches == [quant.quantize_rows_kernel, ki.int8_matmul_kernel]


# ------------------------------------------------------------------------------ stale plans
def test_new_signatures_are_new_plans(monkeypatch):
    a, b, s, s16 = i8(5, 32), i8(32, 7), torch.rand(5), torch.rand(5, dtype=torch.float16)
    ops.int8_matmul(a, b)
    n = len(fi._PLANS)
    variants = [lambda: ops.int8_matmul(a[:3], b),                        # shape
                lambda: ops.int8_matmul(a, b.t().contiguous().t()),       # strides
                lambda: ops.int8_matmul(a, b, out_dtype=torch.float32),   # scalar argument
                lambda: ops.int8_matmul(a, b, s),                         # an added tensor
                lambda: ops.int8_matmul(a, b, s16),                       # dtype
                lambda: ops.int8_matmul(a, b, activation="relu")]
    for i, fn in enumerate(variants):
        assert_plan(monkeypatch, fn)
        assert len(fi._PLANS) == n + i + 1


def test_a_copying_normalisation_is_not_planned():
    x = torch.randn(3, 32, 2).transpose(1, 2)  # (3, 2, 32): reshape to (6, 32) copies
    q, s = i8(7, 32), torch.rand(7)
    for _ in range(2):
        out = ops.w8a8_linear(x, q, s)
        with custom_op_path():
            assert_same(out, ops.w8a8_linear(x, q, s))
    assert not fi._W8A8_PLANS  # (the inner int8_matmul of the contiguous qx has one)
    fi._PLANS.clear()
    a, b = i8(3, 32, 2).transpose(1, 2), i8(32, 7)
    ops.int8_matmul(a, b)
    r = torch.randn(2, 7)  # broadcast over the leading dim of (3, 2, 7): a copy
    for _ in range(2):
        out = ops.int8_matmul(a.contiguous(), b, residual=r)
        with custom_op_path():
            assert_same(out, ops.int8_matmul(a.contiguous(), b, residual=r))
    assert not fi._PLANS


def test_activation_modules_are_not_planned():
    a, b = i8(5, 32), i8(32, 7)
    ops.int8_matmul(a, b, torch.rand(5), activation=torch.nn.ReLU())
    assert not fi._PLANS


# ------------------------------------------------------------------------------ bad input
def test_bad_input_raises_on_every_call():
    a, b, q, x = i8(5, 32), i8(32, 7), i8(7, 32), torch.randn(5, 32)
    w, s1 = f8(7, 32), torch.tensor(1.0)
    ops.int8_matmul(a, b)
    ops.int8_matmul(a, b, torch.rand(5), bias=torch.randn(7))
    ops.w8a8_linear(x, q, torch.rand(7))
    ops.weight_only_int8_linear(x, q, torch.rand(7))
    ops.fp8_matmul(f8(5, 32), w.t(), s1, s1, fast_accum=True)
    ops.fp8_linear(x, w, torch.rand(7), fast_accum=True)
    bad = [(lambda: ops.int8_matmul(a.float(), b), TypeError),
           (lambda: ops.int8_matmul(a, i8(31, 7)), ValueError),
           (lambda: ops.int8_matmul(a, b, torch.rand(5), out_dtype=torch.int32), ValueError),
           (lambda: ops.int8_matmul(a, b, out_dtype=torch.float64), TypeError),
           (lambda: ops.int8_matmul(a, b, torch.rand(5), bias=torch.randn(6)), ValueError),
           (lambda: ops.int8_matmul(a, b, torch.rand(5), activation="nope"), ValueError),
           (lambda: ops.int8_matmul(a, b, torch.rand(5), activation=["relu"]), Exception),
           (lambda: ops.int8_matmul(a, b, torch.rand(4)), ValueError),
           (lambda: ops.w8a8_linear(x[:, :31], q, torch.rand(7)), ValueError),
           (lambda: ops.weight_only_int8_linear(x, q, None), TypeError),
           (lambda: ops.fp8_matmul(f8(5, 32), w.t(), s1, s1, fast_accum=1), TypeError),
           (lambda: ops.fp8_linear(x, w, torch.rand(7), fast_accum=1), TypeError),
           (lambda: ops.fp8_matmul(f8(5, 32), w.t(), s1.requires_grad_(), s1), RuntimeError),
           (lambda: ops.fp8_linear(x.double(), w, torch.rand(7)), TypeError)]
    for fn, exc in bad:
        for _ in range(2):
            with pytest.raises(exc):
                fn()
    s1.requires_grad_(False)


# ------------------------------------------------------------------------------ switches
def test_torch_backend_after_a_plan(monkeypatch, launches):
    a, b, x, q = i8(5, 32), i8(32, 7), torch.randn(5, 32), i8(7, 32)
    s, w, s5, s51 = torch.rand(7), f8(7, 32), torch.rand(5), torch.rand(5, 1)
    calls = [lambda: ops.int8_matmul(a, b, s5),
             lambda: ops.w8a8_linear(x, q, s),
             lambda: ops.fp8_linear(x, w, s),
             lambda: ops.dequantize_per_row(a, s51)]
    for fn in calls:
        fn()
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    del launches[:]
    for fn in calls:
        out = fn()
        with custom_op_path():
            assert_same(out, fn())
    assert launches == []


def test_tma_switch_and_alignment_after_a_plan(monkeypatch, launches):
    M, N, K = 21, 48, 96
    a, q = i8(M, K), i8(N, K)
    sa, sb = torch.rand(M), torch.rand(N)

    def gemm(a):
        return ops.int8_matmul(a, q.t(), sa, sb, out_dtype=torch.bfloat16)

    classic = gemm(a)  # plan: classic kernel (TMA off)
    monkeypatch.setattr(gc, "TMA_ON_CPU", True)
    del launches[:]
    tma = assert_plan(monkeypatch, gemm, a)  # the path changed: a new plan, on TMA
    assert matmul_tma.gemm_tma_kernel in launches and ki.int8_matmul_kernel not in launches
    assert torch.equal(tma, classic)
    # a misaligned operand with the same shapes/strides: the classic kernel again
    base = i8(M * K + 1)
    a_odd = base[1:].view(M, K)
    a_odd.copy_(a)
    del launches[:]
    odd = gemm(a_odd)
    assert launches == [ki.int8_matmul_kernel]
    with custom_op_path():
        assert_same(odd, gemm(a_odd))
    monkeypatch.setattr(gc, "TMA_ON_CPU", False)
    del launches[:]
    assert_same(gemm(a), classic)
    assert launches == [ki.int8_matmul_kernel]


def test_gradients_take_the_autograd_path():
    x, q, s, bias = torch.randn(5, 32), i8(7, 32), torch.rand(7) * 0.01, torch.randn(7)

    def fn(x, bias):
        return ops.weight_only_int8_linear(x, q, s, bias, "relu")

    with torch.no_grad():
        fn(x, bias)  # a plan exists
    fast, _ = assert_fast_equals_custom_op(fn, [x, bias], grad=True)
    assert fast[0].shape == (5, 7)
    y = fn(x.requires_grad_(), bias)
    assert y.requires_grad

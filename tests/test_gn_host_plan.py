"""Per-signature plans of ``group_norm_act`` (issue 15, host cost) and its one-launch forward of
small groups.

A plan serves a call whose arguments have the shapes, strides, dtypes, devices and scalar values
of an earlier valid one: it allocates the output and launches through the launch bound for that
signature (the same code as the per-call path), so outputs and gradients are the bits of the
custom-op path; it is skipped when tracing, under autocast and under functorch transforms.
"""
import os

import pytest
import torch
import torch.nn.functional as F
import triton

import tilefuse
import tilefuse.fused.norm_group as fgn
import tilefuse.kernels.norm_group as kg
from fast_path_utils import (assert_grads_equal_custom_op, assert_raises_after_plan,  # noqa: I100
                             assert_same, compiled_targets, launches, run)
from tilefuse.bench.traffic import count_traffic, nbytes
from tilefuse.fused._fast import custom_op_path

ops = tilefuse.ops
# tilefuse.bench.traffic hooks the triton 3.9 interpreter's loads (not 3.6's)
traffic_lane = pytest.mark.skipif(not triton.__version__.startswith("3.9"),
                                  reason="count_traffic: triton 3.9 interpreter")



@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that took the validating per-call path (a plan miss)."""
    calls = []
    real = fgn._group_norm

    def counted(*args):
        calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(fgn, "_group_norm", counted)
    return calls


def _f(*shape, dtype=torch.float32, cl=False, shift=0.0):
    t = (torch.randn(*shape) * 2 + shift).to(dtype)
    return t.to(memory_format=torch.channels_last) if cl else t


def _gn(G, act="relu", eps=1e-5, params=True):
    if params == "x_only":  # (only x requires grad)
        return lambda x, w, b: ops.group_norm_act(x, G, w.detach(), b.detach(), eps, act)
    if not params:
        return lambda x: ops.group_norm_act(x, G, activation=act, eps=eps)
    return lambda x, w, b: ops.group_norm_act(x, G, w, b, eps, activation=act)


def _sliced():
    return torch.randn(2, 12, 4, 4)[:, ::2] + 1  # channel stride 32: an (N, C, S) view


CASES = {  # name: (fn, inputs)
    "nchw_small": (_gn(4), lambda: [_f(2, 8, 4, 4, shift=3), _f(8), _f(8)]),
    "cl_small": (_gn(2, "silu"), lambda: [_f(2, 6, 3, 5, cl=True), _f(6), _f(6)]),
    "nchw_split": (_gn(1, "gelu"), lambda: [_f(1, 64, 80, shift=20), _f(64), _f(64)]),
    "cl_three_launch": (_gn(2, "tanh"), lambda: [_f(2, 64, 12, 12, cl=True), _f(64), _f(64)]),
    "instance": (_gn(6, None), lambda: [_f(2, 6, 7), _f(6), _f(6)]),
    "2d": (_gn(2, ("leaky_relu", 0.2)), lambda: [_f(5, 4), _f(4), _f(4)]),
    "2d_transposed": (_gn(2, "gelu_tanh"), lambda: [_f(4, 5).t(), _f(4), _f(4)]),
    "no_affine": (_gn(2, "silu", params=False), lambda: [_f(3, 4, 2, 2)]),
    "x_only_grad": (_gn(2, "relu6", params="x_only"), lambda: [_f(2, 4, 3, 3), _f(4), _f(4)]),
    "bf16": (_gn(2, "silu"), lambda: [_f(2, 4, 3, 3, dtype=torch.bfloat16), _f(4), _f(4)]),
    "sliced_view": (_gn(3, "sigmoid"), lambda: [_sliced(), _f(6), _f(6)]),
    "copied_input": (_gn(2, "relu"), lambda: [_f(2, 4, 6, 6)[:, :, ::2, 1::2], _f(4), _f(4)]),
    "nc11_cl": (_gn(4, "relu"), lambda: [_f(3, 8, 1, 1, cl=True), _f(8), _f(8)]),
    "fp64": (_gn(2, "relu"), lambda: [_f(2, 4, 3, dtype=torch.float64),
                                      _f(4, dtype=torch.float64), _f(4, dtype=torch.float64)]),
}


@pytest.mark.filterwarnings("ignore:overflow encountered")  # masked lanes, interpreter
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_equals_custom_op_bit_for_bit(name, grad, spy):
    fn, make = CASES[name]
    inputs = make()
    with custom_op_path():
        slow = run(fn, inputs, grad)
    first = run(fn, inputs, grad)      # a miss: the per-call path, then the plan is built
    misses = len(spy)
    second = run(fn, inputs, grad)     # the plan
    third = run(fn, inputs, grad)
    if name not in ("copied_input", "fp64"):
        assert len(spy) == misses, "the repeated calls were not served by a plan"
    for fast in (first, second, third):
        assert len(fast[0]) == len(slow[0]) and len(fast[1]) == len(slow[1])
        for a, b in zip(fast[0] + fast[1], slow[0] + slow[1]):
            assert_same(a, b)


@pytest.mark.parametrize("cl", [False, True])
def test_plan_gradient_of_a_strided_upstream_gradient(cl):
    """``y.sum()``'s gradient reaches the op expanded (stride 0): reshaped as the view nodes of
    the per-call path reshape it, the same bits."""
    assert_grads_equal_custom_op(
        lambda x, w, b: (ops.group_norm_act(x, 4, w, b, activation="silu") * 1.0).sum(),
        (_f(2, 8, 4, 4, cl=cl, shift=2), _f(8), _f(8)))


def _ref(x, G, w=None, b=None, act=F.relu):
    w, b = (None if t is None else t.float() for t in (w, b))
    return act(F.group_norm(x.float(), G, w, b)).to(x.dtype)


def test_no_stale_plan_after_shape_dtype_or_strides_change(spy):
    x = _f(2, 8, 4, 4, shift=1)
    w, b = _f(8), _f(8)
    variants = [x, x.to(memory_format=torch.channels_last), x.to(torch.bfloat16),
                _f(2, 8, 4, 5), _f(3, 8, 4, 4), _f(2, 8, 16), x[:, :, :, :3], x]
    misses = []
    for _ in range(2):
        for v in variants:
            n = len(spy)
            y = ops.group_norm_act(v, 4, w.to(v.dtype), b.to(v.dtype), activation="relu")
            misses.append(len(spy) - n)
            with custom_op_path():
                want = ops.group_norm_act(v, 4, w.to(v.dtype), b.to(v.dtype), activation="relu")
            assert_same(y, want)
            tol = 2e-2 if v.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(y, _ref(v, 4, w.to(v.dtype), b.to(v.dtype)), atol=tol,
                                       rtol=tol)
    # one miss per new signature; x[:, :, :, :3] is copied to an (N, C, S) tensor: its plan
    # is the per-call path
    assert misses == [1] * 7 + [0] + [0] * 6 + [1, 0]
    for scalars in ((2, 1e-5, "relu"), (4, 1e-3, "relu"), (4, 1e-5, "silu"), (4, 0, None)):
        G, eps, act = scalars
        for _ in range(2):
            y = ops.group_norm_act(x, G, w, b, eps, activation=act)
            with custom_op_path():
                assert_same(y, ops.group_norm_act(x, G, w, b, eps, activation=act))
    # weight/bias present or not, other parameter strides
    w2 = torch.randn(16)[::2]
    for wb in ((w, None), (None, b), (None, None), (w2, b), (w, b)):
        for _ in range(2):
            y = ops.group_norm_act(x, 4, *wb, activation="relu")
            with custom_op_path():
                assert_same(y, ops.group_norm_act(x, 4, *wb, activation="relu"))


@pytest.mark.parametrize("bad,err,match", [
    (dict(num_groups=4), ValueError, "num_groups"),
    (dict(num_groups=2.0), TypeError, "num_groups"),
    (dict(num_groups=True), TypeError, "num_groups"),   # == 1 for a dict key
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps=True), ValueError, "eps"),                # == 1.0 for a dict key
    (dict(weight=torch.randn(5)), ValueError, "weight"),
    (dict(bias=torch.arange(6)), TypeError, "bias"),
    (dict(activation="nope"), ValueError, "nope|activation"),
    (dict(x=torch.randn(6)), ValueError, "x"),
    (dict(x=[1.0, 2.0]), TypeError, "x"),
])
def test_bad_input_raises_on_every_call(bad, err, match):
    """A valid plan for neighbouring arguments exists first (num_groups=1, eps=1.0): a bad
    argument equal to a valid one as a dict key (True == 1) still raises, on every call."""
    good = dict(x=torch.randn(2, 6, 4), num_groups=1, weight=None, bias=None, eps=1.0,
                activation="relu")
    assert_raises_after_plan(ops.group_norm_act, good, bad, err, match)


def test_parameter_on_another_device_raises_after_a_plan():
    """A weight on the meta device (get_device() -1, as on the CPU) is not served by the CPU
    weight's plan: the device check still raises, on every call."""
    x, w = torch.randn(2, 6, 4), torch.randn(6)
    for _ in range(2):
        ops.group_norm_act(x, 3, w)
    for _ in range(2):
        with pytest.raises(ValueError, match="device"):
            ops.group_norm_act(x, 3, torch.randn(6, device="meta"))


def test_backend_change_after_a_plan_goes_to_torch(monkeypatch, spy):
    x, w, b = _f(2, 8, 4, 4), _f(8), _f(8)
    for _ in range(2):
        ops.group_norm_act(x, 4, w, b, activation="relu")
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    for _ in range(2):
        with launches() as t:
            y = ops.group_norm_act(x, 4, w, b, activation="relu")
        assert t.n == 0, "a plan of the triton backend served the torch backend"
        torch.testing.assert_close(y, _ref(x, 4, w, b), atol=1e-5, rtol=1e-5)
    monkeypatch.delenv("TILEFUSE_BACKEND")
    with launches() as t:
        ops.group_norm_act(x, 4, w, b, activation="relu")
    assert t.n == 1
    assert os.environ.get("TILEFUSE_BACKEND") is None


def test_plans_skipped_under_autocast_compile_and_module_activations(spy):
    x, w = _f(3, 4, 2, 2), _f(4)
    fn = _gn(2, "silu", params=False)
    for _ in range(2):
        fn(x)
    n = len(spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x)
    assert len(spy) == n + 1 and y.dtype == x.dtype   # (CPU autocast: no cast, as torch)
    assert_same(y, fn(x))
    seen, out, ref = compiled_targets(lambda x: ops.group_norm_act(x, 2, w, None,
                                                                   activation="silu"), [x])
    assert torch.equal(out, ref) and any("tilefuse.group_norm_act_fwd" in s for s in seen)
    act = torch.nn.LeakyReLU(0.1)
    for slope in (0.1, 0.3):  # a module is parsed on every call: its parameters may change
        act.negative_slope = slope
        n = len(spy)
        y = ops.group_norm_act(x, 2, activation=act)
        assert len(spy) == n + 1
        torch.testing.assert_close(y, F.leaky_relu(F.group_norm(x, 2), slope), atol=1e-5,
                                   rtol=1e-5)


@traffic_lane
@pytest.mark.parametrize("cl", [False, True])
def test_small_groups_one_launch_and_one_read(cl):
    """A group that fits one tile: one launch forward (with or without grad, the statistics
    stored when a gradient will be taken), x read once."""
    torch.manual_seed(0)
    x = _f(2, 64, 32, 32, dtype=torch.bfloat16, cl=cl)   # 32 groups of 2 x 1024: one tile
    assert kg.small_group(2, 1024)
    w, b = _f(64, dtype=torch.bfloat16), _f(64, dtype=torch.bfloat16)
    for grad in (False, True, True):  # (the last call: the plan)
        xx = x.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad), count_traffic() as t:
            y = ops.group_norm_act(xx, 32, w, b, activation="silu")
        assert t.launches == 1, (t.kernels, t.torch_ops)
        minimal = nbytes(x, w, b, y) + (2 * 2 * 32 * 4 if grad else 0)  # (+ mean/rstd)
        assert t.distinct_bytes <= 1.05 * minimal and t.issued_bytes <= 1.1 * minimal
        torch.testing.assert_close(y.float(), _ref(x.float(), 32, w.float(), b.float(),
                                                   F.silu), atol=0.05, rtol=0.02)
        assert y.is_contiguous(memory_format=torch.channels_last if cl else
                               torch.contiguous_format)
    _, mean, rstd = fgn._group_norm(x.float(), 32, None, None, 1e-5, None)
    h = x.double().reshape(2, 32, -1)
    torch.testing.assert_close(mean, h.mean(-1).float().reshape(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(h.var(-1, unbiased=False) + 1e-5).float()
                               .reshape(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape,G,cl,fwd_launches", [
    ((1, 64, 80), 1, False, 2),          # 64 x 128 > SMALL_TILE: statistics + apply
    ((2, 64, 12, 12), 2, True, 3),       # channels_last, 32 x 256: statistics, merge, apply
    ((2, 16, 16, 16), 4, False, 1),      # 4 x 256
    ((2, 16, 16, 16), 4, True, 1),
])
def test_forward_launches_by_group_size(shape, G, cl, fwd_launches):
    x = _f(*shape, cl=cl, shift=5.0)
    for grad in (False, True):
        for _ in range(2):  # per-call path, then the plan
            xx = x.detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad), launches() as t:
                y = ops.group_norm_act(xx, G, activation="gelu")
            assert t.n == fwd_launches
            torch.testing.assert_close(y, _ref(x, G, act=F.gelu), atol=1e-4, rtol=1e-4)


def test_small_group_accuracy_large_mean(monkeypatch):
    """One-tile statistics are shifted by the group's first value, two passes: with a mean of
    1e4 and unit spread, as accurate as the split statistics (and torch's fp32)."""
    torch.manual_seed(0)
    x = (torch.randn(3, 6, 5, 7) + 1e4).float()
    assert kg.small_group(2, 35)
    ref = F.group_norm(x.double(), 3)
    err = (ops.group_norm_act(x, 3).double() - ref).abs().max()
    monkeypatch.setattr(kg, "SMALL_TILE", 0)
    tilefuse.kernels.clear_launch_caches()
    err_split = (ops.group_norm_act(x, 3).double() - ref).abs().max()
    assert err <= 1.25 * err_split + 1e-6
    assert err <= (F.group_norm(x, 3).double() - ref).abs().max()

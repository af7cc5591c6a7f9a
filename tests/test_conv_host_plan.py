"""Per-signature plans of ``tilefuse.ops.conv2d`` (issue 15, host cost; tilefuse.fused.conv_plan).

A plan serves an eager call whose arguments have the shapes, strides, dtypes, devices, scalar
values and types of an earlier valid one: it allocates the output and launches through the
launch bound for that signature (the launcher the full path runs), and with a gradient it is an
``autograd.Function`` whose backward is the op's own, so outputs and gradients are the bits of
the custom-op path. It never serves another signature, never skips validation, and steps aside
for the torch backend, autocast, compiling, functorch transforms and activation modules.
"""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
import tilefuse.fused.conv as fc
from fast_path_utils import (assert_grads_equal_custom_op, assert_raises_after_plan,  # noqa: I100
                             assert_same, compiled_targets, launches, run)
from tilefuse.fused._fast import custom_op_path

ops = tilefuse.ops
CL = torch.channels_last


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that took the validating full path (a plan miss)."""
    calls = []
    real = fc._conv2d

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(fc, "_conv2d", counted)
    return calls


def _f(*shape, dtype=torch.float32, cl=False):
    t = torch.randn(*shape).to(dtype)
    return t.to(memory_format=CL) if cl else t


def _conv(**kw):
    def fn(x, w, b=None, r=None):
        return ops.conv2d(x, w, b, residual=r, **kw)
    return fn


def _x_only(**kw):  # (only x requires grad)
    return lambda x, w, b: ops.conv2d(x, w.detach(), b.detach(), **kw)


def _res_only(**kw):  # (only the residual requires grad)
    return lambda x, w, r: ops.conv2d(x.detach(), w.detach(), residual=r, **kw)


CASES = {  # name: (fn, inputs, planned)
    "host_case": (_conv(padding=1, activation="relu"),
                  lambda: [_f(1, 8, 8, 8), _f(8, 8, 3, 3), _f(8)], True),
    "cl_silu": (_conv(padding=1, activation="silu"),
                lambda: [_f(2, 4, 5, 6, cl=True), _f(6, 4, 3, 3), _f(6)], True),
    "cl_weight_only": (_conv(padding=(1, 0), activation="gelu"),
                       lambda: [_f(1, 4, 5, 5), _f(3, 4, 3, 3, cl=True), _f(3)], True),
    "no_bias": (_conv(activation=("leaky_relu", 0.2)),
                lambda: [_f(2, 3, 5, 4), _f(4, 3, 2, 2)], True),
    "no_act": (_conv(padding=1), lambda: [_f(1, 3, 4, 4), _f(2, 3, 3, 3), _f(2)], True),
    "residual_post": (_conv(padding=1, post_activation="relu"),
                      lambda: [_f(2, 4, 4, 4), _f(4, 4, 3, 3), _f(4), _f(2, 4, 4, 4)], True),
    "residual_both": (_conv(padding=1, activation="silu", post_activation="tanh"),
                      lambda: [_f(1, 4, 4, 5, cl=True), _f(4, 4, 3, 3), _f(4),
                               _f(1, 4, 4, 5, cl=True)], True),
    "residual_act": (_conv(padding=1, activation="relu6"),
                     lambda: [_f(1, 3, 4, 4), _f(5, 3, 3, 3), _f(5), _f(1, 5, 4, 4)], True),
    "stride2_dilation": (_conv(stride=2, padding=2, dilation=(2, 1), activation="sigmoid"),
                         lambda: [_f(2, 3, 9, 7), _f(4, 3, 3, 3), _f(4)], True),
    "groups": (_conv(stride=(2, 1), padding=1, groups=2, activation="silu"),
               lambda: [_f(2, 4, 6, 5, cl=True), _f(6, 2, 3, 3), _f(6), _f(2, 6, 3, 5)], True),
    "pad_same_list": (_conv(padding="same", stride=[1, 1], activation="gelu_tanh"),
                      lambda: [_f(1, 3, 5, 5), _f(4, 3, 2, 3), _f(4)], True),
    "pad_4tuple": (_conv(padding=(1, 0, 2, 1), activation="relu"),
                   lambda: [_f(1, 3, 4, 5), _f(2, 3, 3, 3), _f(2)], True),
    "fp16": (_conv(padding=1, activation="relu"),
             lambda: [_f(1, 4, 4, 4, dtype=torch.float16), _f(4, 4, 3, 3, dtype=torch.float16),
                      _f(4, dtype=torch.float16)], True),
    "bf16_cl": (_conv(padding=1, activation="silu", post_activation="relu"),
                lambda: [_f(1, 4, 4, 4, dtype=torch.bfloat16, cl=True),
                         _f(4, 4, 3, 3, dtype=torch.bfloat16), _f(4, dtype=torch.bfloat16),
                         _f(1, 4, 4, 4, dtype=torch.bfloat16)], True),
    "fp64": (_conv(padding=1, activation="relu"),
             lambda: [_f(1, 2, 4, 4, dtype=torch.float64), _f(3, 2, 3, 3, dtype=torch.float64),
                      _f(3, dtype=torch.float64)], True),
    "x_only_grad": (_x_only(padding=1, activation="relu"),
                    lambda: [_f(1, 3, 4, 4), _f(3, 3, 3, 3), _f(3)], True),
    "residual_only_grad": (_res_only(padding=1, post_activation="silu"),
                           lambda: [_f(1, 3, 4, 4), _f(3, 3, 3, 3), _f(1, 3, 4, 4)], True),
    "sliced_input": (_conv(padding=1, activation="relu"),
                     lambda: [_f(2, 6, 5, 8)[:, ::2, :, 1::2], _f(3, 3, 3, 3), _f(3)], True),
    "empty_batch": (_conv(padding=1, activation="relu"),
                    lambda: [_f(0, 3, 4, 4), _f(2, 3, 3, 3), _f(2)], True),
    # not planned: the full path on every call, the same bits
    "unbatched": (_conv(padding=1, activation="relu"),
                  lambda: [_f(3, 4, 4), _f(2, 3, 3, 3), _f(2)], False),
    "broadcast_residual": (_conv(padding=1, activation="relu"),
                           lambda: [_f(2, 3, 4, 4), _f(2, 3, 3, 3), _f(2), _f(2, 1, 1)], False),
}


@pytest.mark.filterwarnings("ignore:overflow encountered")  # masked lanes, interpreter
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_equals_custom_op_bit_for_bit(name, grad, spy):
    fn, make, planned = CASES[name]
    inputs = make()
    with custom_op_path():
        slow = run(fn, inputs, grad)
    n = len(spy)
    first = run(fn, inputs, grad)      # a miss: the full path, then the plan is built
    assert len(spy) == n + 1
    second = run(fn, inputs, grad)     # the plan
    third = run(fn, inputs, grad)
    assert len(spy) == (n + 1 if planned else n + 3)
    for fast in (first, second, third):
        assert len(fast[0]) == len(slow[0]) and len(fast[1]) == len(slow[1])
        for a, b in zip(fast[0] + fast[1], slow[0] + slow[1]):
            assert_same(a, b)


def test_plan_launches_one_kernel_and_reads_the_tensors():
    x, w, b = _f(1, 4, 5, 5), _f(4, 4, 3, 3), _f(4)
    for grad in (False, True):
        for _ in range(3):
            xx = x.detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad), launches() as t:
                y = ops.conv2d(xx, w, b, padding=1, activation="relu")
            assert t.n == 1 and y.requires_grad == grad
    with torch.no_grad():
        y1 = ops.conv2d(x, w, padding=1)
        w.mul_(2)  # same signature, new values: the plan reads the tensors, not copies
        y2 = ops.conv2d(x, w, padding=1)
    torch.testing.assert_close(y2, 2 * y1)


@pytest.mark.parametrize("cl", [False, True])
def test_plan_gradient_of_a_strided_upstream_gradient(cl):
    """``y.sum()``'s gradient reaches the op expanded (stride 0): the same bits as the op's."""
    assert_grads_equal_custom_op(
        lambda x, w, b: ops.conv2d(x, w, b, padding=1, activation="gelu").sum(),
        (_f(2, 4, 5, 5, cl=cl), _f(4, 4, 3, 3), _f(4)))


def test_checkpoint_forward_and_recomputation_on_either_path():
    """``torch.utils.checkpoint`` compares the saved tensors of the forward and of its
    recomputation: the first call of a signature (full path) and its plan save alike."""
    from torch.utils.checkpoint import checkpoint

    x0, w0, b0 = _f(1, 3, 6, 5), _f(5, 3, 3, 3), _f(5)
    kw = dict(stride=(1, 2), padding=1, activation="silu")

    def grads(wrap):
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        y = wrap(lambda x, w, b: ops.conv2d(x, w, b, **kw), x, w, b)
        y.square().sum().backward()
        return y.detach(), x.grad, w.grad, b.grad

    with custom_op_path():
        want = grads(lambda f, *a: f(*a))
    fc._PLANS.clear()
    for _ in range(3):  # forward: full path then plan; recomputation: plan
        got = grads(lambda f, *a: checkpoint(f, *a, use_reentrant=False))
        for a, b in zip(got, want):
            assert_same(a, b)


def test_no_stale_plan_after_shape_dtype_strides_or_layout_change(spy):
    x, w, b = _f(2, 4, 5, 5), _f(4, 4, 3, 3), _f(4)
    variants = [(x, w), (x.to(memory_format=CL), w), (x, w.to(memory_format=CL)),
                (x.half(), w.half()), (x.double(), w.double()), (_f(3, 4, 5, 5), w),
                (_f(2, 4, 6, 5), w), (x, _f(4, 4, 1, 3)), (x[:, :, :, :4], w),
                (x.transpose(2, 3), w), (x, w)]
    misses = []
    for _ in range(2):
        for xv, wv in variants:
            n = len(spy)
            with torch.no_grad():
                y = ops.conv2d(xv, wv, b.to(xv.dtype), padding=1, activation="relu")
                misses.append(len(spy) - n)
                with custom_op_path():
                    want = ops.conv2d(xv, wv, b.to(xv.dtype), padding=1, activation="relu")
            assert_same(y, want)
            tol = 1e-2 if xv.dtype == torch.float16 else 1e-4
            ref = F.relu(F.conv2d(xv.double(), wv.double(), b.double(), padding=1))
            torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    assert misses == [1] * 10 + [0] + [0] * 11
    # scalars: stride, padding, dilation, groups, activations, bias presence, grad
    x8, w8 = _f(2, 4, 7, 7), _f(4, 2, 3, 3)
    calls = [dict(groups=2), dict(groups=2, stride=2), dict(groups=2, padding=(1, 2)),
             dict(groups=2, dilation=2), dict(groups=2, activation="silu"),
             dict(groups=2, post_activation="relu"), dict(groups=2, bias=b),
             dict(groups=2, activation=("leaky_relu", 0.1)),
             dict(groups=2, activation=("leaky_relu", 0.3))]
    for kw in calls:
        for grad in (False, True, False):
            xx = x8.detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y = ops.conv2d(xx, w8, **kw)
                with custom_op_path():
                    want = ops.conv2d(xx, w8, **kw)
            assert_same(y.detach(), want.detach())
            assert y.requires_grad == grad


@pytest.mark.parametrize("bad,err,match", [
    (dict(stride=True), TypeError, "stride"),             # == 1 as a dict key
    (dict(stride=(1, True)), TypeError, "stride"),
    (dict(stride=1.0), TypeError, "stride"),              # == 1 as a dict key
    (dict(padding=True), TypeError, "padding"),
    (dict(padding=(1.0, 1)), TypeError, "padding"),
    (dict(dilation=[True, 1]), TypeError, "dilation"),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(groups=True), TypeError, "groups"),             # == 1 as a dict key
    (dict(groups=1.0), TypeError, "groups"),
    (dict(groups=3), ValueError, "groups"),
    (dict(padding="same", stride=2), ValueError, "same"),
    (dict(padding="nope"), ValueError, "padding"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(bias=torch.randn(4).double()), TypeError, "dtype|bias"),
    (dict(bias=torch.arange(4)), TypeError, "bias"),
    (dict(residual=torch.randn(2, 4, 5, 4)), ValueError, "residual|broadcast"),
    (dict(weight=torch.randn(4, 2, 3, 3)), ValueError, "groups|channels"),
    (dict(weight=torch.randn(4, 3, 3, 3, device="meta")), ValueError, "device"),
    (dict(activation="nope"), ValueError, "nope|activation"),
    (dict(post_activation="nope"), ValueError, "nope|activation"),
    (dict(input=torch.randn(2, 3, 1, 1), dilation=2), ValueError, "size|kernel"),
    (dict(input=[1.0, 2.0]), TypeError, "input"),
])
def test_bad_input_raises_on_every_call(bad, err, match):
    """A valid plan for neighbouring arguments exists first: a bad argument equal to a valid one
    as a dict key (True == 1, 1.0 == 1) still raises, on every call."""
    good = dict(input=torch.randn(2, 3, 5, 5), weight=torch.randn(4, 3, 3, 3), bias=None,
                stride=1, padding=1, dilation=1, groups=1, activation="relu", residual=None,
                post_activation=None)
    assert_raises_after_plan(ops.conv2d, good, bad, err, match)


def test_backend_change_after_a_plan_launches_nothing(monkeypatch):
    x, w, b = _f(1, 3, 5, 5), _f(4, 3, 3, 3), _f(4)
    ref = F.relu(F.conv2d(x, w, b, padding=1))
    for grad in (False, True):
        for _ in range(2):
            with torch.set_grad_enabled(grad):
                ops.conv2d(x.detach().requires_grad_(grad), w, b, padding=1, activation="relu")
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    for grad in (False, True):
        for _ in range(2):
            xx = x.detach().requires_grad_(grad)
            with torch.set_grad_enabled(grad), launches() as t:
                y = ops.conv2d(xx, w, b, padding=1, activation="relu")
                if grad:
                    y.sum().backward()
            assert t.n == 0, "a plan of the triton backend served the torch backend"
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    monkeypatch.delenv("TILEFUSE_BACKEND")
    with launches() as t:
        ops.conv2d(x, w, b, padding=1, activation="relu")
    assert t.n == 1


def test_plans_step_aside_for_autocast_compile_functorch_and_modules(spy):
    x, w, b = _f(1, 3, 4, 4), _f(2, 3, 3, 3), _f(2)
    fn = _conv(padding=1, activation="silu")
    for _ in range(2):
        fn(x, w, b)
    n = len(spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w, b)
    assert len(spy) == n + 1 and y.dtype == torch.bfloat16
    with custom_op_path(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same(y, fn(x, w, b))
    seen, out, ref = compiled_targets(fn, [x, w, b])
    assert torch.equal(out, ref) and any("tilefuse.conv2d" in s for s in seen)
    # functorch: the full path (FastOp's Function.apply with its functorch preamble, which
    # refuses the op's Function), not the plan's C apply
    xx = x.detach().requires_grad_()
    for _ in range(2):
        fn(xx, w, b)
    n = len(spy)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: fn(x, w, b).sum())(xx)
    assert len(spy) == n + 1
    act = torch.nn.LeakyReLU(0.1)
    for slope in (0.1, 0.3, 0.3):  # a module is parsed on every call: its parameters may change
        act.negative_slope = slope
        n = len(spy)
        y = ops.conv2d(x, w, b, padding=1, activation=act)
        assert len(spy) == n + 1
        torch.testing.assert_close(y, F.leaky_relu(F.conv2d(x, w, b, padding=1), slope),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(stride=(1, True)), "stride"), (dict(stride=(True, 1)), "stride"),
    (dict(stride=[1, True]), "stride"), (dict(padding=(1, True)), "padding"),
    (dict(padding=(1.0, 1)), "padding"), (dict(dilation=(1, True)), "dilation"),
    (dict(dilation=(1.0, 1.0)), "dilation"), (dict(padding=(1, 1, True, 1)), "padding"),
])
def test_pair_arguments_equal_as_keys_still_raise(bad, match):
    """Planned (and geometry-cached) with pairs of ints: a pair holding a bool or a float equals
    it as a dict key and must still raise, on every call."""
    good = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    x, w = torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3)
    for _ in range(2):
        ops.conv2d(x, w, **good)
        ops.conv2d(x, w, **{**good, "padding": (1, 1, 1, 1)})
    for _ in range(3):
        with pytest.raises((TypeError, ValueError), match=match):
            ops.conv2d(x, w, **{**good, **bad})


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_channels_last_input_nchw_weight_and_tf32(dtype):
    """CUDA: the op copies an NCHW weight to channels_last for a channels_last input (on every
    call: the plan too); fp32 follows cudnn.allow_tf32, read per call (a plan key)."""
    x = torch.randn(2, 16, 9, 9, device="cuda", dtype=dtype).to(memory_format=CL)
    w = torch.randn(8, 16, 3, 3, device="cuda", dtype=dtype)
    b = torch.randn(8, device="cuda", dtype=dtype)
    fn = _conv(padding=1, activation="silu")
    old = torch.backends.cudnn.allow_tf32
    try:
        for tf32 in (True, False, True):
            torch.backends.cudnn.allow_tf32 = tf32
            for grad in (False, True):
                with custom_op_path():
                    slow = run(fn, [x, w, b], grad)
                for _ in range(3):
                    fast = run(fn, [x, w, b], grad)
                    for a, c in zip(fast[0] + fast[1], slow[0] + slow[1]):
                        assert_same(a, c)
    finally:
        torch.backends.cudnn.allow_tf32 = old

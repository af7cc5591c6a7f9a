"""The eager fast path of the dropout family (dropout, dropout_add, dropout2d, dropconnect_linear,
mixup) against the custom-op path it bypasses.

The wrappers draw the seed outside the op, so one ``torch.manual_seed`` before each run makes the
fast path and the ``torch.library`` custom op (forced with ``custom_op_path()``) see the same
seed: outputs and gradients must then agree bit for bit, with and without grad.
``torch.compile(fullgraph=True)`` must trace each wrapper into a graph that calls the custom op.
"""
import pytest
import torch

import tilefuse
import tilefuse.fused.dropout as fd
import tilefuse.kernels.dropout as kd
import tilefuse.regularize as R
from fast_path_utils import assert_compiles_to_custom_op  # noqa: I100
from fast_path_utils import assert_fast_equals_custom_op as _assert_fast
from tilefuse.fused._fast import FastOp, custom_op_path

ops = tilefuse.ops
P = 0.3


SEED = 1234


def assert_fast_equals_custom_op(fn, inputs, grad):
    return _assert_fast(fn, inputs, grad, seed=SEED)


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


CASES = {
    "dropout": (lambda x: ops.dropout(x, P), lambda: [_f(5, 37)], "dropout"),
    "dropout_3d": (lambda x: ops.dropout(x, P), lambda: [_f(2, 3, 40)], "dropout"),
    "dropout_transposed": (lambda x: ops.dropout(x.t(), P), lambda: [_f(9, 13)], "dropout"),
    "dropout_fp16": (lambda x: ops.dropout(x, P), lambda: [_f(4, 33, dtype=torch.float16)],
                     "dropout"),
    "dropout_add": (lambda x, r: ops.dropout_add(x, r, P), lambda: [_f(6, 20), _f(6, 20)],
                    "dropout"),
    "dropout_add_broadcast": (lambda x, r: ops.dropout_add(x, r, P),
                              lambda: [_f(3, 4, 20), _f(20)], "dropout"),
    "dropout_add_mixed_dtype": (lambda x, r: ops.dropout_add(x, r, P),
                                lambda: [_f(4, 16, dtype=torch.bfloat16), _f(4, 16)], "dropout"),
    "dropout2d": (lambda x: ops.dropout2d(x, P), lambda: [_f(2, 6, 3, 5)], "dropout"),
    "dropout2d_channels_last": (
        lambda x: ops.dropout2d(x.to(memory_format=torch.channels_last), P),
        lambda: [_f(2, 6, 3, 5)], "dropout"),
    "dropout2d_unbatched": (lambda x: ops.dropout2d(x, P), lambda: [_f(6, 4, 4)], "dropout"),
    "dropconnect_linear": (lambda x, w, b: ops.dropconnect_linear(x, w, b, p=P),
                           lambda: [_f(5, 12), _f(7, 12), _f(7)], "dropconnect_linear"),
    "dropconnect_linear_gelu_3d": (
        lambda x, w, b: ops.dropconnect_linear(x, w, b, p=P, activation="gelu"),
        lambda: [_f(2, 3, 12), _f(7, 12), _f(7)], "dropconnect_linear"),
    "dropconnect_linear_relu_nobias": (
        lambda x, w: ops.dropconnect_linear(x, w, p=P, activation="relu"),
        lambda: [_f(4, 10), _f(6, 10)], "dropconnect_linear"),
    "mixup": (lambda x: R.mixup(x, torch.tensor([0, 1, 2, 1]), 0.4, num_classes=3),
              lambda: [_f(4, 3, 5)], "mixup"),
    "mixup_op": (lambda x: fd.mixup_op(x, torch.tensor([2, 0, 3, 1]), 0.3),
                 lambda: [_f(4, 3, 5)], "mixup"),
}


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_path_equals_custom_op(name, grad, backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    fn, make, _ = CASES[name]
    outs, grads = assert_fast_equals_custom_op(fn, make(), grad)
    if name.startswith("dropout") and "add" not in name:
        assert (outs[0] == 0).any() and (outs[0] != 0).any()  # a real mask, not a pass-through
    if grad:
        assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("name", ["dropout", "dropout_add_broadcast", "dropout2d",
                                  "dropconnect_linear_gelu_3d", "mixup_op"])
def test_compile_traces_the_custom_op(name):
    fn, make, op_name = CASES[name]
    assert_compiles_to_custom_op(fn, make(), op_name, seed=99)


def test_compile_deterministic_op_matches_shared_helper():
    """The shared helper (no RNG) on the DropConnect op with a fixed seed tensor."""
    seed = torch.tensor(123)
    assert_compiles_to_custom_op(
        lambda a, b: fd.dropconnect_mm(a, b, seed, P, 1, 6), [_f(5, 8), _f(8, 6)],
        "dropconnect_linear")


def test_ops_are_fast_ops():
    for op in (fd.dropout_op, fd.dropconnect_op, fd.mixup_op):
        assert isinstance(op, FastOp)


def test_no_grad_paths_skip_autograd():
    """Without grad the fast path returns a plain tensor (no autograd node); with grad the node
    is the eager Function, not the custom op's generated one."""
    x = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        assert ops.dropout(x, P).grad_fn is None
    name = type(ops.dropout(x, P).grad_fn).__name__
    assert "Fast_" in name, name
    with custom_op_path():
        assert "Fast_" not in type(ops.dropout(x, P).grad_fn).__name__


def test_fp32_round_matches_torch():
    """The launcher's hi/lo split of 1/(1-p) rounds to fp32 as the torch tensor it replaced."""
    g = torch.Generator().manual_seed(3)
    ps = torch.rand(2000, generator=g, dtype=torch.float64).tolist() + [1e-9, 0.5, 0.999999]
    for p in ps:
        scale = 1.0 / (1.0 - p)
        assert kd.fp32_round(scale) == float(torch.tensor(scale, dtype=torch.float32))


def test_launch_plan_cached_per_signature(monkeypatch):
    """The layout plan is computed once per (shape, strides, group, dtype); a problem that needs
    the documented copy (more than 4 dims after merging) is cached as such and stays exact."""
    calls = []
    real = kd._launch_params
    monkeypatch.setattr(kd, "_launch_params", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(2, 3, 2, 3, 2, 3).permute(5, 3, 1, 0, 2, 4)  # not mergeable to 4 dims
    torch.manual_seed(5)
    a = ops.dropout(x, P)
    torch.manual_seed(5)
    b = ops.dropout(x, P)
    assert torch.equal(a, b)
    torch.manual_seed(5)
    c = ops.dropout(x.contiguous(), P)
    assert torch.equal(a, c)  # the logical-index mask does not depend on the layout
    # the strided layout (no plan) and the contiguous one (its copy and the contiguous input)
    assert len(calls) == 2 and kd._LAUNCH[calls[0]] is False
    ops.dropout(torch.randn(4, 8), P)
    ops.dropout(torch.randn(4, 8), P)
    assert len(calls) == 3


def test_dropout_add_same_shape_residual_not_expanded():
    """A same-shape residual goes to the op as is (no expand view); gradients are unchanged."""
    x = torch.randn(4, 8, requires_grad=True)
    r = torch.randn(4, 8, requires_grad=True)
    r1 = torch.randn(1, 8, requires_grad=True)
    torch.manual_seed(2)
    y = ops.dropout_add(x, r, P)
    y.sum().backward()
    assert torch.equal(r.grad, torch.ones(4, 8))
    torch.manual_seed(2)
    y1 = ops.dropout_add(x, r1, P)
    y1.sum().backward()
    assert torch.equal(r1.grad, torch.full((1, 8), 4.0))
    torch.manual_seed(2)
    y2 = ops.dropout_add(x, r1.detach().expand(4, 8).clone(), P)
    assert torch.equal(y1, y2)  # same values through a broadcast or a same-shape residual


def test_dropout_bad_arguments_still_named():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x"):
        ops.dropout(x.long(), P)
    with pytest.raises(TypeError, match="p"):
        ops.dropout(x, "0.5")
    with pytest.raises(ValueError, match="p"):
        ops.dropout(x, float("nan"))
    with pytest.raises(ValueError, match="p"):
        ops.dropout(x, 1.5)
    with pytest.raises(TypeError, match="training"):
        ops.dropout(x, 0.5, training=1)
    assert torch.equal(ops.dropout(x, 0), x) and ops.dropout(x, 1).abs().sum() == 0
    with pytest.raises(ValueError, match="residual"):
        ops.dropout_add(x, torch.randn(3, 8), P)
    with pytest.raises(TypeError, match="residual"):
        ops.dropout_add(x, x.long(), P)
    w = torch.randn(6, 8)
    with pytest.raises(ValueError, match="weight"):
        ops.dropconnect_linear(x, w[None], p=P)
    with pytest.raises(ValueError, match="bias"):
        ops.dropconnect_linear(x, w, torch.randn(2, 6), p=P)
    with pytest.raises(TypeError, match="weight"):
        ops.dropconnect_linear(x, w.double(), p=P)
    with pytest.raises(ValueError, match="in_features"):
        ops.dropconnect_linear(torch.randn(4, 5), w, p=P)


@pytest.mark.parametrize("lead", [(3,), (2, 3), ()])
def test_dropconnect_zero_in_features(lead):
    """in_features == 0 gives act(bias) broadcast, as F.linear; before, the (-1, 0) reshape of
    an empty x raised a RuntimeError."""
    x = torch.randn(*lead, 0, requires_grad=True)
    w = torch.randn(4, 0, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    y = ops.dropconnect_linear(x, w, b, p=P, activation="relu")
    ref = torch.relu(torch.nn.functional.linear(x, w, b))
    assert y.shape == ref.shape and torch.equal(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    exp = torch.autograd.grad(ref, (x, w, b), g)
    for a, e in zip(got, exp):
        assert a.shape == e.shape and torch.allclose(a, e)

"""The eager fast path of depthwise_conv2d against the custom-op path it bypasses.

The fast path (``FastOp``) and the ``torch.library`` custom op (forced with ``custom_op_path()``)
give the same outputs and gradients bit for bit, with and without grad; ``torch.compile
(fullgraph=True)`` traces the wrapper (and the module) into a graph that calls the custom op.
"""
import pytest
import torch

import tilefuse
import tilefuse.fused.depthwise as fdw
import tilefuse.kernels.depthwise as kdw
from fast_path_utils import (assert_compiles_to_custom_op,  # noqa: I100
                             assert_fast_equals_custom_op, run)
from tilefuse.fused._fast import FastOp

ops = tilefuse.ops


def _f(*shape, dtype=torch.float32, cl=False):
    t = torch.randn(*shape, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if cl else t


def _dw(stride=1, padding=1, dilation=1, act="relu", with_bias=True, residual=False):
    def fn(x, w, *rest):
        b = rest[0] if with_bias else None
        r = rest[-1] if residual else None
        return ops.depthwise_conv2d(x, w, b, stride, padding, dilation, activation=act,
                                    residual=r)
    return fn


CASES = {
    "3x3_relu": (_dw(), lambda: [_f(2, 4, 7, 6), _f(4, 1, 3, 3), _f(4)]),
    "no_act_no_bias": (_dw(act=None, with_bias=False), lambda: [_f(1, 3, 5, 5), _f(3, 1, 3, 3)]),
    "mult2_stride2_cl_residual": (
        _dw(stride=2, padding=2, act="silu", residual=True),
        lambda: [_f(2, 4, 9, 7, cl=True), _f(8, 1, 5, 5), _f(8), _f(2, 8, 5, 4, cl=True)]),
    "same_dilated": (_dw(padding="same", dilation=2, act="gelu"),
                     lambda: [_f(1, 3, 8, 8), _f(3, 1, 3, 3), _f(3)]),
    "pad4_residual_broadcast": (_dw(padding=(1, 0, 2, 1), act="relu6", residual=True),
                                lambda: [_f(2, 3, 6, 6), _f(3, 1, 3, 3), _f(3), _f(3, 1, 1)]),
    "unbatched": (_dw(act=("leaky_relu", 0.2)), lambda: [_f(4, 6, 6), _f(4, 1, 3, 3), _f(4)]),
    "bf16": (_dw(act="silu"), lambda: [_f(2, 4, 6, 6, dtype=torch.bfloat16),
                                       _f(4, 1, 3, 3, dtype=torch.bfloat16),
                                       _f(4, dtype=torch.bfloat16)]),
    "fp64": (_dw(stride=(2, 1), act="relu"),
             lambda: [_f(2, 4, 6, 5, dtype=torch.float64), _f(4, 1, 3, 3, dtype=torch.float64),
                      _f(4, dtype=torch.float64)]),
}


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_depthwise_fast_path_equals_custom_op(name, grad):
    fn, make = CASES[name]
    assert_fast_equals_custom_op(fn, make(), grad)


def test_residual_only_grad_takes_the_autograd_path():
    """Only the residual requires grad: the fast path still builds the autograd node."""
    x, w, r = _f(1, 3, 4, 4), _f(3, 1, 3, 3), _f(1, 3, 4, 4).requires_grad_()
    y = ops.depthwise_conv2d(x, w, padding=1, activation="relu", residual=r)
    y.sum().backward()
    assert torch.equal(r.grad, torch.ones_like(r))


@pytest.mark.parametrize("grad", [False, True])
def test_batches_over_the_grid_limit(grad, monkeypatch):
    """More images than one launch's grid z takes: per-batch views (the rare path) give the
    same result as one launch (the cached, view-free path)."""
    fn = _dw(stride=2, act="silu", residual=True)
    inputs = [_f(5, 3, 6, 6), _f(6, 1, 3, 3), _f(6), _f(5, 6, 3, 3)]
    one = run(fn, inputs, grad)
    monkeypatch.setattr(kdw, "MAX_GRID_Z", 2)
    from tilefuse.kernels import clear_launch_caches

    clear_launch_caches()
    split = run(fn, inputs, grad)
    assert len(kdw._FWD_LAUNCH[next(iter(kdw._FWD_LAUNCH))][1]) == 3  # 3 launches of <= 2
    for a, b in zip(one[0] + one[1], split[0] + split[1]):
        assert torch.equal(a, b)


def test_layouts_do_not_share_a_cached_launch():
    """Same shapes, NCHW then channels_last output: different tiles (the layout is in the key)."""
    x, w = _f(2, 8, 6, 6), _f(8, 1, 3, 3)
    ref = torch.nn.functional.conv2d(x, w, padding=1, groups=8)
    for xx in (x, x.to(memory_format=torch.channels_last), x):
        torch.testing.assert_close(ops.depthwise_conv2d(xx, w, padding=1), ref, atol=1e-5,
                                   rtol=1e-5)
    assert len(kdw._FWD_LAUNCH) == 2


def test_depthwise_ops_are_fast_ops():
    assert isinstance(fdw.depthwise_conv2d_op, FastOp)
    assert isinstance(fdw.depthwise_conv2d_backward_op, FastOp)


def test_compile_traces_the_custom_op():
    fn, make = CASES["mult2_stride2_cl_residual"]
    assert_compiles_to_custom_op(fn, make(), "depthwise_conv2d")


def test_compile_module_with_grad_traces_the_custom_ops():
    """tilefuse.nn.DepthwiseConv2d under fullgraph compile with autograd: the custom op is in
    the graph, its backward gives the eager gradient."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    m = tilefuse.nn.DepthwiseConv2d(4, 4, 3, padding=1, activation="relu")
    x = _f(2, 4, 5, 5)
    torch._dynamo.reset()
    y = torch.compile(m, fullgraph=True, backend=backend)(x)
    y.sum().backward()
    g = m.weight.grad.clone()
    m.weight.grad = None
    m(x).sum().backward()
    assert torch.equal(g, m.weight.grad)
    assert any("tilefuse.depthwise_conv2d" in s for s in seen), seen

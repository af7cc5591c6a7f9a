"""The eager fast path (tilefuse.fused._fast.FastOp) against the custom-op path it bypasses.

For every op converted here: the fast path and the ``torch.library`` custom op (forced with
``custom_op_path()``) give the same outputs and gradients bit for bit, with and without grad, and
``torch.compile(fullgraph=True)`` traces the wrapper into a graph that calls the custom op.
"""
import pytest
import torch

import tilefuse
from fast_path_utils import assert_compiles_to_custom_op, assert_fast_equals_custom_op
from tilefuse.fused._fast import FastOp

ops = tilefuse.ops


def _f(*shape):
    return torch.randn(*shape)


CASES = {
    "layer_norm_act": (lambda x, w, b: ops.layer_norm_act(x, 16, w, b, activation="gelu"),
                       lambda: [_f(3, 5, 16), _f(16), _f(16)], "norm_act_fwd"),
    "rms_norm_act": (lambda x, w: ops.rms_norm_act(x, (16,), w, activation="silu"),
                     lambda: [_f(7, 16), _f(16)], "norm_act_fwd"),
    "layer_norm_residual": (lambda x, r: ops.layer_norm_act(x, [4, 4], residual=r),
                            lambda: [_f(3, 4, 4), _f(4, 4)], "norm_act_fwd"),
    "matmul": (lambda a, b, bias: ops.matmul(a, b, bias, activation="relu"),
               lambda: [_f(2, 5, 8), _f(8, 6), _f(6)], "matmul"),
    "matmul_batched": (lambda a, b: ops.matmul(a, b), lambda: [_f(2, 5, 8), _f(2, 8, 3)],
                       "matmul"),
    "linear": (lambda x, w, b, r: ops.linear(x, w, b, activation="gelu_tanh", residual=r),
               lambda: [_f(3, 8), _f(6, 8), _f(6), _f(6)], "matmul"),
    "weight_only_int8_linear": (
        lambda x, b: ops.weight_only_int8_linear(x, torch.arange(48, dtype=torch.int8).view(6, 8),
                                                 torch.full((6,), 0.02), b, activation="relu"),
        lambda: [_f(3, 8), _f(6)], "int8_matmul"),
}


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_path_equals_custom_op(name, grad):
    fn, make, _ = CASES[name]
    assert_fast_equals_custom_op(fn, make(), grad)


def test_int8_ops_fast_path_equals_custom_op():
    a = torch.randint(-127, 128, (5, 32), dtype=torch.int8)
    b = torch.randint(-127, 128, (32, 7), dtype=torch.int8)
    x, scale = torch.randn(4, 32), torch.rand(7)
    for fn, args in ((ops.int8_matmul, (a, b)), (ops.quantize_per_row, (x,)),
                     (lambda x: ops.w8a8_linear(x, b.t().contiguous(), scale), (x,))):
        assert_fast_equals_custom_op(fn, list(args), grad=False)


@pytest.mark.parametrize("name", ["layer_norm_act", "matmul", "linear", "weight_only_int8_linear"])
def test_compile_traces_the_custom_op(name):
    fn, make, op_name = CASES[name]
    assert_compiles_to_custom_op(fn, make(), op_name)


def test_public_ops_dispatch_through_fast_ops():
    """The modules behind tilefuse.ops expose their ops as FastOp (the eager fast path)."""
    from tilefuse.fused import int8, matmul, norm

    for op in (norm.norm_act_fwd, norm.norm_act_bwd, matmul.matmul_op,
               matmul.activation_backward_op, int8.int8_matmul_op, int8.quantize_per_row_op):
        assert isinstance(op, FastOp)


def test_no_stats_saved_without_grad():
    """Inference LayerNorm does not store mean/rstd (the backward is the only reader)."""
    from tilefuse.fused.norm import norm_act_fwd

    x = torch.randn(4, 8)
    _, mean, rstd = norm_act_fwd(x, None, None, None, 1e-5, False, 0, 0.0, False)
    assert mean.numel() == 0 and rstd.numel() == 0
    _, mean, rstd = norm_act_fwd(x, None, None, None, 1e-5, False, 0, 0.0, True)
    assert mean.shape == (4,) and rstd.shape == (4,)


def test_empty_feature_dim_layer_norm():
    """issue 14 item 9: a zero-size normalized dim returns an empty tensor, as torch does."""
    x = torch.randn(4, 0)
    y = ops.layer_norm_act(x, (0,))
    assert y.shape == (4, 0)
    assert torch.nn.functional.layer_norm(x, (0,)).shape == y.shape
    assert ops.layer_norm_act(torch.randn(0, 3), 3).shape == (0, 3)

"""The C++ autograd node (tilefuse/_graph_node.py, tilefuse/csrc/graph_node.cpp): what a node
made by ``attach`` does in a backward (gradients, pruning, saved tensors, errors), and the GEMM
plans recording their gradient through it or through ``autograd.Function`` bit for bit alike."""
import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import tilefuse
from fast_path_utils import assert_plans_match_custom_op, assert_same
from test_linear_plan import _cases as linear_cases
from test_linear_plan import _run as linear_run
from test_matmul_plan import GRAD_CASES
from tilefuse import _graph_node
from tilefuse.bench.host import stub_launches
from tilefuse.fused._fast import custom_op_path

ops = tilefuse.ops


@pytest.fixture(scope="module")
def attach():
    if _graph_node.attach_fn() is None:
        try:
            _graph_node.build()
        except RuntimeError as e:  # no C++ compiler here: the ops keep autograd.Function
            pytest.skip(f"the extension does not build here: {e}")
    fn = _graph_node.attach_fn()
    assert fn is not None, _graph_node.why_unavailable()
    return fn


def _mm_backward(state, saved, needs, g):
    a, b = saved
    state.append(needs)
    return (g @ b.t() if needs[0] else None, a.t() @ g if needs[1] else None)


def _mm(attach, a, b, log=None):
    out = torch.mm(a.detach(), b.detach())
    return attach(out, _mm_backward, [] if log is None else log, (a, b), (a, b))


def _leaves():
    torch.manual_seed(0)
    return torch.randn(4, 6, requires_grad=True), torch.randn(6, 5, requires_grad=True)


def test_gradients_and_graph(attach):
    a, b = _leaves()
    y = _mm(attach, a, b)
    assert y.requires_grad and not y.is_leaf and y.grad_fn.name() == "_mm_backward"
    assert [f for f, _ in y.grad_fn.next_functions] == [a.grad_fn or _acc(a), _acc(b)]
    g = torch.randn(4, 5)
    ga, gb = torch.autograd.grad(y, (a, b), g)
    assert_same(ga, g @ b.detach().t())
    assert_same(gb, a.detach().t() @ g)


def _acc(t):
    return t.view_as(t).grad_fn.next_functions[0][0]  # the leaf's AccumulateGrad


def test_needs_follow_the_engine(attach):
    a, b = _leaves()
    log = []
    y = _mm(attach, a, b, log)
    (ga,) = torch.autograd.grad(y.sum(), (a,), retain_graph=True)
    y.sum().backward()
    assert log == [(True, False), (True, True)]
    c = torch.randn(6, 5)  # an input that does not require grad: no edge, no gradient asked
    log2 = []
    _mm(attach, a, c, log2).sum().backward()
    assert log2 == [(True, False)]


def test_saved_tensors_behave_like_torchs(attach):
    a, b = _leaves()
    y = _mm(attach, a, b)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    y = _mm(attach, a, b)
    with torch.no_grad():
        b.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_checkpoint_hooks_and_double_backward(attach):
    a, b = _leaves()
    y = checkpoint(lambda a, b: _mm(attach, a, b).sin(), a, b, use_reentrant=False)
    y.sum().backward()
    want = (torch.cos(a.detach() @ b.detach())) @ b.detach().t()
    assert torch.allclose(a.grad, want, atol=1e-6)
    a.grad = None
    (ga,) = torch.autograd.grad(_mm(attach, a, b).square().sum(), (a,), create_graph=True)
    assert ga.requires_grad  # the backward's own ops recorded a graph
    ga.sum().backward()
    assert b.grad is not None


def test_errors_in_and_from_the_backward(attach):
    a, _ = _leaves()

    def boom(state, saved, needs, g):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        attach(torch.zeros(4, 6), boom, None, (a,), ()).sum().backward()
    with pytest.raises(TypeError, match="expected a tuple of 1"):
        attach(torch.zeros(4, 6), lambda *args: (None, None), None, (a,), ()).sum().backward()
    with pytest.raises(TypeError, match="as gradient 0"):
        attach(torch.zeros(4, 6), lambda *args: ("x",), None, (a,), ()).sum().backward()


def test_bad_arguments(attach):
    a, _ = _leaves()
    with pytest.raises(ValueError, match="new tensor"):
        attach(a, _mm_backward, None, (a,), ())
    with pytest.raises(ValueError, match="new tensor"):
        attach(torch.zeros(4, 6)[1:], _mm_backward, None, (a,), ())
    with pytest.raises(TypeError, match="inputs"):
        attach(torch.zeros(4, 6), _mm_backward, None, (a, 3), ())
    with pytest.raises(TypeError):
        attach(torch.zeros(4, 6), _mm_backward, None, [a], ())


def test_graph_frees_what_it_holds(attach):
    a, b = _leaves()
    state = type("State", (), {})()
    saved = a.detach().exp()
    refs = [weakref.ref(state), weakref.ref(saved)]
    y = attach(torch.zeros(4, 5), lambda *args: (None, None), state, (a, b), (saved,))
    del state, saved
    assert all(r() is not None for r in refs)
    del y
    gc.collect()
    assert all(r() is None for r in refs)


# ------------------------------------------------------------------------ the GEMM plans
@pytest.fixture(params=["node", "function"])
def recorder(request, attach):
    _graph_node.set_enabled(request.param == "node")
    yield request.param
    _graph_node.set_enabled(True)


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_matmul_plans_on_either_recorder(recorder, name):
    fn, make = GRAD_CASES[name]
    inputs = make()
    for mask in ([True] * len(inputs), [False] + [True] * (len(inputs) - 1),
                 [False] * (len(inputs) - 1) + [True]):
        assert_plans_match_custom_op(fn, inputs, mask, calls=4)
    xs = [t.detach().requires_grad_() for t in inputs]
    name = fn(*xs).grad_fn.name()
    assert name == ("TilefuseMatmulBackward" if recorder == "node" else "_PlannedMatmulBackward")


@pytest.mark.parametrize("name", ["2d bias gelu", "2d residual", "3d bias silu",
                                  "transposed weight", "fp16"])
def test_linear_plans_on_either_recorder(recorder, name):
    fn, inputs = linear_cases()[name]
    with custom_op_path():
        want = linear_run(fn, inputs, True)
    for _ in range(4):
        for got, ref in zip(linear_run(fn, inputs, True), want):
            assert_same(got, ref)


def test_planned_linear_takes_no_view_node(recorder):
    """A planned ``linear`` hands its weight to the launch as ``weight.t()`` where the launch
    reads more than pointers: that view is taken with grad off (no node per call)."""
    x, w = torch.randn(4, 32, requires_grad=True), torch.randn(24, 32, requires_grad=True)
    with stub_launches():
        for _ in range(4):
            y = ops.linear(x, w)
    nodes = [type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None]
    assert nodes == ["AccumulateGrad"] * 2


def test_forward_ad_steps_aside(recorder):
    """Forward-mode AD: the planned call records through ``autograd.Function`` either way
    (which has no forward derivative: the same error as before the node)."""
    import torch.autograd.forward_ad as fwad

    a, b = _leaves()
    for _ in range(3):
        ops.matmul(a, b)
    with fwad.dual_level(), pytest.raises(RuntimeError, match="jvp"):
        ops.matmul(fwad.make_dual(a.detach(), torch.ones(4, 6)).requires_grad_(), b)


def test_cli_and_info_report_the_node(attach, capsys):
    from tilefuse.cli import main

    assert main(["build-ext"]) == 0
    assert str(_graph_node.ext_path()) in capsys.readouterr().out
    assert main(["info"]) == 0
    assert "autograd node     C++" in capsys.readouterr().out


def _t(*shape):
    return torch.randn(*shape)


# the other ops whose plans record through node_plan: (fn, inputs, how many lead inputs may
# require grad, the node's name)
OP_CASES = {
    "layer_norm_residual_gelu": (
        lambda x, w, b, r: ops.layer_norm_act(x, (16,), w, b, activation="gelu", residual=r),
        lambda: (_t(2, 3, 16), _t(16), _t(16), _t(2, 3, 16)), 4, "TilefuseRowNormBackward"),
    "rms_norm_silu": (lambda x, w: ops.rms_norm_act(x, (16,), w, activation="silu"),
                      lambda: (_t(5, 16), _t(16)), 2, "TilefuseRowNormBackward"),
    "group_norm_relu": (lambda x, w, b: ops.group_norm_act(x, 4, w, b, activation="relu"),
                        lambda: (_t(2, 8, 3, 3), _t(8), _t(8)), 3, "TilefuseGroupNormBackward"),
    "batch_norm_train_residual": (
        lambda x, w, b, r, rm, rv: ops.batch_norm_act(x, rm, rv, w, b, training=True,
                                                      activation="relu", residual=r),
        lambda: (_t(4, 6, 3, 3), _t(6), _t(6), _t(4, 6, 3, 3), torch.zeros(6), torch.ones(6)),
        4, "TilefuseBatchNormBackward"),
    "batch_norm_eval": (
        lambda x, w, b, rm, rv: ops.batch_norm_act(x, rm, rv, w, b, training=False),
        lambda: (_t(4, 6, 5), _t(6), _t(6), _t(6), _t(6).abs() + 0.5), 3,
        "TilefuseBatchNormBackward"),
    "conv2d_relu_residual": (
        lambda x, w, b, r: ops.conv2d(x, w, b, padding=1, activation="relu", residual=r),
        lambda: (_t(2, 3, 6, 6), _t(4, 3, 3, 3), _t(4), _t(2, 4, 6, 6)), 4,
        "TilefuseConv2dBackward"),
    "conv2d_post_activation": (
        lambda x, w, b: ops.conv2d(x, w, b, activation="silu", post_activation="relu"),
        lambda: (_t(1, 3, 5, 5), _t(4, 3, 3, 3), _t(4)), 3, "TilefuseConv2dBackward"),
}


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_op_plans_on_either_recorder(recorder, name):
    """Planned calls with grad record through the C++ node or their ``autograd.Function``:
    either gives the custom-op path's outputs and gradients bit for bit, also when only some
    inputs require grad."""
    fn, make, n_grad, node_name = OP_CASES[name]
    inputs = make()
    n = len(inputs)
    for lead in ([True] * n_grad, [False] + [True] * (n_grad - 1), [True] + [False] * (n_grad - 1)):
        assert_plans_match_custom_op(fn, inputs, lead + [False] * (n - n_grad), calls=4)
    xs = [t.detach().clone().requires_grad_(i < n_grad) for i, t in enumerate(inputs)]
    for _ in range(3):
        y = fn(*xs)
    assert (y.grad_fn.name() == node_name) == (recorder == "node")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["bias_gelu", "bf16", "linear_relu"])
def test_gemm_plans_on_either_recorder_cuda(recorder, name):
    """On the GPU (compiled kernels, the TMA path where the operands allow it): the same bits
    through the C++ node, the ``autograd.Function`` and the custom-op path."""
    fn, make = GRAD_CASES[name]
    inputs = [t.cuda() for t in make()]
    assert_plans_match_custom_op(fn, inputs, [True] * len(inputs), calls=4)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["layer_norm_residual_gelu", "group_norm_relu",
                                  "batch_norm_train_residual", "conv2d_relu_residual"])
def test_op_plans_on_either_recorder_cuda(recorder, name):
    fn, make, n_grad, _ = OP_CASES[name]
    inputs = [t.cuda() for t in make()]
    assert_plans_match_custom_op(fn, inputs, [i < n_grad for i in range(len(inputs))], calls=4)

"""Fused BatchNorm + residual + activation (train and eval): fwd, bwd, running statistics."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse import ops
from tilefuse.activations import ACTIVATIONS, torch_activation
from test_norm_helpers import check_fwd_bwd


def _stats(C):
    return torch.randn(C) * 0.5, torch.rand(C) + 0.5


def _ref(training, rm, rv, act="none", eps=1e-5):
    p = ACTIVATIONS[act][1]

    def ref(x, weight=None, bias=None, residual=None):
        z = F.batch_norm(x, rm.to(x.dtype).clone(), rv.to(x.dtype).clone(), weight, bias,
                         training, 0.1, eps)
        return torch_activation(z if residual is None else z + residual, act, p)
    return ref


def _ours(training, rm, rv, act="none", eps=1e-5):
    return lambda x, weight=None, bias=None, residual=None: ops.batch_norm_act(
        x, rm.clone(), rv.clone(), weight, bias, training, 0.1, eps, activation=act,
        residual=residual)


@pytest.mark.parametrize("shape,training,act,res,cl", [
    ((4, 6, 5, 5), True, "relu", True, False),
    ((3, 6, 3, 5), True, "silu", True, True),     # channels_last
    ((7, 5), True, "gelu", False, False),          # BatchNorm1d (N, C)
    ((3, 4, 6), True, "none", True, False),        # BatchNorm1d (N, C, L)
    ((1, 3, 4, 4), False, "relu", True, False),    # eval, batch 1
    ((2, 5, 3), False, "tanh", False, False),      # eval, 3-D
])
def test_fwd_bwd(shape, training, act, res, cl):
    C = shape[1]
    x = torch.randn(*shape) * 2 + 3
    r = torch.randn(*shape) if res else None
    if cl:
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    rm, rv = _stats(C)
    out = check_fwd_bwd(_ours(training, rm, rv, act), _ref(training, rm, rv, act),
                        dict(x=x, weight=torch.randn(C), bias=torch.randn(C), residual=r))
    if cl:
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter's numpy sigmoid
def test_every_activation_and_large_mean():
    x = torch.randn(6, 4, 3) * 0.1 + 1000.0   # large mean: two-pass variance stays accurate
    rm, rv = _stats(4)
    for act in sorted(ACTIVATIONS):
        check_fwd_bwd(_ours(True, rm, rv, act), _ref(True, rm, rv, act),
                      dict(x=x, weight=torch.randn(4), bias=torch.randn(4)),
                      grad=act in ("relu", "silu", "gelu_tanh"))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # masked lanes, interpreter
@pytest.mark.parametrize("cl", [False, True])
def test_split_reduction_merge(cl, monkeypatch):
    """Small tiles: several R-slices per channel, merged with Chan's formula (large mean)."""
    import tilefuse.kernels.norm_bn as kb

    monkeypatch.setattr(kb, "INTERP_TILE", 64)
    monkeypatch.setattr(kb, "SMALL_TILE", 0)  # (else one program)
    x = torch.randn(5, 6, 4, 5) * 0.5 + 300.0
    r = torch.randn(5, 6, 4, 5)
    if cl:
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    rm, rv = _stats(6)
    check_fwd_bwd(_ours(True, rm, rv, "silu"), _ref(True, rm, rv, "silu"),
                  dict(x=x, weight=torch.randn(6), bias=torch.randn(6), residual=r))
    assert kb._split(100, 1, 64 if not cl else 8, torch.device("cpu"))[0] == 2


def test_non_contiguous_and_no_affine():
    x = torch.randn(8, 10, 6)[::2, 1::2, :]
    rm, rv = _stats(5)
    check_fwd_bwd(_ours(True, rm, rv, "relu6"), _ref(True, rm, rv, "relu6"),
                  dict(x=x, residual=torch.randn(4, 1, 6)))   # broadcast residual


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    C = 4
    x = torch.randn(3, C, 3, 3, dtype=dtype)
    rm, rv = _stats(C)
    check_fwd_bwd(_ours(True, rm, rv, "relu"), _ref(True, rm, rv, "relu"),
                  dict(x=x, weight=torch.randn(C, dtype=dtype), bias=torch.randn(C, dtype=dtype),
                       residual=torch.randn(3, C, 3, 3, dtype=dtype)),
                  eager_dtype=torch.float32)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_match_torch_over_steps(momentum):
    torch.manual_seed(1)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum)
    ours = tilefuse.nn.BatchNormAct2d(3, momentum=momentum, activation="relu")
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(4, 3, 2, 3) * (step + 1) + step
        y = ours(x)
        y_ref = torch.relu(ref(x))
        assert (y - y_ref).abs().max() < 1e-5
    for name, t in ref.state_dict().items():
        assert torch.allclose(ours.state_dict()[name], t, atol=1e-6), name
    assert int(ours.num_batches_tracked) == 3
    ref.eval()
    ours.eval()
    x = torch.randn(1, 3, 2, 2)
    assert (ours(x) - torch.relu(ref(x))).abs().max() < 1e-5


def test_no_running_stats_module():
    ref = torch.nn.BatchNorm1d(4, track_running_stats=False).eval()
    ours = tilefuse.nn.BatchNormAct1d(4, track_running_stats=False).eval()
    x = torch.randn(5, 4)
    assert (ours(x) - ref(x)).abs().max() < 1e-5
    assert set(ours.state_dict()) == set(ref.state_dict())


@pytest.mark.parametrize("bad", ["one_value", "weight", "eval_no_stats", "momentum"])
def test_bad_inputs(bad):
    x = torch.randn(1, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises((ValueError, TypeError)) as exc:
        if bad == "one_value":
            ops.batch_norm_act(x, rm, rv, training=True)
        elif bad == "weight":
            ops.batch_norm_act(x, rm, rv, weight=torch.ones(4))
        elif bad == "eval_no_stats":
            ops.batch_norm_act(x, None, None, training=False)
        else:
            ops.batch_norm_act(x, rm, rv, training=True, momentum="fast")
    word = {"one_value": "more than 1 value", "weight": "weight",
            "eval_no_stats": "running_mean", "momentum": "momentum"}[bad]
    assert word in str(exc.value)
    with pytest.raises(ValueError):   # torch raises too
        F.batch_norm(x, rm, rv, training=True)


def _depthwise_bn_relu6_grads(shape, seed):
    """(bias grad, weight grad) of depthwise conv -> BN (train) -> ReLU6 in fp64 (torch), fp32
    (torch) and fp32 (tilefuse's fused BN+ReLU6)."""
    import copy

    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False).double()
    bn = torch.nn.BatchNorm2d(C).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        bn.weight.uniform_(0.5, 2.0, generator=g)
        bn.bias.uniform_(-1.0, 4.0, generator=g)

    def run(norm, act, dtype):
        c, norm = copy.deepcopy(conv).to(dtype), norm.to(dtype)
        act(norm(c(x.to(dtype)))).backward(dy.to(dtype))
        return norm.bias.grad.double(), norm.weight.grad.double()

    ours = tilefuse.nn.BatchNormAct2d(C, activation="relu6").double()
    ours.load_state_dict(bn.state_dict())
    return (run(copy.deepcopy(bn), F.relu6, torch.float64),
            run(copy.deepcopy(bn), F.relu6, torch.float32), run(ours, lambda y: y, torch.float32))


def test_bn_relu6_grads_within_torch_fp32_error():
    """issue 17: the per-channel sums of the BN backward (and statistics) over N*H*W values were
    added row after row in one program (the interpreter's ``tl.sum`` over axis 0): bias grads
    7-14x further from fp64 than torch fp32's. Now a pairwise tree (``pairwise_sum0``)."""
    ref, t32, ours = _depthwise_bn_relu6_grads((4, 4, 32, 32), 0)
    for want, torch_fp32, got in zip(ref, t32, ours):
        assert (got - want).abs().max() <= 1.5 * (torch_fp32 - want).abs().max()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cls,shape", [(tilefuse.nn.BatchNormAct2d, (4, 6, 5, 5)),
                                       (tilefuse.nn.BatchNormAct1d, (5, 6, 7)),
                                       (tilefuse.nn.BatchNormAct1d, (9, 6))])
def test_float64_is_float64_accurate(cls, shape, training):
    """fp64 statistics stay fp64 (they were saved as fp32: input gradients and eval outputs only
    fp32-accurate)."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls.__name__.replace("Act", ""))(6, dtype=torch.float64)
    with torch.no_grad():
        for t in (ref.weight, ref.bias, ref.running_mean):
            t.normal_()
        ref.running_var.uniform_(0.5, 2.0)
    ours = cls(6, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    ref.train(training), ours.train(training)
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    g = torch.randn(*shape, dtype=torch.float64)
    y_ref, y = ref(x), ours(x)
    want = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
    got = torch.autograd.grad(y, (x, ours.weight, ours.bias), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 0)])
def test_empty_batch_as_torch(shape, training):
    """A zero-size batch returns an empty output (train and eval) and leaves the running stats
    (torch still counts the batch in num_batches_tracked); it used to raise in training."""
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.running_mean.fill_(0.5), ref.running_var.fill_(2.0)
    ours = tilefuse.nn.BatchNormAct2d(3, activation="relu")
    ours.load_state_dict(ref.state_dict())
    ref.train(training), ours.train(training)
    x = torch.randn(*shape, requires_grad=True)
    y_ref, y = torch.relu(ref(x)), ours(x)
    assert y.shape == y_ref.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(ours.weight.grad, torch.zeros(3))
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    with pytest.raises(ValueError, match="more than 1 value"):  # one value: torch raises too
        ops.batch_norm_act(torch.randn(1, 3), None, None, training=True)

"""Fused GroupNorm / InstanceNorm + activation: fwd and bwd vs fp64 torch."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse import ops
from tilefuse.activations import ACTIVATIONS, torch_activation
from test_norm_helpers import check_fwd_bwd


def _ref(G, act="none", eps=1e-5):
    p = ACTIVATIONS[act][1]
    return lambda x, weight=None, bias=None: torch_activation(
        F.group_norm(x, G, weight, bias, eps), act, p)


def _ours(G, act="none", eps=1e-5):
    return lambda x, weight=None, bias=None: ops.group_norm_act(x, G, weight, bias, eps,
                                                                activation=act)


@pytest.mark.parametrize("shape,G,act", [
    ((2, 6, 5, 5), 3, "silu"),        # NCHW, primes in space
    ((1, 4, 7), 2, "gelu"),           # 1 sample, 3-D input
    ((2, 6, 3, 3), 6, "relu"),        # InstanceNorm: groups of one channel
    ((3, 5), 1, "tanh"),              # 2-D input, one group
])
def test_shapes(shape, G, act):
    C = shape[1]
    x = torch.randn(*shape) * 2 + 4
    check_fwd_bwd(_ours(G, act), _ref(G, act),
                  dict(x=x, weight=torch.randn(C), bias=torch.randn(C)))


@pytest.mark.parametrize("G", [2, 4])
def test_channels_last_kept(G):
    x = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    out = check_fwd_bwd(_ours(G, "gelu_tanh"), _ref(G, "gelu_tanh"),
                        dict(x=x, weight=torch.randn(4), bias=torch.randn(4)))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_every_activation_instance_norm_no_affine():
    x = torch.randn(2, 3, 4, 4)
    for act in sorted(ACTIVATIONS):
        check_fwd_bwd(_ours(3, act), _ref(3, act), dict(x=x), grad=act in ("leaky_relu", "gelu"))


def test_non_contiguous_and_large_group():
    x = torch.randn(2, 8, 9, 12)[:, :, ::3, 1::2]   # sliced spatial dims (a copy is documented)
    check_fwd_bwd(_ours(2, "leaky_relu"), _ref(2, "leaky_relu"),
                  dict(x=x, weight=torch.randn(8), bias=None))
    # a group (64 channels x 80) larger than one [BLOCK_C, BLOCK_S] tile of 4096
    x = torch.randn(1, 64, 80) + 20.0
    check_fwd_bwd(_ours(1, "silu"), _ref(1, "silu"),
                  dict(x=x, weight=torch.randn(64), bias=torch.randn(64)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    check_fwd_bwd(_ours(2, "relu"), _ref(2, "relu"),
                  dict(x=x, weight=torch.randn(4, dtype=dtype), bias=torch.randn(4, dtype=dtype)),
                  eager_dtype=torch.float32)


def test_empty_batch():
    x = torch.randn(0, 4, 3, 3)
    assert ops.group_norm_act(x, 2, activation="relu").shape == x.shape


@pytest.mark.parametrize("bad", ["groups", "weight", "type"])
def test_bad_inputs(bad):
    x = torch.randn(2, 6, 4)
    with pytest.raises((ValueError, TypeError)) as exc:
        if bad == "groups":
            ops.group_norm_act(x, 4)
        elif bad == "weight":
            ops.group_norm_act(x, 3, weight=torch.randn(5))
        else:
            ops.group_norm_act(x, 2.0)
    assert ("num_groups" if bad != "weight" else "weight") in str(exc.value)


def _fp64_module_pair(kind, training):
    d = torch.float64
    if kind == "group":
        ref, ours = torch.nn.GroupNorm(3, 6, dtype=d), tilefuse.nn.GroupNormAct(3, 6, dtype=d)
    else:
        kw = dict(affine=True, track_running_stats=True, dtype=d)
        ref, ours = torch.nn.InstanceNorm2d(6, **kw), tilefuse.nn.InstanceNormAct2d(6, **kw)
    with torch.no_grad():
        for t in ref.parameters():
            t.normal_()
        if kind != "group":
            ref.running_mean.normal_(), ref.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict())
    return ref.train(training), ours.train(training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["group", "instance"])
def test_float64_is_float64_accurate(kind, training):
    """fp64 statistics stay fp64 (they were saved as fp32, and dw/db summed to fp32): outputs,
    gradients and InstanceNorm running stats as accurate as torch's fp64."""
    torch.manual_seed(0)
    ref, ours = _fp64_module_pair(kind, training)
    x = (torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 2).requires_grad_()
    g = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    y_ref, y = ref(x), ours(x)
    want = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
    got = torch.autograd.grad(y, (x, ours.weight, ours.bias), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (2, 6, 0)])
def test_empty_batch_as_torch(shape):
    ref, ours = torch.nn.GroupNorm(3, 6), tilefuse.nn.GroupNormAct(3, 6, activation="silu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    y = ours(x)
    assert y.shape == torch.nn.functional.silu(ref(x)).shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(ours.weight.grad, torch.zeros(6))


@pytest.mark.parametrize("cl", [False, True])
def test_split_statistics_chan_merge(cl, monkeypatch):
    """Batch 1, few groups: the statistics grid splits each group's S into slices sized by the
    SM count (a pseudo-device here) and the apply pass merges them (Chan, large mean)."""
    import tilefuse.kernels.norm_group as kg

    monkeypatch.setattr(kg, "INTERP_TILE", 64)
    monkeypatch.setattr(kg, "SMALL_TILE", 0)  # (a group of 2 x 300 fits the one-launch tile)
    tilefuse.kernels.clear_launch_caches()  # (no launch bound before the patch)
    assert kg._geometry(1, 4, 300, 2, torch.device("cpu"))[1] > 1
    x = torch.randn(1, 4, 15, 20) * 0.5 + 300.0
    if cl:
        x = x.to(memory_format=torch.channels_last)
    check_fwd_bwd(_ours(2, "silu"), _ref(2, "silu"),
                  dict(x=x, weight=torch.randn(4), bias=torch.randn(4)))


@pytest.mark.parametrize("shape,G,tile", [((2, 6, 5, 4), 3, None), ((1, 12, 9, 7), 4, 64),
                                          ((2, 5, 3, 3), 5, None)])
def test_channels_last_statistics_read_rows_of_channels(shape, G, tile, monkeypatch):
    """channels_last: the statistics kernel reads [BLOCK_S, C] tiles (channels innermost) and
    reduces per group (G not a power of two, C not a multiple of it in padding, split slices)."""
    import tilefuse.kernels.norm_group as kg

    if tile:
        monkeypatch.setattr(kg, "INTERP_TILE", tile)
        monkeypatch.setattr(kg, "CL_SLICE_BYTES", 8)
    monkeypatch.setattr(kg, "SMALL_TILE", 0)  # the channels_last kernels, not the one-launch
    tilefuse.kernels.clear_launch_caches()  # (no launch bound before the patch)
    x = (torch.randn(*shape) * 0.5 + 50.0).to(memory_format=torch.channels_last)
    N, C = shape[:2]
    assert kg._cl_stats(x.reshape(N, C, -1), G)
    if tile:
        assert kg._geometry(N, C, shape[2] * shape[3], G, x.device, True)[1] > 1
    out = check_fwd_bwd(_ours(G, "gelu"), _ref(G, "gelu"),
                        dict(x=x, weight=torch.randn(C), bias=torch.randn(C)))
    assert out.is_contiguous(memory_format=torch.channels_last)

"""Fused GroupNorm / InstanceNorm + activation: fwd and bwd vs fp64 torch."""
import pytest
import torch
import torch.nn.functional as F

from tilefuse import ops
from tilefuse.activations import ACTIVATIONS, torch_activation
from tests.test_norm_helpers import check_fwd_bwd


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

"""BatchNorm folding helpers (issue 5): fold_batchnorm / fuse_conv_bn_eval."""
import pytest
import torch
from torch import nn

import tilefuse
from tilefuse.nn import fold_batchnorm, fuse_conv_bn_eval
from utils import assert_close_to_ref


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize("cin,cout,groups,bias", [(4, 8, 4, True), (3, 3, 3, False),
                                                  (4, 6, 2, True)])
def test_fuse_equivalence_conv_bn_act(cin, cout, groups, bias):
    conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, groups=groups, bias=bias)
    bn = _bn(cout)
    x = torch.randn(2, cin, 7, 9)
    fused = fuse_conv_bn_eval(conv, bn, activation="silu")
    depthwise = groups == cin
    assert isinstance(fused, tilefuse.nn.DepthwiseConv2d if depthwise else nn.Sequential)
    with torch.no_grad():
        y = fused(x)
        y64 = nn.functional.silu(bn.double()(conv.double()(x.double())))
        eager = nn.functional.silu(bn.float()(conv.float()(x)))
    assert_close_to_ref(y, y64, eager)


def test_fold_batchnorm_values_and_no_mutation():
    conv, bn = nn.Conv2d(4, 4, 3, groups=4, bias=False), _bn(4)
    before = conv.weight.detach().clone()
    w, b = fold_batchnorm(conv, bn)
    assert w.shape == conv.weight.shape and b.shape == (4,)
    assert torch.equal(conv.weight, before) and conv.bias is None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(b, bn.bias - bn.running_mean * scale)
    plain = fuse_conv_bn_eval(nn.Conv2d(4, 4, 1), _bn(4))
    assert type(plain) is nn.Conv2d


def test_fold_errors():
    with pytest.raises(ValueError, match="num_features"):
        fold_batchnorm(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorm(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(TypeError, match="BatchNorm2d"):
        fold_batchnorm(nn.Conv2d(4, 4, 3), nn.LayerNorm(4))

"""tilefuse.nn.DepthwiseConv2d / DepthwiseSeparableConv2d (issue 5)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilefuse
from utils import assert_close_to_ref


def test_depthwise_module_is_drop_in():
    ref = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4)
    m = tilefuse.nn.DepthwiseConv2d(4, 8, 3, stride=2, padding=1, activation="relu6")
    assert isinstance(m, nn.Conv2d)
    assert m.state_dict().keys() == ref.state_dict().keys()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 9, 7, requires_grad=True)
    y = m(x)
    y.sum().backward()
    y64 = F.relu6(F.conv2d(x.double(), ref.weight.double(), ref.bias.double(), 2, 1, 1, 4))
    assert_close_to_ref(y, y64, F.relu6(ref(x)))
    assert m.weight.grad.shape == m.weight.shape and x.grad.shape == x.shape
    assert "activation=relu6" in repr(m)


def test_depthwise_module_padding_mode_and_residual():
    ref = nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="reflect")
    m = tilefuse.nn.DepthwiseConv2d(3, 3, 3, padding=1, padding_mode="reflect")
    m.load_state_dict(ref.state_dict())
    x, r = torch.randn(1, 3, 6, 5), torch.randn(1, 3, 6, 5)
    y = m(x, residual=r)
    y64 = ref.double()(x.double()) + r.double()
    assert_close_to_ref(y, y64, ref.float()(x) + r)


def test_depthwise_module_refuses_non_depthwise():
    with pytest.raises(ValueError, match="not depthwise"):
        tilefuse.nn.DepthwiseConv2d(4, 8, 3, groups=2)
    with pytest.raises(ValueError, match="multiple of in_channels"):
        tilefuse.nn.DepthwiseConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="not depthwise"):
        tilefuse.nn.DepthwiseConv2d.from_torch(nn.Conv2d(4, 4, 3))


def _randomize_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)


def _separable_ref(blk, x):
    """torch composition of the same block, in x's dtype."""
    dw = blk.depthwise
    y = F.conv2d(x, dw.weight.to(x.dtype), None, dw.stride, dw.padding, dw.dilation, dw.groups)
    y = F.relu6(blk.bn_dw.to(x.dtype)(y))
    return blk.bn_pw.to(x.dtype)(F.conv2d(y, blk.pointwise.weight.to(x.dtype)))


def test_separable_eval_folds_bn_and_matches():
    blk = tilefuse.nn.DepthwiseSeparableConv2d(6, 10, 3, stride=2).eval()
    _randomize_bn(blk.bn_dw)
    _randomize_bn(blk.bn_pw)
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        y = blk(x)
        fused = blk.fuse()
        y2 = fused(x)
        y64 = _separable_ref(blk.double(), x.double())
        eager = _separable_ref(blk.float(), x)
    assert y.shape == (2, 10, 5, 4) and y.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_ref(y, y64, eager)
    assert_close_to_ref(y2, y64, eager)
    assert isinstance(fused.bn_dw, nn.Identity)


def test_separable_train_backward():
    blk = tilefuse.nn.DepthwiseSeparableConv2d(4, 6, 5, pointwise_activation="relu")
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    y = blk(x)
    assert y.shape == (2, 6, 7, 7)
    y.square().sum().backward()
    for p in (blk.depthwise.weight, blk.pointwise.weight, blk.bn_dw.weight, x):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # same gradients as the torch composition (BN with batch statistics)
    ref = tilefuse.nn.DepthwiseSeparableConv2d(4, 6, 5, pointwise_activation="relu")
    ref.load_state_dict(blk.state_dict())
    x2 = x.detach().requires_grad_()
    dw = ref.depthwise
    h = F.relu6(ref.bn_dw(F.conv2d(x2, dw.weight, None, 1, dw.padding, 1, 4)))
    F.relu(ref.bn_pw(F.conv2d(h, ref.pointwise.weight))).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(blk.depthwise.weight.grad, dw.weight.grad, rtol=1e-4, atol=1e-4)

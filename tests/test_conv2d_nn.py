"""tilefuse.nn.Conv2d (issue 20): drop-in for torch.nn.Conv2d (constructor, state_dict,
parametrizations, padding modes), fused activation / residual, and from_torch with a folded BN."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tilefuse
from utils import assert_close_to_ref

Conv2d = tilefuse.nn.Conv2d


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.Conv2d(**kw).double()
    ours = Conv2d(**kw).double()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def test_is_a_torch_conv_with_the_same_state_dict():
    m = Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False, activation="relu")
    assert isinstance(m, nn.Conv2d)
    assert list(m.state_dict()) == list(nn.Conv2d(4, 6, 3, bias=False).state_dict())
    assert "activation=relu" in repr(m) and "groups=2" in repr(m)
    assert "post_activation" in repr(Conv2d(2, 2, 1, post_activation=("leaky_relu", 0.2)))


@pytest.mark.parametrize("kw", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=(3, 2), stride=2, groups=2, bias=False),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="same", dilation=2),
])
def test_forward_backward_match_torch(kw):
    ours, ref = _pair(**kw)
    x = torch.randn(2, kw["in_channels"], 7, 6, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert_close_to_ref(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert_close_to_ref(xa.grad, xb.grad)
    for (name, pa), pb in zip(ours.named_parameters(), ref.parameters()):
        assert_close_to_ref(pa.grad, pb.grad, name=name)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes(mode):
    ours, ref = _pair(in_channels=2, out_channels=3, kernel_size=3, padding=(1, 2),
                      padding_mode=mode)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    assert_close_to_ref(ours(x), ref(x))


def test_activation_residual_and_post_activation():
    ours, ref = _pair(in_channels=3, out_channels=3, kernel_size=3, padding=1)
    ours.activation, ours.post_activation = ("silu", 0.0), ("relu", 0.0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    r = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert_close_to_ref(ours(x, residual=r), F.relu(F.silu(ref(x)) + r))


def test_weight_norm_and_parametrizations_are_read_in_forward():
    from torch.nn.utils import parametrizations, parametrize

    ours, ref = _pair(in_channels=2, out_channels=4, kernel_size=3)
    ours = parametrizations.weight_norm(ours)
    ref = parametrizations.weight_norm(ref)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert_close_to_ref(ours(x), ref(x))
    ours(x).sum().backward()
    assert ours.parametrizations.weight.original0.grad is not None

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    m = Conv2d(2, 4, 1).double()
    expected = F.conv2d(x, 2 * m.weight.detach(), m.bias.detach())
    parametrize.register_parametrization(m, "weight", Double())
    assert_close_to_ref(m(x), expected)


@pytest.mark.parametrize("cl", [False, True])
def test_from_torch_folds_an_eval_batchnorm(cl):
    torch.manual_seed(3)
    conv, bn = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False).double(), \
        nn.BatchNorm2d(6).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    fused = Conv2d.from_torch(conv, bn, activation="relu6")
    assert isinstance(fused, Conv2d) and fused.bias is not None
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_close_to_ref(fused(x), F.relu6(bn(conv(x))))
    shared = Conv2d.from_torch(conv)                       # no BN: parameters shared
    assert shared.weight is conv.weight and shared.bias is None
    assert_close_to_ref(shared(x), conv(x))
    plain = fused.to_torch()
    assert_close_to_ref(plain(x), fused(x))


def test_from_torch_refuses_training_bn_and_non_convs():
    conv = nn.Conv2d(2, 2, 1)
    with pytest.raises(ValueError, match="training"):
        Conv2d.from_torch(conv, nn.BatchNorm2d(2))
    with pytest.raises(TypeError, match="conv"):
        Conv2d.from_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="bn"):
        Conv2d.from_torch(conv, nn.LayerNorm(2))


def test_compiles_fullgraph():
    m = Conv2d(3, 4, 3, padding=1, activation="gelu").eval()
    x = torch.randn(1, 3, 5, 5)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m, fullgraph=True, backend="eager")(x)
        assert torch.equal(out, m(x))

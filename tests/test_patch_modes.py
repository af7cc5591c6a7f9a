"""tilefuse.patch: an eval-patched (BN-folded) model switched to train(), the report of declined
matches, and Hugging Face activation classes recognised by name (transformers not needed)."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefuse
from tilefuse.patch import rules as R
from tilefuse.activations import activation_from_module, torch_activation

from test_patch import _compare


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")


def _cnn():
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU6(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def test_eval_patched_model_trains_like_the_unpatched_one(torch_backend):
    ref = _cnn()
    x = torch.randn(4, 3, 6, 6)
    fused = tilefuse.patch(ref)
    folded_keys = fused.state_dict().keys()
    assert isinstance(fused[1], nn.Identity) and "1.running_mean" not in folded_keys
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match=r"1 \(and 1 other folded BatchNorm2d\) was patched in "
                                         r"eval mode.*tilefuse.unpatch\(model\).*train mode"):
        fused.train()
    # the original Conv2d + BatchNorm2d are back in the tree: same parameters, keys, semantics
    assert type(fused[0]) is nn.Conv2d and type(fused[3]) is nn.Conv2d
    assert fused.state_dict().keys() == ref.state_dict().keys()
    ref.train()
    _compare(ref, fused, (x,))  # batch statistics: outputs and every gradient match
    for k, v in ref.state_dict().items():  # running stats updated identically
        torch.testing.assert_close(fused.state_dict()[k], v)
    for m in (ref, fused):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    ref.eval(), fused.eval()  # re-folded from the trained weights and updated statistics
    assert fused.state_dict().keys() == folded_keys and isinstance(fused[3], R.fused_class(
        "DepthwiseConv2d") or nn.Conv2d)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per patched model
        fused.train()
        fused.eval()
    clone = copy.deepcopy(fused).train()  # the copy restores its own conv + BN
    torch.testing.assert_close(clone(x), copy.deepcopy(ref).train()(x))
    assert clone[0] is not fused[0] and clone[0].weight is not fused[0].weight
    tilefuse.unpatch(fused)  # round-trips with the trained values
    assert type(fused[1]) is nn.BatchNorm2d and type(fused[5]) is nn.ReLU6
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v)
    torch.testing.assert_close(fused.eval()(x), ref.eval()(x))


class _Declines(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)       # -> GELU, but its output is also used by the add
        self.twice = nn.Linear(4, 4)     # called at two places, each -> ReLU
        self.hs = nn.Linear(4, 4)        # -> Hardswish: no kernel
        self.act, self.hardswish = nn.GELU(), nn.Hardswish()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.lin(x)
        y = self.act(h) + h
        y = F.relu(self.twice(F.relu(self.twice(y))))
        y = self.hardswish(self.hs(y))
        return F.gelu(self.bn(self.conv(y[:, :, None, None])))  # functional, not idempotent


def test_report_lists_declined_matches():
    m = tilefuse.patch(_Declines().eval())
    rep = tilefuse.patch_report(m)
    why = dict(rep.left_alone)
    assert "Linear -> gelu: not fused, the Linear output is also used elsewhere" in why["lin"]
    assert "called at 2 places" in why["twice"]
    assert "no fused kernel for Hardswish" in why["hs"]
    assert "folded Conv2d -> gelu: activation is functional and not idempotent, not absorbed" \
        in why["conv"]
    assert "bn" not in why and "conv" in dict(rep.replaced)
    assert f"{len(rep.left_alone)} left alone" in str(rep) and len(rep.left_alone) == 4
    x = torch.randn(2, 4)
    torch.testing.assert_close(m(x), _Declines.forward(m, x))


# Hugging Face transformers.activations, re-written here (same class names, same formulas)
class GELUActivation(nn.Module):
    def forward(self, x):
        return F.gelu(x)


class NewGELUActivation(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class FastGELUActivation(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


class GELUTanh(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class SiLUActivation(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class QuickGELUActivation(nn.Module):  # x * sigmoid(1.702 x): no kernel, must not be mapped
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


for _cls in (GELUActivation, NewGELUActivation, FastGELUActivation, GELUTanh, SiLUActivation,
             QuickGELUActivation):
    _cls.__module__ = "transformers.activations"  # matched by name only inside transformers


class _UserSiLU(nn.Module):  # a user's own class with an HF name but other math: never mapped
    def forward(self, x):
        return x * torch.sigmoid(2 * x)


_UserSiLU.__name__ = _UserSiLU.__qualname__ = "SiLUActivation"


def test_hugging_face_activations_by_class_name():
    with pytest.raises(ValueError, match="SiLUActivation"):
        activation_from_module(_UserSiLU())
    x = torch.randn(1000) * 4
    for cls, name in ((GELUActivation, "gelu"), (NewGELUActivation, "gelu_tanh"),
                      (FastGELUActivation, "gelu_tanh"), (GELUTanh, "gelu_tanh"),
                      (SiLUActivation, "silu")):
        assert activation_from_module(cls()) == (name, 0.0)
        torch.testing.assert_close(torch_activation(x, name), cls()(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="QuickGELUActivation"):
        activation_from_module(QuickGELUActivation())
    ref = nn.Sequential(nn.Linear(8, 8), NewGELUActivation(), nn.Linear(8, 2))
    fused = tilefuse.patch(ref)  # a leaf for the tracer: one call_module node, absorbed
    assert fused[0].activation == "gelu_tanh" and isinstance(fused[1], nn.Identity)
    _compare(ref, fused, (torch.randn(3, 8),))


def test_folded_weights_changed_after_patch_stay_folded_with_warning():
    """A checkpoint loaded into an eval-patched model: train() must not bring back the stale
    patch-time conv/BN (the BN statistics cannot be recovered from folded weights)."""
    def block():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()

    a = tilefuse.patch(block())
    src = block()
    with torch.no_grad():
        src[1].running_mean.uniform_()
        src[1].running_var.uniform_(0.5, 2.0)
    b = tilefuse.patch(src)
    a.load_state_dict(b.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="stays folded"):
        a.train()
    a.eval()
    torch.testing.assert_close(a(x), b(x))

"""tilefuse.patch on modules torch.fx cannot trace: plain-words reasons, untraceable sub-modules
traced around (one opaque call), and Conv2d -> BatchNorm2d folded by module structure (the
Hugging Face MobileNetV2ConvLayer shape, without transformers)."""
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefuse
from tilefuse.patch import rules as R


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")


def _random_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class TFConvLayer(nn.Module):
    """HF MobileNetV2ConvLayer's shape: TF "SAME" padding computed with int() on the input size
    (not fx-traceable), then conv -> bn -> act."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=True):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, k, stride=stride, groups=groups, bias=False)
        self.normalization = _random_bn(nn.BatchNorm2d(cout))
        self.activation = nn.ReLU6() if act else None

    def forward(self, x):
        k, s = self.convolution.kernel_size[0], self.convolution.stride[0]
        size = int(x.shape[-1])
        pad = max(k - (s if size % s == 0 else size % s), 0)
        x = self.convolution(F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)))
        x = self.normalization(x)
        return self.activation(x) if self.activation is not None else x


class NotThePattern(nn.Module):
    """conv + bn children, but the BN normalizes the *input*: must never be folded."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = _random_bn(nn.BatchNorm2d(c))

    def forward(self, x):
        if int(x.shape[-1]) < 0:
            raise ValueError
        return self.conv(x) + self.bn(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = TFConvLayer(3, 8, stride=2)
        self.dw = TFConvLayer(8, 8, groups=8)
        self.project = TFConvLayer(8, 4, k=1, act=False)
        self.odd = NotThePattern(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.GELU(),
                                  nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.odd(self.project(self.dw(self.stem(x)))))


def test_untraceable_conv_layers_fold_by_structure(torch_backend):
    # issue 14 item 12: Conv-BN pairs inside modules fx cannot trace were never folded
    ref = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    fused = tilefuse.patch(ref)
    rep = tilefuse.patch_report(fused)
    done = dict(rep.replaced)
    for name in ("stem", "dw", "project"):
        assert isinstance(getattr(fused, name).normalization, R.FoldedBatchNorm), name
        assert "matched by module structure" in done[f"{name}.convolution"]
    dw = R.fused_class("DepthwiseConv2d")
    if dw is not None:  # the depthwise conv also absorbs the ReLU6 it is followed by
        assert isinstance(fused.dw.convolution, dw) and fused.dw.convolution.activation == "relu6"
        assert isinstance(fused.dw.activation, nn.Identity)
    # the root traces around the untraceable blocks: Linear -> GELU in its head is fused
    assert "Linear(activation='gelu')" in done["head.1"]
    # conv + bn children whose forward is not conv -> bn: left alone, with the reason
    assert type(fused.odd.bn) is nn.BatchNorm2d
    why = dict(rep.left_alone)["odd"]
    assert "not folded by module structure: bn is not applied to the output of conv" in why
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    restored = tilefuse.unpatch(fused)
    assert type(restored.stem.normalization) is nn.BatchNorm2d
    with torch.no_grad():
        torch.testing.assert_close(restored(x), ref(x))


class _Iterates(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.GELU()

    def forward(self, x):
        return torch.stack([self.act(self.lin(row)) for row in x])


def _passes_kwargs(fn):  # a decorator like Hugging Face's @deprecate_kwarg
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class _Variadic(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @_passes_kwargs
    def forward(self, x, mask=None, **kwargs):
        return self.lin(x)


@pytest.mark.parametrize("module,plain", [
    (_Iterates(), "loops over or unpacks a tensor"),
    (_Variadic(), "takes *args/**kwargs"),  # only as the root: a parent passes explicit args
    (TFConvLayer(3, 3, act=False).train(), "into a Python number with int()"),
])
def test_untraceable_reasons_are_plain_words(torch_backend, module, plain):
    # issue 14 item 12: reasons were fx internals ("code: co_varnames is too small",
    # "'Proxy' object ...") cut mid-sentence ("... used in a loop or)")
    root = module if isinstance(module, _Variadic) else nn.Sequential(module)
    rep = tilefuse.patch_report(tilefuse.patch(root))
    why = " ".join(d for _, d in rep.left_alone)
    assert f"{type(module).__name__} is not fx-traceable: its forward" in why and plain in why
    assert "they would be with" in why  # what would make it traceable
    for internal in ("co_varnames", "Proxy", "symbolically traced"):
        assert internal not in why
    assert "Sequential" not in why  # the parent traces around it (one opaque call)

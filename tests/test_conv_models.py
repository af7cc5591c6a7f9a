"""CNNs on tilefuse's dense conv (issue 20): ``tilefuse.patch`` turns every dense conv into
``tilefuse.nn.Conv2d`` (eval: BN folded, activation absorbed, ``bn -> add -> act`` in the conv's
epilogue; train: parameters shared, BN as ``BatchNormAct2d``), depthwise convs stay on the
depthwise kernel.

Eval: the patched model runs with no aten convolution left (counted with a TorchDispatchMode) and
matches the unpatched model within fp32 error; the kernels run in the Triton interpreter.
Train: loss and every gradient within a tolerance tied to torch fp32's own error against an fp64
run. The torchvision-style ResNet runs the kernels in the fast lane; ResNet-50 / EfficientNet-B0
/ MobileNetV2 run the train check on the torch backend there (the rewrite) and in the
interpreter in the slow lane (tiny widths and 16x16 inputs keep the interpreter affordable)."""
import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tilefuse
import tilefuse.models as M
from fuzz_utils import check
from tilefuse.patch import rules as R


# ---------------------------------------------------------------- a torchvision-style ResNet
class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: one ReLU module called twice, ``out += identity``."""

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet layout (7x7/2 stem, maxpool, ``_make_layer`` with a strided 1x1
    downsample), two stages of basic blocks."""

    def __init__(self, layers=(1, 1), width=4, classes=5):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs: OpenMP threads only spin on a busy 2-core CI box (10x slower torch convs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConvCounter(TorchDispatchMode):
    """Counts aten convolution ops (convolution, _convolution, cudnn/mkldnn/slow conv, their
    backward) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "conv" in name:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


MODELS = {
    "torchvision_resnet": lambda: TorchvisionResNet(),
    "resnet50": lambda: M.resnet50(10, width=0.0625, fused=False),
    "efficientnet_b0": lambda: M.efficientnet_b0(10, width_mult=0.25, fused=False,
                                                 stochastic_depth_prob=0.0),
    "mobilenet_v2": lambda: M.mobilenet_v2(10, width_mult=0.25, fused=False),
}
RESIDUAL = {"torchvision_resnet": 2, "resnet50": 16, "mobilenet_v2": 11, "efficientnet_b0": 0}


def _convs(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _k(model):
    """The longest reduction of any conv: in_channels/groups * kh * kw."""
    return max(m.weight[0].numel() for _, m in _convs(model))


# ---------------------------------------------------------------- eval
@pytest.mark.parametrize("name", list(MODELS))
def test_eval_patched_cnn_runs_no_aten_conv(name):
    ref = _no_dropout(_randomize_bn(MODELS[name]())).eval()
    x = torch.randn(1, 3, 16, 16)
    fused = tilefuse.patch(ref)
    rep = tilefuse.patch_report(fused)
    convs = _convs(fused)
    assert convs and all(R.is_tilefuse(m) for _, m in convs), [n for n, m in convs
                                                               if not R.is_tilefuse(m)]
    dense = [m for _, m in convs if type(m) is tilefuse.nn.Conv2d]
    assert dense and not any("not absorbed" in why for _, why in rep.left_alone), rep
    assert sum("add(residual)" in d for _, d in rep.replaced) == RESIDUAL[name], rep
    if name in ("torchvision_resnet", "resnet50"):  # relu(bn(conv(x)) + identity): one kernel
        assert sum(m.post_activation == ("relu", 0.0) for m in dense) == RESIDUAL[name]
    counter = ConvCounter()
    with torch.no_grad(), counter:
        y = fused(x)
    assert counter.calls == {}, counter.calls
    with torch.no_grad():
        want = ref(x)
        ref64 = copy.deepcopy(ref).double()(x.double())
    check(f"{name} eval", y, ref64, want, n_reduce=_k(ref))
    # unpatch restores exactly: module types, values, the class forwards
    types = [(n, type(m)) for n, m in ref.named_modules()]
    tilefuse.unpatch(fused)
    assert [(n, type(m)) for n, m in fused.named_modules()] == types
    assert all("forward" not in m.__dict__ for m in fused.modules())
    for k, v in ref.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k


def test_eval_residual_block_is_one_conv_call():
    """torchvision's ``relu(bn2(conv2(x)) + identity)`` (shared ReLU, ``+=``): conv2 becomes
    ``Conv2d(post_activation='relu')`` called with the residual; the eval-patched model switched
    to ``train()`` runs the original conv + BN (the rewritten forward falls back)."""
    ref = _randomize_bn(TorchvisionResNet()).eval()
    fused = tilefuse.patch(ref)
    blk = fused.layer2[0]
    assert type(blk.conv2) is tilefuse.nn.Conv2d and blk.conv2.post_activation == ("relu", 0.0)
    assert blk.conv1.activation == ("relu", 0.0) and isinstance(blk.bn2, R.FoldedBatchNorm)
    assert type(blk.downsample[0]) is tilefuse.nn.Conv2d  # strided 1x1, BN folded
    assert "forward" in blk.__dict__ and "conv_bn_add(" in inspect.getsource(blk.forward)
    calls = []
    blk.conv2.register_forward_hook(lambda m, args, out: calls.append(len(args)))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-4)
    assert calls == [2]  # conv2(x, residual)
    with pytest.warns(UserWarning, match="patched in eval mode"):
        fused.train()
    ref.train()
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-4)
    fused.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-4)


def test_conv_act_and_functional_relu_after_folded_bn():
    """conv -> act without BN: activation absorbed into Conv2d (train and eval); a functional
    ReLU after a folded BN is absorbed and kept in place (idempotent)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.SiLU()
            self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(self.bn(self.b(self.act(self.a(x)))))

    ref = _randomize_bn(Net()).eval()
    x = torch.randn(2, 3, 6, 6)
    for mode in ("train", "eval"):
        getattr(ref, mode)()
        fused = tilefuse.patch(ref)
        assert type(fused.a) is tilefuse.nn.Conv2d and fused.a.activation == ("silu", 0.0)
        assert isinstance(fused.act, nn.Identity)
        if mode == "eval":
            assert fused.b.activation == ("relu", 0.0) and isinstance(fused.bn, R.FoldedBatchNorm)
        else:
            inplace = copy.deepcopy(ref)
            w = inplace.b.weight
            tilefuse.patch(inplace, inplace=True)
            assert type(inplace.b) is tilefuse.nn.Conv2d and inplace.b.weight is w  # shared
            assert type(fused.bn) is tilefuse.nn.BatchNormAct2d  # F.relu idempotent: kept too
            assert fused.state_dict().keys() == ref.state_dict().keys()
        torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-4)


def test_conv_rule_leaves_depthwise_and_blocked_convs():
    seq = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1, groups=2),
                        nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1)),
                        nn.Conv2d(8, 8, 1))
    seq[3].register_forward_pre_hook(lambda m, args: None)  # e.g. old-style weight_norm
    fused = tilefuse.patch(seq)
    assert type(fused[0]) is tilefuse.nn.DepthwiseConv2d
    assert type(fused[1]) is tilefuse.nn.Conv2d and fused[1].groups == 2  # grouped: dense kernel
    why = dict(tilefuse.patch_report(fused).left_alone)
    assert "Conv2d: not converted (parametrized weight)" in why["2"]
    assert "Conv2d: not converted (the module has forward hooks" in why["3"]
    partial = tilefuse.patch(seq, ops=[o for o in tilefuse.patch.ALL_OPS if o != "conv"])
    assert type(partial[1]) is nn.Conv2d
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(fused(x), seq(x), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- train
# MobileNetV2 at 16x16 normalises 1x1 maps of two samples in its last stages: gradients so
# ill-conditioned that fp32 torch itself is off by 1e3 there
TRAIN_SIZE = {"mobilenet_v2": 32}


def _train_check(name, interp, monkeypatch, batch=2):
    """Loss, every gradient and the running statistics vs fp64, tolerance tied to torch fp32's
    own error. (Deterministic: conftest seeds every test. A ReLU/ReLU6 input within fp32 rounding
    of its kink can flip between any two fp32 computations; these seeds have none.)"""
    size = TRAIN_SIZE.get(name, 16)
    if not interp:
        monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    ref = _no_dropout(MODELS[name]()).train()
    ref64 = copy.deepcopy(ref).double()
    fused = tilefuse.patch(ref)
    convs = _convs(fused)
    assert all(R.is_tilefuse(m) for _, m in convs)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    bns = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(type(m) is tilefuse.nn.BatchNormAct2d for m in bns)
    torch.manual_seed(0)  # the inputs do not depend on whether patch drew random numbers
    x = torch.randn(batch, 3, size, size)
    target = torch.randn(batch, 10 if name != "torchvision_resnet" else 5)
    losses = [F.mse_loss(m(x.to(dt)), target.to(dt))
              for m, dt in ((ref, torch.float32), (fused, torch.float32),
                            (ref64, torch.float64))]
    for loss in losses:
        loss.backward()
    n = _k(ref) * batch * size * size // 4
    check(f"{name} loss", losses[1].reshape(1), losses[2].detach().reshape(1),
          losses[0].detach().reshape(1), n_reduce=n)
    p32, pf, p64 = (dict(m.named_parameters()) for m in (ref, fused, ref64))
    assert p32.keys() == pf.keys()
    for k in p32:
        check(f"{name} grad {k}", pf[k].grad, p64[k].grad, p32[k].grad, n_reduce=n)
    sf, s32 = fused.state_dict(), ref.state_dict()
    for k, v in ref64.state_dict().items():  # running statistics updated the same way
        if v.is_floating_point():
            check(f"{name} {k}", sf[k], v, s32[k], n_reduce=n)


def test_train_torchvision_resnet_in_interpreter(monkeypatch):
    _train_check("torchvision_resnet", True, monkeypatch)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "mobilenet_v2"])
def test_train_rewrite_torch_backend(name, monkeypatch):
    _train_check(name, False, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "mobilenet_v2"])
def test_train_in_interpreter_slow(name, monkeypatch):
    # efficientnet_b0 at 16x16 reaches 1x1 maps: at batch 2 its BatchNorms normalise 2 values a
    # channel, whose backward cancels (1 - xhat^2 = eps / (var + eps)) and turns any ulp into
    # noise, torch fp32's included (its own error there moves 2.6x with oneDNN on or off), so a
    # tolerance tied to torch's error is a coin toss; batch 4 is well conditioned
    _train_check(name, True, monkeypatch, batch=4 if name == "efficientnet_b0" else 2)

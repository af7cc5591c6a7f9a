"""tilefuse.patch / unpatch on models nobody here wrote: torchvision-style ResNet and MobileNet
blocks and a Hugging-Face-BERT-style encoder, all written in this file with plain torch modules.

Small blocks run in the Triton interpreter (the real kernels); the whole-model comparisons run on
the torch backend (TILEFUSE_BACKEND=torch) to stay inside the CI time budget: they test the
rewrite, the kernels are tested by their own families."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefuse
from tilefuse.patch import rules as R


# ---------------------------------------------------------------- torchvision-style structures
class TVBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: ONE ReLU module called twice."""

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    def __init__(self, w=4, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(TVBasicBlock(w, w), TVBasicBlock(w, 2 * w, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tv_mobilenet_block(cin=4, hidden=8, cout=4):
    """torchvision InvertedResidual.conv: Conv2dNormActivation x2 (ReLU6) + linear projection."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()),
        nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False),
                      nn.BatchNorm2d(hidden), nn.ReLU6()),
        nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))


# ---------------------------------------------------------------- BERT-style (HF layout) encoder
class BertSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, mask):
        B, L, D = x.shape
        q, k, v = (m(x).view(B, L, self.h, D // self.h).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / (D // self.h) ** 0.5 + mask
        ctx = self.dropout(scores.softmax(-1)) @ v
        return ctx.transpose(1, 2).reshape(B, L, D)


class BertOutput(nn.Module):
    def __init__(self, din, d):
        super().__init__()
        self.dense = nn.Linear(din, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, h, inp):
        return self.LayerNorm(self.dropout(self.dense(h)) + inp)


class BertLayer(nn.Module):
    def __init__(self, d=16, heads=2, ffn=32):
        super().__init__()
        self.attention = BertSelfAttention(d, heads)
        self.attn_output = BertOutput(d, d)
        self.intermediate = nn.Sequential(nn.Linear(d, ffn), nn.GELU())
        self.output = BertOutput(ffn, d)

    def forward(self, x, mask):
        if mask.dim() != 4:  # data-dependent python control flow: not fx-traceable at the root
            raise ValueError("mask must be 4-D")
        h = self.attn_output(self.attention(x, mask), x)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, vocab=50, d=16, layers=2):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, d)
        self.emb_norm = nn.LayerNorm(d)
        self.layer = nn.ModuleList(BertLayer(d) for _ in range(layers))
        self.pooler = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, 3))

    def forward(self, ids, attention_mask):
        x = self.emb_norm(self.embeddings(ids))
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        if ids.shape[1] > 512:
            raise ValueError("too long")
        for layer in self.layer:
            x = layer(x, mask)
        return self.head(self.pooler(x[:, 0]))


def _no_dropout(m):
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m


def _compare(ref, fused, args, tol=1e-4):
    """Outputs and every parameter's gradient, relative to the largest of them."""
    w = None
    y_ref, y = ref(*args), fused(*args)
    w = torch.randn_like(y_ref)
    assert (y - y_ref).abs().max() <= tol * max(1.0, y_ref.abs().max().item())
    (y_ref * w).sum().backward()
    (y * w).sum().backward()
    pr, pf = dict(ref.named_parameters()), dict(fused.named_parameters())
    assert pr.keys() == pf.keys()
    scale = max(p.grad.abs().max().item() for p in pr.values() if p.grad is not None)
    for name in pr:
        gr, gf = pr[name].grad, pf[name].grad
        assert (gr is None) == (gf is None), name
        if gr is not None:
            assert (gr - gf).abs().max() <= tol * scale, name


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")


# ---------------------------------------------------------------- tests
def test_linear_act_block_runs_kernels_in_interpreter():
    ref = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    fused = tilefuse.patch(ref)
    assert isinstance(fused[0], tilefuse.nn.Linear) and fused[0].activation == "gelu"
    assert isinstance(fused[1], nn.Identity) and isinstance(fused[3], nn.Identity)
    assert type(ref[0]) is nn.Linear, "inplace=False must not touch the input model"
    _compare(ref, fused, (torch.randn(5, 8),))


def test_resnet_train_shared_relu_is_fused_and_kept(torch_backend):
    ref = TVResNet().train()
    fused = tilefuse.patch(ref)
    rep = tilefuse.patch_report(fused)
    paths = dict(rep.replaced)
    assert "layer1.0.bn1" in paths and "bn1" in paths
    if R.fused_class("BatchNormAct2d") is not None:
        assert isinstance(fused.layer1[0].bn1, R.fused_class("BatchNormAct2d"))
        # the shared ReLU module is called again after the residual add: it must stay
        assert isinstance(fused.layer1[0].relu, nn.ReLU)
        # relu(bn2(x) + identity): fx rewrites the block's forward to bn2(x, identity)
        assert "residual" in paths["layer1.0.bn2"] and "forward" in fused.layer1[0].__dict__
        assert type(fused.layer1[0]) is TVBasicBlock
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 8, 8)
    _compare(ref, fused, (x,))
    # running statistics are the shared buffers: both models updated them identically
    torch.testing.assert_close(fused.layer1[1].bn2.running_var, ref.layer1[1].bn2.running_var)
    clone = copy.deepcopy(fused)  # the instance-level forward survives a deep copy
    torch.testing.assert_close(clone.eval()(x), fused.eval()(x))
    tilefuse.unpatch(fused)
    assert "forward" not in fused.layer1[0].__dict__ and type(fused.layer1[0].bn2) is nn.BatchNorm2d
    torch.testing.assert_close(fused(x), ref.eval()(x))


def test_resnet_eval_folds_bn_and_unpatch_round_trips(torch_backend):
    ref = TVResNet().eval()
    with torch.no_grad():  # make BN non-trivial
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 8, 8)
    fused = tilefuse.patch(ref)
    assert isinstance(fused.layer1[0].bn2, nn.Identity)  # bn2 -> add: folded in eval anyway
    assert fused.layer1[0].conv2.bias is not None
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    tilefuse.unpatch(fused)
    assert type(fused.layer1[0].bn2) is nn.BatchNorm2d and not hasattr(fused, "_tilefuse_patch")
    assert fused.state_dict().keys() == before.keys()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, before[k])
    torch.testing.assert_close(fused(x), ref(x))


def test_mobilenet_block_depthwise_and_relu6(torch_backend):
    ref = tv_mobilenet_block().train()
    fused = tilefuse.patch(ref)
    dw = R.fused_class("DepthwiseConv2d")
    if dw is not None:
        assert isinstance(fused[1][0], dw)
    _compare(ref, fused, (torch.randn(2, 4, 6, 6),))
    fe = tilefuse.patch(ref.eval())
    if dw is not None:  # eval: BN folded into the depthwise conv, ReLU6 absorbed into it
        assert isinstance(fe[1][0], dw) and fe[1][0].activation == "relu6"
        assert isinstance(fe[1][2], nn.Identity)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(fe(x), ref(x), atol=1e-5, rtol=1e-5)


def test_bert_style_encoder_untraceable_root(torch_backend):
    ref = _no_dropout(BertEncoder()).train()
    fused = tilefuse.patch(ref)
    rep = tilefuse.patch_report(fused)
    why = " ".join(d for _, d in rep.left_alone)
    assert "not fx-traceable" in why                     # root and BertLayer have control flow
    paths = dict(rep.replaced)
    # BertOutput: LayerNorm(dropout(dense(h)) + inp) -> LayerNorm(dropout_add(dense(h), inp))
    assert "dropout_add" in paths["layer.0.output.dropout"]
    assert isinstance(fused.layer[0].output.dropout, R.DropoutAdd)
    assert "layer.0.intermediate.0" in paths              # Linear -> GELU found in a child graph
    assert isinstance(fused.layer[0].intermediate[0], tilefuse.nn.Linear)
    assert "pooler.0" in paths                            # Linear -> Tanh
    if R.fused_class("Dropout") is not None:
        assert isinstance(fused.layer[1].attention.dropout, R.fused_class("Dropout"))
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    _compare(ref, fused, (ids, mask))
    assert fused.state_dict().keys() == ref.state_dict().keys()
    ref2 = BertEncoder()
    ref2.load_state_dict(fused.state_dict())  # patched weights load into the torch model


def test_ops_subset_inplace_and_functional_activation():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return F.gelu(self.b(F.relu(self.a(x))))

    m = M()
    out = tilefuse.patch(m, ops=["dropout"], inplace=True)
    assert out is m and type(m.a) is nn.Linear
    tilefuse.unpatch(m)
    p = tilefuse.patch(M())
    rep = tilefuse.patch_report(p)
    assert dict(rep.replaced).keys() == {"a"}  # F.relu is idempotent: fused, call kept
    assert "functional and not idempotent" in dict(rep.left_alone)["b"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(p(x), F.gelu(p.b(F.relu(F.linear(x, p.a.weight, p.a.bias)))))


def test_bad_inputs():
    with pytest.raises(TypeError, match="model"):
        tilefuse.patch("resnet")
    with pytest.raises(ValueError, match="ops"):
        tilefuse.patch(nn.Linear(2, 2), ops=["conv_bn_act", "bogus"])
    with pytest.raises(ValueError, match="unknown: 'bogus'"):
        tilefuse.patch(nn.Linear(2, 2), ops="bogus")
    m = nn.Linear(2, 2)
    assert tilefuse.unpatch(m) is m  # never patched: no-op
    assert "0 replaced" in str(tilefuse.patch_report(m))


def test_compile_fullgraph_on_patched_model():
    ref = TVResNet().eval()
    fused = tilefuse.patch(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 8, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, fused(x))
    fe = tilefuse.patch(ref)  # eval: folded convs
    z = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(torch.compile(fe, fullgraph=True, backend="eager")(z), fe(z))
    ft = tilefuse.patch(ref.train())  # rewritten forwards (residual BN) compile too
    torch.testing.assert_close(torch.compile(ft, fullgraph=True, backend="eager")(
        torch.randn(2, 3, 8, 8)).shape, torch.Size([2, 5]))


def test_ops_accepts_one_rule_name_as_a_string():
    # issue 14 item 10: a string was split into characters ('l', 'i', 'n', ...) and rejected
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 2))
    p = tilefuse.patch(model, ops="linear_act")
    assert isinstance(p[0], tilefuse.nn.Linear) and type(p[2]) is nn.Dropout  # dropout rule off
    with pytest.raises(ValueError) as err:
        tilefuse.patch(model, ops="linear-act")
    assert "'linear-act'" in str(err.value) and "'l', 'i'" not in str(err.value)


def test_report_shows_the_fused_activation():
    # issue 14 item 11: the report read "Linear -> gelu: Linear(activation=)"
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    rep = str(tilefuse.patch_report(tilefuse.patch(model)))
    assert "replaced   0: Linear -> gelu: Linear(activation='gelu')" in rep
    assert "activation=)" not in rep


def test_rule_table_targets_own_from_torch():
    """Every target of the patch rule table is built by its own ``from_torch`` (one conversion
    constructor per fused module), and every rule is enabled by a name of ALL_OPS."""
    from tilefuse.patch import table as T
    from tilefuse.patch.planner import _target_class

    samples = [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.Linear(4, 4), nn.LayerNorm(4),
               nn.GroupNorm(2, 4), nn.Conv2d(4, 8, 3), nn.Conv2d(4, 4, 3, groups=4),
               nn.Dropout(0.1), nn.Dropout2d(0.1)]
    if hasattr(nn, "RMSNorm"):
        samples.append(nn.RMSNorm(4))
    seen = set()
    for rules in (T.GRAPH_RULES, T.LEAF_RULES):
        for rule in rules:
            assert set(rule.ops) <= set(tilefuse.patch.ALL_OPS)
            for m in samples:
                if rule.match(m) and rule.pattern != "residual":
                    cls = _target_class(rule.target(m))
                    assert cls is not None and "from_torch" in vars(cls) or any(
                        "from_torch" in vars(b) for b in cls.__mro__[1:-1]
                        if b.__module__.startswith("tilefuse")), rule.target(m)
                    seen.add(rule.target(m))
    assert {"Linear", "LayerNormAct", "GroupNormAct", "BatchNormAct2d", "Conv2d",
            "DepthwiseConv2d", "Dropout", "Dropout2d"} <= seen

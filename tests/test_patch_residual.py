"""tilefuse.patch's post-norm residual rule: ``LayerNorm/RMSNorm(x + residual)`` inside one
module's forward becomes ``LayerNormAct/RMSNormAct(x, residual)`` (and ``Dropout -> add ->
LayerNorm`` becomes ``dropout_add`` + ``LayerNormAct``). The block test runs the real norm kernels
in the Triton interpreter (tiny shapes); the BERT-style encoder uses the torch backend."""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

import tilefuse
from tilefuse.patch import residual as PR
from tilefuse.patch import rules as R

from test_patch import BertEncoder, _compare


class PostNormBlock(nn.Module):
    """Hand-written ``nn.TransformerEncoderLayer(norm_first=False)``-like block, plus the cases
    the rule must handle: norm -> activation module, a broadcast residual, ``+=``, and a pre-norm
    sum that is used again (the kernel writes the sum too: ``prenorm=True``)."""

    def __init__(self, d=16, L=5):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.lin1, self.lin2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm2 = nn.RMSNorm(d, eps=1e-6)
        self.pos = nn.Parameter(torch.randn(1, L, d))  # broadcast operand: (1, L, d) + (B, L, d)
        self.norm3 = nn.LayerNorm(d)
        self.act = nn.GELU()
        self.norm4 = nn.LayerNorm(d)  # pre-norm: the sum feeds the norm and the output

    def forward(self, x):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        h = self.lin2(F.relu(self.lin1(x)))
        h += x
        x = self.norm2(h)
        x = self.act(self.norm3(self.pos + x))
        s = x + self.lin1(x)[..., :16]
        return self.norm4(s) + s


class Wrap(nn.Module):  # the root's own forward is never rewritten: put the block one level down
    def __init__(self):
        super().__init__()
        self.block = PostNormBlock()

    def forward(self, x):
        return self.block(x)


def test_post_norm_block_fused_in_interpreter():
    ref = Wrap().train()
    fused = tilefuse.patch(ref)
    rep = tilefuse.patch_report(fused)
    paths, why = dict(rep.replaced), dict(rep.left_alone)
    b = fused.block
    assert isinstance(b.norm1, tilefuse.nn.LayerNormAct) and "residual" in paths["block.norm1"]
    assert isinstance(b.norm2, tilefuse.nn.RMSNormAct) and "residual" in paths["block.norm2"]
    # norm -> GELU absorbed *and* the residual passed in
    assert b.norm3.activation == "gelu" and isinstance(b.act, nn.Identity)
    assert "residual" in paths["block.norm3"]
    assert isinstance(b.norm4, tilefuse.nn.LayerNormAct) and "pre-norm" in paths["block.norm4"]
    assert "block.norm4" not in why
    assert "forward" in b.__dict__ and type(b) is PostNormBlock
    src = inspect.getsource(b.forward)  # the generated forward: norm1..3 fed by add_norm
    assert src.count("add_norm(norm") == 3 and "add_norm_prenorm(norm4" in src, src
    x = torch.randn(2, 5, 16)
    _compare(ref, fused, (x,))  # train mode, no dropout inside: outputs and gradients
    assert fused.state_dict().keys() == ref.state_dict().keys()
    tilefuse.unpatch(fused)
    assert "forward" not in fused.block.__dict__ and type(fused.block.norm1) is nn.LayerNorm
    assert type(fused.block.act) is nn.GELU
    torch.testing.assert_close(fused(x), ref(x))


class PreNormBlock(nn.Module):
    """GPT-style pre-norm block: ``h = x + attn(ln1(x)); out = h + mlp(ln2(h))``: the sum ``h``
    feeds ln2 and the next add (the residual stream)."""

    def __init__(self, d=16):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.RMSNorm(d, eps=1e-6)
        self.attn = nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = x + self.attn(self.ln1(x))
        return h + self.down(F.gelu(self.up(self.ln2(h))))


class PreNormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(PreNormBlock(), PreNormBlock())

    def forward(self, x):
        return self.blocks(x)


def test_pre_norm_residual_stream_one_kernel():
    """Issue 17: the pre-norm stream ``h = x + f(x); y = norm(h)`` becomes one
    ``RMSNormAct(x, residual, prenorm=True)`` call writing ``y`` and ``h`` (no torch add left for
    it), in train (gradients through both outputs) and eval."""
    ref = PreNormModel().train()
    fused = tilefuse.patch(ref)
    paths = dict(tilefuse.patch_report(fused).replaced)
    for i in range(2):
        b = fused.blocks[i]
        assert isinstance(b.ln2, tilefuse.nn.RMSNormAct)
        assert "pre-norm" in paths[f"blocks.{i}.ln2"], paths
        assert "add_norm_prenorm(ln2" in inspect.getsource(b.forward)
    x = torch.randn(3, 5, 16)
    _compare(ref, fused, (x,))
    _compare(ref.eval(), fused.eval(), (x,))
    calls = []
    real = tilefuse.nn.RMSNormAct.forward

    def spy(self, *a, **k):
        calls.append(k.get("prenorm", False))
        return real(self, *a, **k)

    tilefuse.nn.RMSNormAct.forward = spy
    try:
        fused(x)
    finally:
        tilefuse.nn.RMSNormAct.forward = real
    assert calls == [True, True]
    tilefuse.unpatch(fused)
    torch.testing.assert_close(fused(x), ref(x))


def test_add_norm_prenorm_guard_falls_back():
    norm = tilefuse.nn.LayerNormAct(8)
    x, small = torch.randn(3, 8), torch.randn(8)
    y, h = PR.add_norm_prenorm(norm, small, x)  # residual broadcasts only one way: swapped
    torch.testing.assert_close(h, x + small)
    torch.testing.assert_close(y, F.layer_norm(x + small, (8,)))
    y, h = PR.add_norm_prenorm(norm, x.double(), x)  # mixed dtypes: torch add, then the norm
    torch.testing.assert_close(h, x.double() + x)


def test_add_norm_guard_falls_back():
    """Operands the fused kernel cannot take (dtype mismatch, residual not broadcastable to the
    first operand) are swapped or summed in torch first."""
    norm = tilefuse.nn.LayerNormAct(8)
    x, small = torch.randn(3, 8), torch.randn(8)
    torch.testing.assert_close(PR.add_norm(norm, small, x), F.layer_norm(x + small, (8,)))
    y = PR.add_norm(norm, x.double(), x)
    torch.testing.assert_close(y, F.layer_norm(x.double() + x, (8,)).to(y.dtype))


def test_bert_output_dropout_add_layernorm(monkeypatch):
    """BERT's ``LayerNorm(dropout(dense(h)) + input)``: dropout_add + LayerNormAct. With p > 0 in
    train the masks come from the same seeds as with the dropout_add rule alone (no norm rule)."""
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    ref = BertEncoder().train()
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    fused = tilefuse.patch(ref)
    out = fused.layer[0].output
    assert isinstance(out.LayerNorm, tilefuse.nn.LayerNormAct)
    assert isinstance(out.dropout, R.DropoutAdd)
    assert "dropout_add + LayerNormAct" in dict(tilefuse.patch_report(fused).replaced)[
        "layer.0.output.LayerNorm"]
    partial = tilefuse.patch(ref, ops=[o for o in tilefuse.patch.ALL_OPS if o != "norm_act"])
    assert type(partial.layer[0].output.LayerNorm) is nn.LayerNorm
    torch.manual_seed(1)
    y1 = fused(ids, mask)
    torch.manual_seed(1)
    y2 = partial(ids, mask)
    torch.testing.assert_close(y1, y2)
    # eval: outputs and gradients equal the unpatched model's (train with p = 0: test_patch.py)
    _compare(ref.eval(), fused.eval(), (ids, mask))

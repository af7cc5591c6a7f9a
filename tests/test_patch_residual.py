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
    the rule must handle or refuse: norm -> activation module, a broadcast residual, ``+=``, and a
    pre-norm sum that is used again (cannot be fused: the kernel does not write the sum)."""

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
    assert type(b.norm4) is nn.LayerNorm and "used elsewhere" in why["block.norm4"]
    assert "forward" in b.__dict__ and type(b) is PostNormBlock
    src = inspect.getsource(b.forward)  # the generated forward: norm1..3 fed by add_norm
    assert src.count("add_norm(norm") == 3 and "self.norm4(add" in src, src
    x = torch.randn(2, 5, 16)
    _compare(ref, fused, (x,))  # train mode, no dropout inside: outputs and gradients
    assert fused.state_dict().keys() == ref.state_dict().keys()
    tilefuse.unpatch(fused)
    assert "forward" not in fused.block.__dict__ and type(fused.block.norm1) is nn.LayerNorm
    assert type(fused.block.act) is nn.GELU
    torch.testing.assert_close(fused(x), ref(x))


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

"""``tilefuse.quantize(mode="fp8")`` on Hugging Face BERT / RoBERTa / DistilBERT / GPT-2 small
configs (issue 21): argmax agreement >= 99% on held-out random batches, and the size against the
same model in bf16. Skipped where transformers is not installed."""
import pytest
import torch

import tilefuse
from tilefuse._backend import backend_of, interpreter_enabled
from tilefuse.nn.quantized_embedding import QuantizedEmbedding, tied_linear

V, H = 500, 64


def _hf(name, seed=0, big=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if name == "gpt2":
        cfg = (transformers.GPT2Config() if big else transformers.GPT2Config(
            n_layer=2, n_embd=H, n_head=4, vocab_size=V, n_positions=64, bos_token_id=0,
            eos_token_id=0))
        return transformers.GPT2LMHeadModel(cfg).eval()
    kw = dict(vocab_size=V, num_hidden_layers=2, hidden_size=H, num_attention_heads=4,
              intermediate_size=4 * H, max_position_embeddings=64, num_labels=5)
    if name == "distilbert":
        kw = dict(vocab_size=V, n_layers=2, dim=H, n_heads=4, hidden_dim=4 * H,
                  max_position_embeddings=64, num_labels=5)
    if name == "roberta":
        kw["max_position_embeddings"] = 66  # RoBERTa's positions start after padding_idx
    prefix = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}[name]
    cfg = getattr(transformers, prefix + "Config")(**({} if big else kw))
    return getattr(transformers, prefix + ("ForMaskedLM" if big else "ForTokenClassification"))(
        cfg).eval()


def _ids(name, rows, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3 if name == "roberta" else 0, V, (rows, seq), generator=g)}


def _bf16_size(model):
    return tilefuse.quantize(model, mode="bf16")[1].size_after


def _eight_bit_bytes(model):
    seen, n = set(), 0
    for t in model.state_dict().values():
        if t.element_size() == 1 and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            n += t.numel()
    return n


@pytest.mark.parametrize("name", ["gpt2", "bert", "roberta", "distilbert"])
def test_hf_small_configs_keep_argmax_and_store_8_bit(name, monkeypatch):
    # 1024 token rows to calibrate, 4096 held-out rows to check: 99% is 41 flips at most
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")  # same quantizer and fp8 products, fast
    model = _hf(name)
    q, rep = tilefuse.quantize(model, mode="fp8", calibration=_ids(name, 16, 64, 1),
                               min_agreement=0.99)
    held = _ids(name, 64, 64, 2)
    with torch.no_grad():
        ref, got = model(**held).logits, q(**held).logits
    assert (ref.argmax(-1) == got.argmax(-1)).double().mean() >= 0.99
    assert rep.argmax_agreement >= 0.99 and rep.max_rel_dev < 0.1
    # what fell back to float: at most the token classifier (64 x 5, outside the residual path)
    kept = [s.split(" ")[0] for s in rep.skipped]
    assert kept in ([], ["classifier"])
    assert all("argmax agreement" in s for s in rep.skipped)
    emb = q.transformer.wte if name == "gpt2" else getattr(q, name).embeddings.word_embeddings
    assert isinstance(emb, QuantizedEmbedding) and emb.weight.dtype == torch.int8
    if name == "gpt2":  # the tied lm_head reads the same int8 table: stored once
        assert q.lm_head.weight is emb.weight and q.lm_head.weight_scale is emb.weight_scale
    # size: every big tensor is 8-bit, so it is half its bf16 bytes; what stays above 0.5x is
    # the per-row scales, the fp32 LayerNorm/bias vectors and torch.save's per-tensor records
    n8 = _eight_bit_bytes(q)
    big = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert n8 >= big - (H * 5 if kept else 0)
    assert rep.size_after <= 0.6 * _bf16_size(model)  # measured 0.57-0.59 at H = 64


def test_interpreter_lane_runs_the_same_quantized_model(monkeypatch):
    # the agreement test above runs the torch path; the Triton kernels (interpreter here, GPU
    # there) compute the same model: same int8/fp8 values, fp32 accumulation order aside
    model = _hf("gpt2")
    q, rep = tilefuse.quantize(model, mode="fp8")
    x = _ids("gpt2", 2, 8, 3)
    lane = backend_of(torch.zeros(1))  # "triton" under TRITON_INTERPRET=1
    with torch.no_grad():
        got = q(**x).logits
        monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
        assert backend_of(torch.zeros(1)) == "torch"
        want = q(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # measured: equal
    assert lane == ("triton" if interpreter_enabled() else "torch")
    assert isinstance(q.transformer.wpe, QuantizedEmbedding) and "lm_head" in rep.replaced


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "bert", "roberta", "distilbert"])
def test_full_size_configs_are_about_half_of_bf16(name):
    # measured: GPT-2 small 0.5038x, BERT-base / RoBERTa-base / DistilBERT 0.5045x
    model = _hf(name, big=True)
    _, rep = tilefuse.quantize(model, mode="fp8")
    assert rep.size_after <= 0.505 * _bf16_size(model)


def test_quantized_embedding_formats_padding_and_state_dict():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(40, 24, padding_idx=3)
    ids = torch.tensor([[0, 3, 39], [7, 7, 1]])
    for dtype, rel in ((torch.int8, None), (torch.float8_e4m3fn, 2.0 ** -4),
                       (torch.float8_e5m2, 2.0 ** -3)):
        q = tilefuse.nn.QuantizedEmbedding.from_float(emb, dtype=dtype)
        assert q.weight.dtype == dtype and q.padding_idx == 3 and f"dtype={str(dtype)[6:]}" in repr(q)
        ref, got = emb(ids), q(ids)
        amax = emb.weight.detach().abs().amax(1)[ids, None]
        bound = amax / 254 if rel is None else ref.abs() * rel + amax * 2.0 ** -16
        assert ((got - ref).abs() <= bound + 1e-7).all()
        assert (got[0, 1] == 0).all()  # the padding row is zero and stays zero
        fresh = tilefuse.nn.QuantizedEmbedding(40, 24, padding_idx=3, dtype=dtype)
        fresh.load_state_dict(q.state_dict())
        assert torch.equal(fresh(ids), got)
    for dtype in (torch.bfloat16, torch.float64):  # the replaced table's dtype
        assert tilefuse.nn.QuantizedEmbedding.from_float(emb.to(dtype))(ids).dtype == dtype


def test_quantized_embedding_bad_inputs():
    with pytest.raises(TypeError, match="embedding must be a torch.nn.Embedding"):
        tilefuse.nn.QuantizedEmbedding.from_float(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="max_norm"):
        tilefuse.nn.QuantizedEmbedding.from_float(torch.nn.Embedding(4, 4, max_norm=1.0))
    with pytest.raises(TypeError, match="dtype must be torch.int8"):
        tilefuse.nn.QuantizedEmbedding(4, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="out_dtype must be a floating dtype"):
        tilefuse.nn.QuantizedEmbedding(4, 4, out_dtype=torch.int32)
    q = tilefuse.nn.QuantizedEmbedding(4, 4)
    with pytest.raises(ValueError, match="torch.nn.Linear with the table's shape"):
        tied_linear(q, torch.nn.Linear(4, 5))
    q.weight_scale.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        q(torch.tensor([1]))


def test_tied_projection_shares_the_table():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50)
    x = torch.randn(3, 16)
    for dtype, cls in ((torch.int8, tilefuse.nn.Int8Linear),
                       (torch.float8_e4m3fn, tilefuse.nn.Fp8Linear)):
        table = tilefuse.nn.QuantizedEmbedding.from_float(emb, dtype=dtype)
        lin = tied_linear(table, head)
        assert isinstance(lin, cls) and lin.weight is table.weight and lin.bias is not None
        assert lin.bias.data_ptr() == head.bias.data_ptr()  # the bias is not copied
        ref = torch.nn.functional.linear(x, table.dequantized_weight(), head.bias)
        tol = 0.1 if dtype != torch.int8 else 1e-4  # fp8 mode also rounds x to e4m3
        assert (lin(x) - ref).abs().max() <= tol * ref.abs().max()


class _TiedLM(torch.nn.Module):
    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.proj = torch.nn.Linear(d, d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.proj(self.wte(ids))))


def test_tied_weights_stored_once_or_kept_float_with_a_reason():
    torch.manual_seed(0)
    net = _TiedLM().eval()
    ids = torch.randint(0, 64, (4, 8))
    q, rep = tilefuse.quantize(net, mode="fp8", calibration=ids)
    assert rep.replaced == ["wte", "proj", "lm_head"] and not rep.skipped
    assert q.lm_head.weight is q.wte.weight and isinstance(q.lm_head, tilefuse.nn.Int8Linear)
    assert rep.size_after < 0.45 * rep.size_before and rep.max_rel_dev < 0.1
    qb, repb = tilefuse.quantize(_TiedLM().bfloat16().eval(), mode="fp8")  # a bf16 model
    assert qb(ids).dtype == torch.bfloat16 and qb.wte.out_dtype == torch.bfloat16
    assert qb.lm_head.bias is None and repb.size_after < repb.size_before
    # the projection reached first, and a second embedding on the same table: still one table
    net.add_module("wte", net._modules.pop("wte"))
    net.wte2 = torch.nn.Embedding(64, 32, _weight=net.wte.weight)
    net.wte2.weight = net.wte.weight
    q3, rep3 = tilefuse.quantize(net, mode="fp8")
    assert rep3.replaced == ["proj", "lm_head", "wte", "wte2"]
    assert q3.wte.weight is q3.lm_head.weight is q3.wte2.weight
    with torch.no_grad():
        torch.testing.assert_close(q3(ids), q(ids))
    assert rep3.size_after - rep.size_after < 1000  # two more state_dict keys, no new storage
    del net.wte2
    q2, rep2 = tilefuse.quantize(net, mode="fp8", skip="wte")  # the tie cannot be shared now
    assert rep2.replaced == ["proj"] and q2.lm_head.weight is q2.wte.weight
    assert rep2.skipped[0].startswith("lm_head (weight tied to wte, which stays in float")


def test_min_agreement_keeps_the_most_sensitive_layer():
    torch.manual_seed(0)
    # a residual body and a head outside it: the head's rounding reaches the output undiluted
    body, head = torch.nn.Linear(32, 32), torch.nn.Linear(32, 40)
    with torch.no_grad():
        body.weight.mul_(0.05)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = body, head

        def forward(self, x):
            return self.head(x + self.body(x))

    net, x = Net().eval(), torch.randn(512, 32)
    _, full = tilefuse.quantize(net, mode="fp8", calibration=x)
    q, rep = tilefuse.quantize(net, mode="fp8", calibration=x, min_agreement=0.99)
    assert full.argmax_agreement < 0.99 <= rep.argmax_agreement  # measured 95.51% -> 99.80%
    assert rep.replaced == ["body"] and isinstance(q.head, torch.nn.Linear)
    assert rep.skipped == [f"head (kept in float by min_agreement=0.99: sensitivity rank 1, "
                           f"relative output deviation {rep.skipped[0].split()[12]} with only it "
                           f"quantized; argmax agreement {100 * full.argmax_agreement:.2f}% -> "
                           f"{100 * rep.argmax_agreement:.2f}%)"]
    _, every = tilefuse.quantize(net, mode="fp8", calibration=x, min_agreement=1.0)
    assert every.replaced == [] and [s.split()[0] for s in every.skipped] == ["head", "body"]
    _, same = tilefuse.quantize(net, mode="w8a8", calibration=x, min_agreement=0.5)
    assert same.replaced == ["body", "head"] and not same.skipped  # already above: nothing kept
    for bad in (0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="min_agreement must be a number"):
            tilefuse.quantize(net, mode="fp8", calibration=x, min_agreement=bad)
    with pytest.raises(ValueError, match="needs a calibration batch"):
        tilefuse.quantize(net, mode="fp8", min_agreement=0.99)
    with pytest.raises(ValueError, match="needs a calibration batch"):
        tilefuse.quantize(net, mode="bf16", calibration=x, min_agreement=0.99)

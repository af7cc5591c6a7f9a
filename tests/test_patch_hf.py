"""tilefuse.patch on a real Hugging Face BERT built from a config (no weight download).
Skipped where transformers is not installed (it is in the `test` extra)."""
import pytest
import torch

import tilefuse

transformers = pytest.importorskip("transformers")


def _bert(dropout):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=16, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def test_bert_eval_and_train_match_and_unpatch():
    model = _bert(0.0)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    for mode in ("eval", "train"):
        getattr(model, mode)()
        ref = model(ids, attention_mask=mask).last_hidden_state
        patched = tilefuse.patch(model)
        report = str(tilefuse.patch_report(patched))
        assert "Linear -> gelu" in report and "LayerNorm" in report
        # optional-argument forwards (BertEmbeddings) are left alone, never mis-traced
        assert "embeddings: norm(x + residual)" in report
        out = patched(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        if mode == "train":
            out.sum().backward()
            ref_model = _bert(0.0).train()
            ref_model(ids, attention_mask=mask).last_hidden_state.sum().backward()
            for (n, p), (_, q) in zip(patched.named_parameters(), ref_model.named_parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=n)
        restored = tilefuse.unpatch(patched)
        assert not any(type(m).__module__.startswith("tilefuse") for m in restored.modules())


def test_bert_new_gelu_classes_map():
    act = transformers.activations.NewGELUActivation()
    assert tilefuse.activations.activation_from_module(act) == ("gelu_tanh", 0.0)

"""tilefuse.patch on a real Hugging Face BERT built from a config (no weight download).
Skipped where transformers is not installed (it is in the `test` extra)."""
import pytest
import torch

import tilefuse
from tilefuse.patch.rules import FoldedBatchNorm

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


def _mobilenet_v2():
    cfg = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=3)
    torch.manual_seed(0)
    model = transformers.MobileNetV2ForImageClassification(cfg)
    with torch.no_grad():  # non-trivial BN statistics and weights, so the fold is really tested
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_mobilenet_v2_conv_bn_folded_though_not_traceable():
    # issue 14 item 12: MobileNetV2ConvLayer is not fx-traceable (TF padding), so no Conv-BN pair
    # was folded; now folded by module structure, outputs equal within fp32 error
    model = _mobilenet_v2()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).logits
    patched = tilefuse.patch(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded = [m for m in patched.modules() if isinstance(m, FoldedBatchNorm)]
    assert n_bn > 0 and len(folded) == n_bn
    report = str(tilefuse.patch_report(patched))
    assert "matched by module structure" in report and "into DepthwiseConv2d(activation='relu6')" \
        in report
    for internal in ("Proxy", "co_varnames", "symbolically traced"):
        assert internal not in report
    with torch.no_grad():
        out = patched(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    restored = tilefuse.unpatch(patched)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in restored.modules()) == n_bn


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def test_gpt2_conv1d_gelu_mlp_is_fused():
    # issue 14 item 2: GPT-2's Conv1D -> NewGELU MLP was ignored without a reason
    model = _gpt2()
    ids = torch.randint(0, 500, (2, 8))
    for mode in ("eval", "train"):
        getattr(model, mode)()
        ref = model(ids).logits
        patched = tilefuse.patch(model)
        fc = patched.transformer.h[0].mlp.c_fc
        assert type(fc).__name__ == "Conv1DLinear" and fc.activation == "gelu_tanh"
        assert isinstance(patched.transformer.h[0].mlp.act, torch.nn.Identity)
        assert fc.nf == 256 and fc.nx == 64 and fc.weight.shape == (64, 256)  # HF layout kept
        report = str(tilefuse.patch_report(patched))
        assert "Conv1D -> gelu_tanh: Conv1DLinear(activation='gelu_tanh')" in report
        for internal in ("Proxy", "co_varnames"):
            assert internal not in report
        assert patched.state_dict().keys() == model.state_dict().keys()
        out = patched(ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        if mode == "train":
            out.sum().backward()
            ref.sum().backward()
            g_ours = patched.transformer.h[0].mlp.c_fc.weight.grad
            torch.testing.assert_close(g_ours, model.transformer.h[0].mlp.c_fc.weight.grad,
                                       rtol=1e-3, atol=1e-4)
        restored = tilefuse.unpatch(patched)
        assert type(restored.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"

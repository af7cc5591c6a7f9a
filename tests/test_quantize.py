"""Per-row quantizer, Int8Linear / Int8Conv1x1, and whole-model tilefuse.quantize."""
import io
import os
import tempfile

import pytest
import torch

import tilefuse
from tilefuse.kernels import quant as quant_kernels
from tilefuse.kernels.quant import torch_quantize_rows
from tilefuse.quantize import QuantizationReport

ops = tilefuse.ops
# documented tolerance (docs/quantization.md): Int8Linear vs the float Linear, relative to the
# output's max magnitude, on N(0, 1) inputs and torch's default Linear init
TOL = {"w8a8": 0.02, "weight_only": 0.01}


def _check_quant(x, q, s):
    q2, s2 = torch_quantize_rows(x.reshape(-1, x.shape[-1]).cpu())
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.shape == tuple(x.shape[:-1]) + (1,)
    if x.is_cuda:  # compiled fp32 division may be approximate: a tie can round one step away
        assert (q.reshape(q2.shape).cpu().int() - q2.cpu().int()).abs().max() <= 1
        assert torch.allclose(s.reshape(-1).cpu(), s2.cpu(), rtol=1e-6, atol=0)
    else:  # interpreter / torch path: bit-exact against the reference
        assert torch.equal(q.reshape(q2.shape).cpu(), q2.cpu())
        assert torch.equal(s.reshape(-1).cpu(), s2.cpu())
    err = (q.double() * s.double() - x.double()).abs()
    assert bool((err <= s.double() / 2 * (1 + 1e-5)).all())  # quantize -> dequantize bound


@pytest.mark.cuda
def test_quantize_wide_rows_cuda():
    x = torch.randn(3, 20000, device="cuda", dtype=torch.float16)  # > one tile: chunked path
    _check_quant(x, *ops.quantize_per_row(x))


@pytest.mark.parametrize("shape,dtype", [((1, 37), torch.float32), ((3, 5, 100), torch.float16),
                                         ((0, 8), torch.float32), ((7, 256), torch.bfloat16)])
def test_quantize_per_row(device, shape, dtype):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    q, s = ops.quantize_per_row(x)
    _check_quant(x, q, s)
    if x.numel():
        assert int(q.abs().max()) == 127


def test_quantize_strided_zero_row_and_chunked(device, monkeypatch):
    x = torch.randn(40, 24, device=device).t()  # non-contiguous (24, 40)
    x[3] = 0
    q, s = ops.quantize_per_row(x)
    _check_quant(x, q, s)
    assert s[3].item() == 1.0 and not q[3].any()
    # the multi-chunk path (rows wider than one tile)
    monkeypatch.setattr(quant_kernels, "quant_config", lambda M, N: dict(
        BLOCK_M=4, BLOCK_N=16, ONE_TILE=False, num_warps=4))
    x = torch.randn(9, 70, device=device)
    q, s = ops.quantize_per_row(x)
    _check_quant(x, q, s)


@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
def test_int8_linear_vs_float(device, mode, tmp_path):
    lin = torch.nn.Linear(96, 40, device=device)
    m = tilefuse.nn.Int8Linear.from_float(lin, mode=mode)
    x = torch.randn(3, 11, 96, device=device)
    with torch.no_grad():
        ref = lin(x).double()
    y = m(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert (y.double() - ref).abs().max().item() <= TOL[mode] * ref.abs().max().item()
    sd = m.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["weight_scale"].shape == (40,)
    path = tmp_path / "q.pt"
    torch.save(sd, path)
    fresh = tilefuse.nn.Int8Linear(96, 40, mode=mode, device=device)
    fresh.load_state_dict(torch.load(path))
    assert torch.equal(fresh(x), y)


def test_int8_linear_keeps_fused_activation_and_no_bias(device):
    lin = tilefuse.nn.Linear(32, 16, bias=False, activation="relu", device=device)
    m = tilefuse.nn.Int8Linear.from_float(lin, mode="weight_only")
    assert m.bias is None and "bias" not in m.state_dict()
    x = torch.randn(4, 32, device=device)
    y = m(x)
    assert (y >= 0).all()
    with torch.no_grad():
        ref = torch.relu(x @ lin.weight.t())
    assert (y - ref).abs().max().item() <= TOL["weight_only"] * ref.abs().max().item()
    with pytest.raises(ValueError, match="mode"):
        tilefuse.nn.Int8Linear.from_float(lin, mode="int4")
    with pytest.raises(TypeError, match="linear"):
        tilefuse.nn.Int8Linear.from_float(torch.nn.ReLU())


def _fit_head(features, head, labels):
    """Ridge least-squares fit of the last Linear on one-hot targets (a trained head without an
    optimizer: no autograd, no torch.optim import)."""
    with torch.no_grad():
        h = torch.cat([features, torch.ones(len(features), 1)], 1)
        target = torch.nn.functional.one_hot(labels, head.out_features).float() * 4 - 2
        reg = 0.01 * len(h) * torch.eye(h.shape[1])
        sol = torch.linalg.solve(h.t() @ h + reg, h.t() @ target)
        head.weight.copy_(sol[:-1].t())
        head.bias.copy_(sol[-1])


class TextClassifier(torch.nn.Module):
    def __init__(self, vocab=200, dim=32, classes=4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc = torch.nn.Linear(dim, 128)
        self.head = torch.nn.Linear(128, classes)

    def forward(self, tokens):
        return self.head(torch.relu(self.fc(self.emb(tokens).mean(1))))


def test_quantize_mlp_and_text_classifier_keep_argmax():
    # synthetic tasks: Gaussian clusters for the MLP, class-specific token ranges for the text model
    centers = torch.randn(6, 48) * 2
    labels = torch.randint(0, 6, (200,))
    x = centers[labels] + torch.randn(200, 48)
    mlp = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 6))
    with torch.no_grad():
        _fit_head(mlp[1](mlp[0](x)), mlp[2], labels)
    qmlp, rep = tilefuse.quantize(mlp, mode="w8a8", calibration=x)
    assert rep.argmax_agreement >= 0.99 and rep.replaced == ["0", "2"]
    assert isinstance(qmlp[0], tilefuse.nn.Int8Linear) and isinstance(mlp[0], torch.nn.Linear)

    tl = torch.randint(0, 4, (200,))
    tokens = torch.randint(0, 200, (200, 12))
    tokens[:, :10] = tl[:, None] * 50 + torch.randint(0, 50, (200, 10))
    txt = TextClassifier().eval()
    with torch.no_grad():
        _fit_head(torch.relu(txt.fc(txt.emb(tokens).mean(1))), txt.head, tl)
    qtxt, rep = tilefuse.quantize(txt, mode="weight_only", calibration=tokens, inplace=True)
    assert qtxt is txt and isinstance(txt.head, tilefuse.nn.Int8Linear)
    assert rep.argmax_agreement >= 0.99 and rep.max_rel_dev < 0.05
    assert "argmax agreement" in str(rep)


def test_size_report_is_real_file_size():
    net = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 128)).eval()
    qnet, rep = tilefuse.quantize(net, mode="w8a8")
    with tempfile.TemporaryDirectory() as d:
        for model, size in ((net, rep.size_before), (qnet, rep.size_after)):
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            assert buf.getbuffer().nbytes == size
            # on disk the zip records carry the file's stem instead of "archive": a few bytes
            path = os.path.join(d, "m.pt")
            torch.save(model.state_dict(), path)
            assert abs(os.path.getsize(path) - size) < 1024
    assert rep.compression > 3.0 and rep.max_abs_dev is None
    half, rep16 = tilefuse.quantize(net, mode="fp16")
    assert half[0].weight.dtype == torch.float16 and 1.8 < rep16.compression < 2.0


def test_skip_and_conv1x1():
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Flatten(),
                              torch.nn.Linear(16 * 5 * 5, 10), torch.nn.Linear(10, 3)).eval()
    x = torch.randn(2, 8, 5, 5)
    q, rep = tilefuse.quantize(net, mode="weight_only", skip=("5",), calibration=x)
    # issue 20: every ungrouped Conv2d (the 3x3 too) is an Int8Conv2d; 1x1 Conv1d: Int8Conv1x1
    assert isinstance(q[0], tilefuse.nn.Int8Conv2d) and isinstance(q[4], tilefuse.nn.Int8Linear)
    assert isinstance(q[2], tilefuse.nn.Int8Conv2d) and q[2].padding == (1, 1)
    assert isinstance(q[5], torch.nn.Linear) and rep.replaced == ["0", "2", "4"]
    assert rep.skipped == ["5 (skip)"]
    c1 = torch.nn.Sequential(torch.nn.Conv1d(8, 4, 1), torch.nn.Conv1d(4, 4, 3),
                             torch.nn.Conv2d(4, 4, 3, groups=2))
    q1, rep1 = tilefuse.quantize(c1)
    assert isinstance(q1[0], tilefuse.nn.Int8Conv1x1) and rep1.replaced == ["0"]
    assert rep1.skipped == ["1 (conv is not a Conv2d or a 1x1/stride 1/unpadded/ungrouped "
                            "Conv1d)", "2 (grouped/depthwise conv (groups=2): no int8 grouped "
                                       "kernel, kept in float)"]
    with torch.no_grad():
        ref = net[0](x)
    y = q[0](x)
    assert (y - ref).abs().max().item() <= TOL["weight_only"] * ref.abs().max().item()
    q2, rep2 = tilefuse.quantize(net, skip=(torch.nn.Conv2d, "*4"))
    assert rep2.replaced == ["5"]
    bare, rep3 = tilefuse.quantize(torch.nn.Linear(8, 4), inplace=True)
    assert isinstance(bare, tilefuse.nn.Int8Linear) and rep3.replaced == [""]


def test_quantize_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        tilefuse.quantize(torch.nn.Linear(4, 4), mode="int4")
    with pytest.raises(TypeError, match="model"):
        tilefuse.quantize(torch.randn(3))
    with pytest.raises(TypeError, match="skip"):
        tilefuse.quantize(torch.nn.Linear(4, 4), skip=(3,))
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.quantize_per_row(torch.ones(3, 4, dtype=torch.int32))


@pytest.mark.parametrize("chunked", [False, True])
def test_quantize_non_finite_rows_get_nan_scale(device, monkeypatch, chunked):
    if chunked:
        monkeypatch.setattr(quant_kernels, "quant_config", lambda M, N: dict(
            BLOCK_M=2, BLOCK_N=8, ONE_TILE=False, num_warps=4))
    x = torch.randn(5, 20, device=device)
    x[1, 3] = float("nan")
    x[2, 17] = float("inf")
    x[3, 0] = -float("inf")
    q, s = ops.quantize_per_row(x)
    assert torch.isnan(s[1:4]).all() and not q[1:4].any()
    assert torch.isfinite(s[[0, 4]]).all()
    _check_quant(x[[0, 4]], q[[0, 4]], s[[0, 4]])
    assert torch.isnan(ops.dequantize_per_row(q, s)[1:4]).all()
    rq, rs = torch_quantize_rows(x.reshape(5, 20))  # the torch path: same policy
    assert torch.equal(torch.isnan(rs), torch.isnan(s.flatten())) and not rq[1:4].any()


class Conv1D(torch.nn.Module):
    """Hugging Face's transformers.pytorch_utils.Conv1D, verbatim semantics (weight (nx, nf))."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def test_quantized_modules_keep_the_replaced_modules_attributes():
    # issue 14 item 1: HF's TF padding reads conv.stride: 'Int8Conv1x1' object has no attribute
    conv = torch.nn.Conv2d(8, 4, 1, bias=False)
    q = tilefuse.nn.Int8Conv1x1.from_float(conv)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(q, attr) == getattr(conv, attr), attr
    lin = tilefuse.nn.Int8Linear.from_float(torch.nn.Linear(6, 5))
    assert (lin.in_features, lin.out_features) == (6, 5)


def test_hf_conv1d_quantized_by_duck_typing(device):
    # issue 14 item 2: GPT-2's Conv1D (a Linear with an (in, out) weight) was neither quantized
    # nor reported
    net = torch.nn.Sequential(Conv1D(24, 16), torch.nn.GELU(), Conv1D(8, 24)).to(device).eval()
    x = torch.randn(2, 5, 16, device=device)
    q, rep = tilefuse.quantize(net, mode="weight_only", calibration=x)
    assert rep.replaced == ["0", "2"] and isinstance(q[0], tilefuse.nn.Int8Linear)
    assert (q[0].nf, q[0].nx, q[0].in_features, q[0].out_features) == (24, 16, 16, 24)
    assert rep.size_after < rep.size_before and rep.max_rel_dev < TOL["weight_only"]
    with torch.no_grad():
        ref = net[0](x)
    assert (q[0](x) - ref).abs().max().item() <= TOL["weight_only"] * ref.abs().max().item()


class _TiedLM(torch.nn.Module):
    def __init__(self, vocab=300, d=32):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.proj = torch.nn.Linear(d, d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, ids):
        return self.lm_head(torch.relu(self.proj(self.wte(ids))))


def test_tied_weights_are_skipped_and_a_larger_model_is_reported():
    # issue 14 item 2: the tied lm_head got an int8 copy next to the fp32 embedding, so the
    # "quantized" model was larger, and the report still said "smaller"
    net = _TiedLM().eval()
    q, rep = tilefuse.quantize(net, calibration=torch.randint(0, 300, (2, 6)))
    assert rep.replaced == ["proj"] and isinstance(q.lm_head, torch.nn.Linear)
    assert rep.skipped == ["lm_head (weight tied to wte: a quantized copy would be stored next to "
                           "the float tensor, so the model would grow)"]
    assert q.lm_head.weight is q.wte.weight and rep.size_after < rep.size_before
    assert "lm_head (weight tied" in str(rep) and "smaller" in str(rep)
    lin = torch.nn.Linear(8, 8)  # one module at two paths is not a tie: quantized once
    q2, rep2 = tilefuse.quantize(torch.nn.Sequential(lin, torch.nn.ReLU(), lin))
    assert rep2.replaced == ["0"] and q2[0] is q2[2] and isinstance(q2[2], tilefuse.nn.Int8Linear)
    grown = QuantizationReport("w8a8", size_before=1000, size_after=1100)
    assert "(1.10x larger)" in str(grown) and "smaller" not in str(grown)


def test_quantize_hf_mobilenet_v2():
    # issue 14 item 1: AttributeError: 'Int8Conv1x1' object has no attribute 'stride'
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=3)
    model = transformers.MobileNetV2ForImageClassification(cfg).eval()
    q, rep = tilefuse.quantize(model, mode="weight_only", calibration=torch.randn(1, 3, 32, 32))
    conv = q.mobilenet_v2.layer[0].expand_1x1.convolution
    assert isinstance(conv, tilefuse.nn.Int8Conv2d) and conv.stride == (1, 1)
    stem = q.mobilenet_v2.conv_stem.first_conv.convolution  # 3x3 / stride 2, TF "SAME" padding
    assert isinstance(stem, tilefuse.nn.Int8Conv2d) and stem.stride == (2, 2)
    assert "classifier" in rep.replaced and rep.size_after < rep.size_before
    assert rep.max_rel_dev < 0.05 and rep.argmax_agreement == 1.0


def test_quantize_hf_gpt2_conv1d_and_tied_head():
    # issue 14 item 2: 544,768 -> 578,768 bytes: Conv1D untouched, tied lm_head copied to int8
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    q, rep = tilefuse.quantize(model, calibration=torch.randint(0, 500, (2, 8)))
    assert [r for r in rep.replaced if r.endswith("mlp.c_fc")] == ["transformer.h.0.mlp.c_fc",
                                                                    "transformer.h.1.mlp.c_fc"]
    assert len(rep.replaced) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in both blocks
    assert rep.skipped == ["lm_head (weight tied to transformer.wte: a quantized copy would be "
                           "stored next to the float tensor, so the model would grow)"]
    assert rep.size_after < 0.6 * rep.size_before and "smaller" in str(rep)
    assert rep.max_rel_dev < 0.05

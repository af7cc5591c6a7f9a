"""tilefuse.models: architecture sizes (built on the meta device), fused vs torch reference
outputs and gradients (width-reduced models, torch backend; one small model in the interpreter),
weight loading and the text classifier's int8 size target."""
import pytest
import torch
import torch.nn as nn

import tilefuse
import tilefuse.models as M


@pytest.mark.parametrize("ctor,params", [
    (M.resnet18, 11_689_512), (M.resnet34, 21_797_672), (M.resnet50, 25_557_032),
    (M.resnet101, 44_549_160), (M.resnet152, 60_192_808), (M.mobilenet_v2, 3_504_872),
    (M.efficientnet_b0, 5_288_548)])
def test_full_size_matches_torchvision_parameter_count(ctor, params):
    with torch.device("meta"):
        m = ctor(fused=False)
    assert sum(p.numel() for p in m.parameters()) == params


def test_efficientnet_compound_scaling():
    with torch.device("meta"):
        nets = [f(fused=False) for f in (M.efficientnet_b0, M.efficientnet_b1,
                                         M.efficientnet_b2, M.efficientnet_b3)]
    sizes = [sum(p.numel() for p in n.parameters()) for n in nets]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert [n.resolution for n in nets] == [224, 258, 296, 341]
    blocks = [sum(len(s) for s in n.features[1:-1]) for n in nets]
    assert blocks[0] == 16 and blocks[1] > blocks[0]   # depth 1.2**phi, rounded up per stage


def test_text_classifier_under_10mb_int8(monkeypatch):
    m = M.text_classifier(fused=False)
    assert M.int8_size_mb(m) < 10.0
    assert sum(p.numel() for p in m.parameters()) * 4 / 2 ** 20 > M.int8_size_mb(m)
    quantize = getattr(tilefuse, "quantize", None)
    if quantize is None:
        pytest.skip("tilefuse.quantize not available")
    import io

    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    ids = torch.randint(0, 8000, (2, 16))
    q, report = quantize(M.text_classifier().eval(), mode="w8a8", calibration=ids)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    assert buf.getbuffer().nbytes < 10 * 2 ** 20  # the cheat sheet's text-classification target
    assert report.max_rel_dev < 0.1


def _zero_dropout(m):
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m


CASES = {
    "resnet18": (lambda f: M.resnet18(10, width=0.125, fused=f), (1, 3, 32, 32)),
    "resnet50": (lambda f: M.resnet50(10, width=0.0625, fused=f), (1, 3, 32, 32)),
    "mobilenet_v2": (lambda f: M.mobilenet_v2(10, width_mult=0.25, fused=f), (1, 3, 32, 32)),
    "efficientnet_b1": (lambda f: M.efficientnet_b1(10, width_mult=0.25, fused=f), (1, 3, 32, 32)),
    "googlenet": (lambda f: M.googlenet_small(10, width=0.125, fused=f), (1, 3, 32, 32)),
    "text": (lambda f: M.text_classifier(f, vocab_size=64, dim=32, depth=2, heads=2, ffn=64,
                                         dropout=0.0), None),
}


def _inputs(name, shape):
    if shape is None:
        return (torch.randint(0, 64, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
    return (torch.randn(shape),)


# models whose whole-model check runs on the torch backend in CI (interpreter: slow lane). Since
# their dense convs run the implicit-GEMM kernel (forward + both backward GEMMs), ResNet-50 and
# GoogLeNet joined: test_conv_models.py runs ResNet-50 eval in the interpreter in the fast lane.
TORCH_BACKEND_IN_CI = {"efficientnet_b1", "resnet50", "googlenet"}


@pytest.mark.parametrize("name,interp", [
    pytest.param(n, n not in TORCH_BACKEND_IN_CI, id=n) for n in CASES] + [
    pytest.param(n, True, id=f"{n}-interp", marks=pytest.mark.slow) for n in TORCH_BACKEND_IN_CI])
def test_fused_matches_torch_reference(name, interp, monkeypatch):
    """Patched (train-mode rewrite: BatchNormAct2d(+residual), DepthwiseConv2d,
    Linear(activation=), dropout_add...) vs torch, in eval mode (train-mode BN over a 1x1 map of
    a tiny batch is too ill-conditioned to compare; train mode is covered in test_patch.py).
    The fused modules run their Triton kernels in the interpreter, except the models listed in
    TORCH_BACKEND_IN_CI (torch backend; their ``-interp`` variant is in the slow lane)."""
    if not interp:
        monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    ctor, shape = CASES[name]
    ref = _zero_dropout(ctor(False)).eval()
    fused = _zero_dropout(ctor(True)).eval()
    replaced = tilefuse.patch_report(fused).replaced
    assert len(replaced) > 0
    if name.startswith("resnet") and tilefuse.nn.__dict__.get("BatchNormAct2d") is not None:
        assert any("residual" in d for _, d in replaced)  # relu(bn(x) + identity) fused
    assert fused.state_dict().keys() == ref.state_dict().keys()
    M.load_state_dict_from(fused, ref)
    x = _inputs(name, shape)
    y_ref, y = ref(*x), fused(*x)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    w = torch.randn_like(y)
    (y_ref * w).sum().backward()
    (y * w).sum().backward()
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    for (n, a), b in zip(ref.named_parameters(), fused.parameters()):
        if a.grad is not None:
            assert (a.grad - b.grad).abs().max() <= 1e-4 * scale, n
    # inference: unpatch, eval, re-patch folds Conv->BN
    inf = M.prepare_inference(fused)
    assert not inf.training
    with torch.no_grad():
        torch.testing.assert_close(inf(*x), ref(*x), atol=1e-4, rtol=1e-4)


def test_small_resnet_in_interpreter():
    """The real kernels (Triton interpreter on CPU) inside a whole, tiny model."""
    ref = M.resnet18(4, width=0.0625, fused=False)
    fused = M.resnet18(4, width=0.0625)
    M.load_state_dict_from(fused, ref)
    x = torch.randn(2, 3, 8, 8)
    y_ref, y = ref(x), fused(x)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(fused.fc.weight.grad, ref.fc.weight.grad, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_same_grads(monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    a = M.googlenet_small(4, width=0.125)
    b = M.googlenet_small(4, width=0.125)
    M.load_state_dict_from(b, a)
    _zero_dropout(a), _zero_dropout(b)
    b.gradient_checkpointing = True
    x = torch.randn(2, 3, 32, 32)
    w = torch.randn(2, 4)
    (a(x) * w).sum().backward()
    (b(x) * w).sum().backward()
    torch.testing.assert_close(b.stem[0][0].weight.grad, a.stem[0][0].weight.grad,
                               atol=1e-4, rtol=1e-3)


def test_load_state_dict_from_other_layout_and_errors():
    src = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    block = M.inception_block(8, fused=False, c1=2, c3_reduce=2, c3=2, c5_reduce=2, c5=2,
                              pool_proj=2)
    with pytest.raises(ValueError, match="not the same architecture"):
        M.load_state_dict_from(block, src)
    tv = M.resnet18(5, width=0.0625, fused=False)
    renamed = {"backbone." + k: v.clone() + 1 for k, v in tv.state_dict().items()}
    mine = M.resnet18(5, width=0.0625)
    M.load_state_dict_from(mine, renamed)
    torch.testing.assert_close(mine.fc.weight, tv.fc.weight + 1)
    renamed["backbone.fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        M.load_state_dict_from(mine, renamed)


def test_efficientnet_stochastic_depth(monkeypatch):
    """Drop-path on MBConv residuals: linear ramp to 0.2 (torchvision's rule), whole samples
    dropped and the rest scaled by 1/(1-p) in training, identity in eval; the patched block draws
    the same masks under the same seed, and checkpointing recomputes the same masks."""
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: OpenMP threads only spin on a busy 2-core CI box
    try:
        _check_stochastic_depth()
    finally:
        torch.set_num_threads(threads)


def _check_stochastic_depth():
    from tilefuse.models.mobile import MBConv

    net = M.efficientnet_b0(4, width_mult=0.25, fused=False)
    probs = [b.stochastic_depth.p for stage in net.features[1:-1] for b in stage]
    assert probs == pytest.approx([0.2 * i / 16 for i in range(16)])
    assert all(b.stochastic_depth.p == 0 for b in M.efficientnet_b0(
        fused=False, stochastic_depth_prob=0.0, width_mult=0.25).features[2])
    blk = MBConv(8, 8, 3, 1, 2, sd_prob=0.5)
    x = torch.randn(64, 8, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(blk.eval()(x), x + blk.block(x))
        branch = blk.train().block(x)  # train-mode BN: batch statistics, same for the same x
        d = blk(x) - x
    dropped = d.flatten(1).abs().amax(1) == 0
    torch.testing.assert_close(d[~dropped], branch[~dropped] * 2)
    assert 10 < int(dropped.sum()) < 54  # Bernoulli(0.5) per sample
    fused = tilefuse.patch(blk)
    torch.manual_seed(3)
    y_ref = blk(x)
    torch.manual_seed(3)
    torch.testing.assert_close(fused(x), y_ref, atol=1e-5, rtol=1e-5)
    ckpt = M.efficientnet_b0(4, width_mult=0.25, fused=False)
    M.load_state_dict_from(ckpt, net)
    for m in (net, ckpt):  # stage 6: 192 -> 192 residual blocks, drop often
        for b in m.features[6]:
            b.stochastic_depth.p = 0.5
    ckpt.gradient_checkpointing = True
    xs = torch.randn(2, 3, 16, 16)
    for m in (net, ckpt):
        torch.manual_seed(5)
        m(xs).square().sum().backward()
    torch.testing.assert_close(ckpt.features[1][0].block[0][0].weight.grad,
                               net.features[1][0].block[0][0].weight.grad, atol=1e-5, rtol=1e-4)

"""tilefuse.export_onnx: fused models export as standard ONNX ops, pass onnx.checker, and
onnxruntime matches PyTorch."""
import pytest
import torch
import torch.nn as nn

import tilefuse
import tilefuse.models as M
from tilefuse.export import run_onnx, to_torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _check(model, example, path, atol=1e-4):
    model.eval()
    with torch.no_grad():
        want = model(*example) if isinstance(example, tuple) else model(example)
    tilefuse.export_onnx(model, example, path)
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(path)).graph.node)
    got = torch.from_numpy(run_onnx(path, example))
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    return _ops(path)


@pytest.mark.parametrize("fold", [False, True])
def test_resnet18(tmp_path, fold, monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")  # the reference output; ORT is the subject
    m = M.resnet18(10, width=0.125)
    if fold:
        m = M.prepare_inference(m)
    ops = _check(m, torch.randn(2, 3, 32, 32), tmp_path / "r18.onnx")
    assert "Conv" in ops and "Relu" in ops  # (the exporter's constant folding folds BN itself)


def test_mobilenet_v2(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    m = M.mobilenet_v2(10, width_mult=0.25)
    ops = _check(m, torch.randn(1, 3, 32, 32), tmp_path / "mnv2.onnx")
    assert "Clip" in ops  # ReLU6 (fused into BatchNormAct2d) comes back as a standard op


def test_text_classifier(tmp_path):
    m = M.text_classifier(vocab_size=64, dim=32, depth=2, heads=2, ffn=64)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    _check(m, (ids, mask), tmp_path / "text.onnx")
    assert (tmp_path / "text.onnx").stat().st_size < 10 * 2 ** 20


def test_fused_modules_directly_and_errors(tmp_path):
    m = nn.Sequential(tilefuse.nn.Linear(6, 8, activation=("leaky_relu", 0.2)),
                      tilefuse.nn.Linear(8, 3, activation="gelu_tanh"))
    ops = _check(m, torch.randn(4, 6), tmp_path / "lin.onnx")
    assert "LeakyRelu" in ops
    assert type(m[0]) is tilefuse.nn.Linear  # the export works on a copy
    assert isinstance(to_torch(tilefuse.nn.Linear(2, 2)), nn.Linear)
    with pytest.raises(TypeError, match="model"):
        tilefuse.export_onnx("m", torch.randn(1), tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="example"):
        tilefuse.export_onnx(m, [1, 2], tmp_path / "x.onnx")

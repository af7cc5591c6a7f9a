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


def _text_model_and_inputs():
    m = M.text_classifier(vocab_size=64, dim=32, depth=1, heads=2, ffn=64).eval()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    return m, ids, mask


def test_keyword_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    m, ids, mask = _text_model_and_inputs()
    with torch.no_grad():
        want = m(ids, attention_mask=mask)
    p = tilefuse.export_onnx(m, ids, tmp_path / "kw.onnx", kwargs={"attention_mask": mask})
    assert [i.name for i in onnx.load(p).graph.input] == ["input", "attention_mask"]
    got = torch.from_numpy(run_onnx(p, ids, kwargs={"attention_mask": mask}))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the mask is a real graph input (not the example's constant): another mask, another output
    other = torch.ones_like(mask)
    with torch.no_grad():
        want_other = m(ids, attention_mask=other)
    torch.testing.assert_close(torch.from_numpy(run_onnx(p, ids, kwargs={"attention_mask": other})),
                               want_other, atol=1e-4, rtol=1e-4)
    # keyword inputs only, named after forward's parameters
    p2 = tilefuse.export_onnx(m, (), tmp_path / "kw2.onnx",
                              kwargs={"attention_mask": mask, "input_ids": ids})
    assert [i.name for i in onnx.load(p2).graph.input] == ["input_ids", "attention_mask"]
    got = run_onnx(p2, (), kwargs={"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_keyword_input_errors(tmp_path):
    m, ids, mask = _text_model_and_inputs()
    with pytest.raises(TypeError, match="kwargs"):
        tilefuse.export_onnx(m, ids, tmp_path / "x.onnx", kwargs={"attention_mask": [1, 0]})
    with pytest.raises(TypeError, match="TextClassifier.forward.*mask"):
        tilefuse.export_onnx(m, ids, tmp_path / "x.onnx", kwargs={"mask": mask})
    with pytest.raises(TypeError, match="TextClassifier.forward"):
        tilefuse.export_onnx(m, (ids, mask), tmp_path / "x.onnx", kwargs={"attention_mask": mask})
    with pytest.raises(TypeError, match="example"):
        tilefuse.export_onnx(m, (), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="input_names"):
        tilefuse.export_onnx(m, ids, tmp_path / "x.onnx", kwargs={"attention_mask": mask},
                             input_names=["ids"])

    class KwOnly(nn.Module):
        def forward(self, x, *, scale=None):
            return x if scale is None else x * scale

    with pytest.raises(TypeError, match="positional-or-keyword"):
        tilefuse.export_onnx(KwOnly(), torch.randn(2), tmp_path / "x.onnx",
                             kwargs={"scale": torch.ones(2)})


class _CallsTilefuseOp(nn.Module):
    """A tilefuse op used directly in forward (no torch module for to_torch to restore)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return tilefuse.ops.linear(x, self.w, activation="relu")


def test_torch_export_failure_is_one_line_and_chained(tmp_path, capfd):
    with pytest.raises(tilefuse.export.ExportError) as info:
        tilefuse.export_onnx(_CallsTilefuseOp(), torch.randn(2, 4), tmp_path / "x.onnx")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("ONNX export of _CallsTilefuseOp failed")
    assert "tilefuse::" in msg and "tilefuse.nn" in msg  # torch's first line + the hint
    cause = info.value.__cause__
    assert cause is not None and str(cause).splitlines()[0].strip() in msg
    assert "Torch IR graph" in info.value.torch_log  # torch's dump is kept, not printed
    assert "Torch IR graph" not in capfd.readouterr().out


def test_model_error_during_tracing_is_explained(tmp_path):
    with pytest.raises(tilefuse.export.ExportError, match=r"of Linear failed.*RuntimeError: mat1"):
        tilefuse.export_onnx(nn.Linear(4, 3), torch.randn(2, 5), tmp_path / "x.onnx")

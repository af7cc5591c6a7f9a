"""Bench report schema, targets table logic and the targets.toml loader (no timing involved)."""
import json

import pytest

from tilefuse.bench import report as rpt
from tilefuse.bench import targets as tg


def _env(device_type="cuda", gpu="NVIDIA H200"):
    return {"device_type": device_type, "gpu": gpu if device_type == "cuda" else None,
            "torch": "2.11", "triton": "3.6", "tilefuse": "0.1.0", "date": "2026-01-01"}


def _model(model, impl, p50, batch=1, inp="3x224x224", dtype="fp16", size_mb=40.0):
    group = f"model/{model}/{inp}/{dtype}/bs{batch}"
    return {"key": f"{group}/{impl}", "group": group, "impl": impl, "kind": "model",
            "model": model, "input": inp, "dtype": dtype, "batch": batch, "time_ms": p50,
            "p50_ms": p50, "p95_ms": p50 * 1.1, "p99_ms": p50 * 1.2,
            "throughput": batch * 1e3 / p50, "size_mb": size_mb, "samples_ms": [p50] * 3}


def _train(impl, ms, mem):
    return {"key": f"train/resnet50/{impl}", "group": "train/resnet50", "impl": impl,
            "kind": "train", "time_ms": ms, "peak_mem_mb": mem}


def _report(entries, device_type="cuda"):
    rep = rpt.new_report("models", _env(device_type))
    rep["entries"] = entries
    return rep


def test_schema_round_trip(tmp_path):
    rep = _report([_model("resnet50", "eager", 5.0), _model("resnet50", "patched", 4.0)])
    rep["targets"] = tg.evaluate(rep)
    path = rpt.save(rep, tmp_path / "r.json")
    back = rpt.load(path)
    assert back == json.loads(json.dumps(rep))
    assert back["schema_version"] == rpt.SCHEMA_VERSION
    md = rpt.markdown(back)
    assert "## Models" in md and "## Targets" in md and "NVIDIA H200" in md


@pytest.mark.parametrize("mutate, msg", [
    (lambda r: r.update(schema="other"), "not a tilefuse bench report"),
    (lambda r: r.update(schema_version=rpt.SCHEMA_VERSION + 1), "unsupported schema_version"),
    (lambda r: r.pop("entries"), "missing field 'entries'"),
    (lambda r: r["entries"].append(dict(r["entries"][0])), "duplicate entry key"),
    (lambda r: r["entries"][0].pop("group"), "has no 'group'"),
])
def test_schema_errors(tmp_path, mutate, msg):
    rep = _report([_model("resnet50", "eager", 5.0)])
    mutate(rep)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rep))
    with pytest.raises(ValueError, match=msg):
        rpt.load(path)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        rpt.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        rpt.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="kind"):
        rpt.new_report("other", _env())


def test_cpu_report_is_labelled():
    md = rpt.markdown(_report([_model("resnet50", "eager", 5.0)], device_type="cpu"))
    assert "CPU" in md.splitlines()[0] and "not a GPU result" in md


def test_targets_toml_loads():
    data = tg.load_targets()
    tasks = [r["task"] for r in data["inference"]]
    assert tasks == ["image classification", "object detection", "semantic segmentation",
                     "speech recognition", "text classification"]
    img = data["inference"][0]
    assert (img["latency_ms"], img["throughput"], img["size_mb"]) == (10.0, 100.0, 50.0)
    assert tg.peaks_for("NVIDIA H200")["hbm_gbps"] == 4800.0
    assert tg.peaks_for("NVIDIA H100 80GB HBM3")["tflops"]["bf16"] == 989.0
    assert tg.peaks_for("Some Future GPU") is None


def _row(rows, task, model, metric):
    (row,) = [r for r in rows if r["task"] == task and r.get("model") == model
              and r["metric"].startswith(metric)]
    return row


def test_targets_pass_fail_unmeasured():
    entries = [_model("resnet50", "eager", 12.0, size_mb=51.0),
               _model("resnet50", "patched", 8.0, size_mb=51.0),      # best P50: pass
               _model("resnet50", "patched", 100.0, batch=32, size_mb=51.0),  # 320 FPS
               _model("resnet50", "eager", 40.0, inp="3x640x640"),  # detection proxy: fail
               _model("textcls", "patched", 1.0, inp="seq128", dtype="int8", size_mb=5.0),
               _train("fp32", 100.0, 1000.0), _train("amp", 50.0, 600.0),
               _train("fp32+checkpoint", 130.0, 1200.0), _train("fp32+fused", 90.0, 900.0)]
    rows = tg.evaluate(_report(entries))
    assert {r["status"] for r in rows} <= set(tg.STATUSES)
    lat = _row(rows, "image classification", "resnet50", "latency")
    assert (lat["status"], lat["measured"]) == ("pass", 8.0) and "patched" in lat["config"]
    assert _row(rows, "image classification", "resnet50", "throughput")["status"] == "pass"
    assert _row(rows, "image classification", "resnet50", "size")["status"] == "fail"
    assert _row(rows, "image classification", "mobilenet_v2", "latency")["status"] == "unmeasured"
    assert _row(rows, "object detection", "resnet50", "latency")["status"] == "fail"
    assert _row(rows, "semantic segmentation", "resnet50", "latency")["status"] == "unmeasured"
    assert _row(rows, "speech recognition", None, "all")["status"] == "unmeasured"
    assert _row(rows, "text classification", "textcls", "size")["status"] == "pass"
    amp = _row(rows, "mixed precision (AMP)", "resnet50", "fp32")
    assert (amp["status"], amp["measured"]) == ("pass", 2.0)
    ckpt = _row(rows, "gradient checkpointing", "resnet50", "fp32")
    assert ckpt["status"] == "fail"  # more memory than the baseline
    assert _row(rows, "fused kernels (ours)", "resnet50", "fp32")["status"] == "pass"
    assert _row(rows, "cuDNN benchmark", "resnet50", "fp32")["status"] == "unmeasured"


def test_targets_on_cpu_report_are_never_judged():
    rows = tg.evaluate(_report([_model("resnet50", "eager", 1.0), _train("fp32", 10.0, None),
                                _train("amp", 5.0, None)], device_type="cpu"))
    assert {r["status"] for r in rows} == {"unmeasured"}
    lat = _row(rows, "image classification", "resnet50", "latency")
    assert lat["measured"] == 1.0 and "CPU run" in lat["note"]

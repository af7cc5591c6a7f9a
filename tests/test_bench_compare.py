"""``tilefuse compare`` on synthetic reports: regressions, threshold, cross-GPU ratios, exit codes."""
import pytest

from tilefuse.bench import compare as cmp
from tilefuse.bench import report as rpt
from tilefuse.cli import main


def _kreport(times, gpu="NVIDIA H200", targets=()):
    env = {"device_type": "cuda", "gpu": gpu, "date": "2026-01-01"}
    rep = rpt.new_report("kernels", env)
    for case, impls in times.items():
        for impl, ms in impls.items():
            rep["entries"].append({"key": f"kernel/{case}/{impl}", "group": f"kernel/{case}",
                                   "impl": impl, "kind": "kernel", "time_ms": ms})
    rep["targets"] = list(targets)
    return rep


OLD = {"matmul/fwd/a/bf16": {"tilefuse": 1.0, "eager": 2.0, "vendor": 1.0},
       "norm/fwd/b/bf16": {"tilefuse": 0.5, "eager": 1.0}}


def _target(status):
    return {"table": "inference", "task": "image classification", "model": "resnet50",
            "metric": "latency_ms", "status": status, "measured": 9.0}


def test_regression_detected_and_exit_code(tmp_path, capsys):
    new = {k: dict(v) for k, v in OLD.items()}
    new["matmul/fwd/a/bf16"]["tilefuse"] = 1.2    # +20%: regression
    new["norm/fwd/b/bf16"]["tilefuse"] = 0.4      # -20%: improvement
    new["matmul/fwd/a/bf16"]["eager"] = 2.04      # +2%: within 5%
    old_p = rpt.save(_kreport(OLD, targets=[_target("pass")]), tmp_path / "old.json")
    new_p = rpt.save(_kreport(new, targets=[_target("fail")]), tmp_path / "new.json")
    res = cmp.compare(rpt.load(old_p), rpt.load(new_p), 0.05)
    flags = {r["key"]: r["flag"] for r in res["rows"]}
    assert flags["kernel/matmul/fwd/a/bf16/tilefuse"] == "REGRESSION"
    assert flags["kernel/norm/fwd/b/bf16/tilefuse"] == "improved"
    assert flags["kernel/matmul/fwd/a/bf16/eager"] == "same"
    assert not res["cross_device"]
    assert res["target_changes"][0]["old"] == "pass" and res["target_changes"][0]["new"] == "fail"
    assert main(["compare", str(old_p), str(new_p)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "pass -> fail" in out and "1 regression(s)" in out
    # a 25% threshold tolerates the 20% slowdown
    assert main(["compare", str(old_p), str(new_p), "--threshold", "25%"]) == 0
    assert main(["compare", str(old_p), str(old_p)]) == 0


def test_cross_gpu_compares_ratios_to_vendor(tmp_path, capsys):
    # everything 2x faster on the new GPU: raw times would all "improve"; ratios are unchanged
    fast = {k: {i: t / 2 for i, t in v.items()} for k, v in OLD.items()}
    fast["norm/fwd/b/bf16"]["tilefuse"] = 0.5  # vs eager 0.5: relative 1.0 instead of 0.5
    res = cmp.compare(_kreport(OLD), _kreport(fast, gpu="NVIDIA H100"), 0.05)
    assert res["cross_device"]
    flags = {r["key"]: r["flag"] for r in res["rows"]}
    assert flags["kernel/matmul/fwd/a/bf16/tilefuse"] == "same"
    assert flags["kernel/matmul/fwd/a/bf16/vendor"] == "not compared"  # the baseline itself
    assert flags["kernel/norm/fwd/b/bf16/tilefuse"] == "REGRESSION"   # baseline = eager here
    assert "different devices" in cmp.format_result(res)


def test_unmatched_keys_listed():
    new = {"matmul/fwd/a/bf16": OLD["matmul/fwd/a/bf16"], "new/case/x/bf16": {"eager": 1.0}}
    res = cmp.compare(_kreport(OLD), _kreport(new))
    assert res["only_old"] == ["kernel/norm/fwd/b/bf16/eager", "kernel/norm/fwd/b/bf16/tilefuse"]
    assert res["only_new"] == ["kernel/new/case/x/bf16/eager"]
    assert not res["regressions"]


def test_bad_inputs_exit_2(tmp_path, capsys):
    good = rpt.save(_kreport(OLD), tmp_path / "good.json")
    (tmp_path / "bad.json").write_text('{"schema": "nope"}')
    assert main(["compare", str(good), str(tmp_path / "bad.json")]) == 2
    assert main(["compare", str(good), str(tmp_path / "missing.json")]) == 2
    assert main(["compare", str(good), str(good), "--threshold", "abc"]) == 2
    assert "not a tilefuse bench report" in capsys.readouterr().out


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.1", 0.1), ("10", 0.1), (0.02, 0.02)])
def test_parse_threshold(text, value):
    assert cmp.parse_threshold(text) == pytest.approx(value)

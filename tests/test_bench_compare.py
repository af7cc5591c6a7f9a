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
    assert "not a tilefuse bench report" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.1", 0.1), ("0.99", 0.99),
                                         ("100%", 1.0), (" 2.5% ", 0.025), (0.02, 0.02),
                                         ("0", 0.0)])
def test_parse_threshold(text, value):
    assert cmp.parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["1.0", "1", "5", "10", 5, "-1%", "-0.1", "nan", "inf%", "5%%"])
def test_parse_threshold_rejects_ambiguous_or_bad(text):
    """Issue 14 item 7: "0.99" meant 99% but "1.0" meant 1%; a bare number >= 1 is ambiguous."""
    with pytest.raises(ValueError, match="threshold"):
        cmp.parse_threshold(text)


def test_ambiguous_threshold_message_names_both_spellings(tmp_path, capsys):
    good = rpt.save(_kreport(OLD), tmp_path / "good.json")
    assert main(["compare", str(good), str(good), "--threshold", "5"]) == 2
    err = capsys.readouterr().err
    assert "ambiguous" in err and "'5%'" in err and "'0.05'" in err


# ------------------------------------------------------ issue 14 item 6: a gate that fails closed
def _save(tmp_path, name, rep):
    return str(rpt.save(rep, tmp_path / name))


def test_empty_or_partial_new_report_fails(tmp_path, capsys):
    old = _save(tmp_path, "old.json", _kreport(OLD))
    assert main(["compare", old, _save(tmp_path, "empty.json", _kreport({}))]) == 2
    err = capsys.readouterr().err
    assert "5 entries of OLD missing from NEW" in err and "no entry was compared" in err
    partial = _save(tmp_path, "partial.json", _kreport({"norm/fwd/b/bf16": {"eager": 1.0}}))
    assert main(["compare", old, partial]) == 2
    assert "4 entries of OLD missing from NEW" in capsys.readouterr().err
    assert main(["compare", old, partial, "--allow-missing"]) == 0  # listed, not fatal
    assert "only in OLD (4)" in capsys.readouterr().out
    empty = _save(tmp_path, "empty_old.json", _kreport({}))
    assert main(["compare", empty, empty, "--allow-missing"]) == 2  # nothing to gate on


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0, "1.2", None, True])
def test_invalid_times_fail(tmp_path, capsys, bad):
    new = {k: dict(v) for k, v in OLD.items()}
    new["matmul/fwd/a/bf16"]["tilefuse"] = bad
    old = _save(tmp_path, "old.json", _kreport(OLD))
    newp = _save(tmp_path, "new.json", _kreport(new))
    assert main(["compare", old, newp]) == 2
    captured = capsys.readouterr()
    assert "without a finite positive time_ms: kernel/matmul/fwd/a/bf16/tilefuse" in captured.err
    assert "Traceback" not in captured.err
    assert main(["compare", newp, old]) == 2  # an invalid baseline fails too
    assert "entry in OLD without a finite positive time_ms" in capsys.readouterr().err


def test_directory_arguments_name_the_report_inside(tmp_path, capsys):
    a, b, empty = tmp_path / "a", tmp_path / "b", tmp_path / "empty"
    empty.mkdir()
    rpt.save(_kreport(OLD), a / "kernels.json")
    rpt.save(_kreport(OLD), b / "kernels.json")
    assert main(["compare", str(a), str(b)]) == 0
    assert main(["compare", str(a), str(b / "kernels.json")]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(empty)]) == 2
    assert "directory without kernels.json" in capsys.readouterr().err
    # a directory holding both kinds takes the other argument's kind, else asks to name one
    models = rpt.new_report("models", {"device_type": "cuda", "gpu": "NVIDIA H200"})
    models["entries"].append({"key": "model/m/eager", "group": "model/m", "impl": "eager",
                              "kind": "model", "time_ms": 3.0})
    rpt.save(models, b / "models.json")
    assert main(["compare", str(a / "kernels.json"), str(b)]) == 0
    assert main(["compare", str(b), str(b)]) == 2
    assert "holds kernels.json and models.json" in capsys.readouterr().err

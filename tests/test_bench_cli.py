"""CPU smoke runs of ``tilefuse bench kernels`` / ``bench models`` at tiny sizes: reports, Markdown
and plots written, everything labelled CPU, broken benchmark modules reported not fatal.
No assertion on time."""
import json
import pkgutil

import pytest
import torch

from tilefuse.bench import kernels as kb
from tilefuse.bench import models as mb
from tilefuse.bench import report as rpt
from tilefuse.bench.case import BenchCase
from tilefuse.cli import main


def test_bench_kernels_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "k"
    rc = main(["bench", "kernels", "--only", "matmul", "--reps", "1", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    rep = rpt.load(out / "kernels.json")
    assert rep["env"]["device_type"] == "cpu" and rep["env"]["size"] == "tiny"
    impls = {e["impl"] for e in rep["entries"]}
    assert impls == {"tilefuse", "eager", "vendor"}  # no torch.compile on CPU by default
    for e in rep["entries"]:
        assert e["time_ms"] > 0 and e["tflops"] > 0 and e["pct_peak"] is None
    assert (out / "plots" / "kernels_matmul.png").stat().st_size > 0
    md = (out / "kernels.md").read_text()
    assert "CPU (torch backend, tiny sizes - not a GPU result)" in md
    assert "kernel/matmul/fwd/" in capsys.readouterr().out


def test_discover_reports_broken_modules(monkeypatch):
    real = pkgutil.iter_modules

    def fake(path):
        yield from real(path)
        yield pkgutil.ModuleInfo(None, "kernels_doesnotexist", False)

    monkeypatch.setattr(kb.pkgutil, "iter_modules", fake)
    mods, errors = kb.discover()
    assert "matmul" in mods
    assert [e["where"] for e in errors] == ["tilefuse.bench.kernels_doesnotexist"]
    _, errors = kb.discover(only=["nosuch"])
    assert errors[0]["error"] == "no such benchmark module"


def test_failing_impl_is_reported_not_fatal():
    def boom():
        raise RuntimeError("no compiler")

    case = BenchCase("toy", "add/8", {"n": 8}, "fp32",
                     fns={"eager": lambda: torch.ones(8) + 1, "compile": boom}, bytes=96.0)
    peaks = {"hbm_gbps": None, "tflops": {}}
    entries, errors = kb.case_entries(case, "cpu", peaks, cpu_reps=1)
    assert [e["impl"] for e in entries] == ["eager"] and entries[0]["gbps"] > 0
    assert errors == [{"where": "toy/add/8/fp32/compile", "error": "RuntimeError: no compiler"}]


def _toy(fused=False):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4))


def test_bench_models_cpu_smoke(tmp_path, monkeypatch):
    monkeypatch.setitem(mb.EXTRA_MODELS, "toy", (_toy, "3x2x2"))
    out = tmp_path / "m"
    rc = main(["bench", "models", "--models", "toy,nosuchmodel", "--runs", "3", "--warmup", "1",
               "--train-configs", "fp32,amp,fp32+checkpoint", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    rep = rpt.load(out / "models.json")
    models = [e for e in rep["entries"] if e["kind"] == "model"]
    assert {e["impl"] for e in models} == {"eager", "patched"}
    for e in models:
        assert e["p50_ms"] <= e["p95_ms"] <= e["p99_ms"] and len(e["samples_ms"]) == 3
        assert e["size_mb"] > 0 and e["peak_mem_mb"] is None  # CPU: memory not measured
    train = {e["impl"]: e for e in rep["entries"] if e["kind"] == "train"}
    assert set(train) == {"fp32", "amp", "fp32+checkpoint"}
    assert any(e["where"].startswith("model/nosuchmodel") for e in rep["errors"])
    assert {t["status"] for t in rep["targets"]} == {"unmeasured"}
    assert (out / "plots" / "latency_toy.png").stat().st_size > 0
    assert (out / "plots" / "training.png").exists()
    assert json.loads((out / "models.json").read_text())["kind"] == "models"


def test_time_budget_skips_rest(tmp_path, monkeypatch):
    monkeypatch.setitem(mb.EXTRA_MODELS, "toy", (_toy, "3x2x2"))
    rep = mb.run(models=["toy"], variants=["eager"], runs=2, warmup=1, train=False,
                 time_budget_s=1e-9, show_progress=False)
    assert rep["entries"] == []
    assert rep["errors"][0]["error"] == "skipped: time budget spent"


def test_kernels_only_order_budget_and_partial_report(tmp_path, monkeypatch):
    """Families run in the order ``--only`` names them; once the budget is spent the remaining
    families' inputs are never built; a partial report is saved after every family."""
    mods, _ = kb.discover(only=["matmul", "dropout"])
    assert list(mods) == ["matmul", "dropout"]
    built = []
    for fam, mod in mods.items():
        real = mod.cases
        monkeypatch.setattr(mod, "cases", lambda *a, _f=fam, _r=real: built.append(_f) or _r(*a))
    partial = tmp_path / "kernels.partial.json"
    rep = kb.run(only=["matmul", "dropout"], cpu_reps=1, time_budget_s=1e-9,
                 show_progress=False, partial_path=partial)
    assert built == [] and rep["entries"] == []
    assert [e["where"] for e in rep["errors"]] == ["kernel/matmul/fp32", "kernel/dropout/fp32"]
    assert rpt.load(partial)["kind"] == "kernels"


def test_bad_cli_arguments():
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--impls", "nope"])
    with pytest.raises(SystemExit):
        main(["bench", "models", "--batch", "x"])


def test_training_only(tmp_path, monkeypatch):
    monkeypatch.setitem(mb.EXTRA_MODELS, "toy", (_toy, "3x2x2"))
    rep = mb.run(models=["toy"], inference=False, train_configs=["fp32", "fp32+fused"], runs=2,
                 warmup=1, show_progress=False, partial_path=tmp_path / "p.json")
    assert {e["kind"] for e in rep["entries"]} == {"train"}
    assert rpt.load(tmp_path / "p.json")["entries"] == rep["entries"]


@pytest.mark.slow
def test_bench_models_zoo_cpu(tmp_path):
    """The real model zoo (tilefuse.models) through the CLI at tiny sizes: slow on a small CPU."""
    out = tmp_path / "zoo"
    assert main(["bench", "models", "--models", "textcls,mobilenet_v2", "--runs", "2",
                 "--warmup", "1", "--dtype", "fp32,int8", "--train-configs", "fp32,fp32+fused",
                 "--out", str(out), "--no-progress"]) == 0
    rep = rpt.load(out / "models.json")
    measured = {(e["model"], e["dtype"], e["impl"]) for e in rep["entries"] if e["kind"] == "model"}
    assert ("textcls", "fp32", "eager") in measured and ("textcls", "int8", "patched") in measured


def test_cross_entropy_is_its_own_family():
    """Issue 15: the cross-entropy case was filed under the dropout family."""
    mods, errors = kb.discover(only=["cross_entropy"])
    assert list(mods) == ["cross_entropy"] and not errors
    ce = mods["cross_entropy"].cases("cpu", torch.float32, "tiny")
    assert [c.family for c in ce] == ["cross_entropy"]
    assert ce[0].key == "cross_entropy/fwd+bwd/ls0.1/16x1000/fp32"
    dropout, _ = kb.discover(only=["dropout"])
    cases = dropout["dropout"].cases("cpu", torch.float32, "tiny")
    assert {c.family for c in cases} == {"dropout"}
    assert not any("cross_entropy" in c.name for c in cases)


def test_progress_in_a_log_is_plain_lines(capsys):
    """Issue 15: tqdm redraws (carriage returns) flooded non-terminal logs."""
    from tilefuse.bench import timing

    assert list(timing.progress(range(3), "cases")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == ["cases: 0/3 it", "cases: 3/3 it"]
    assert timing.progress([1], "x", enable=False) == [1]

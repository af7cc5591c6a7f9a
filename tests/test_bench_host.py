"""``tilefuse bench host``: runs on a subset in the interpreter lane with the launch stubbed, writes
a report ``tilefuse compare`` accepts (a host-cost regression shows there), every row reached its
Triton kernel, and the stub is gone afterwards. No assertion on time."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse.bench import compare, host
from tilefuse.bench import report as rpt
from tilefuse.bench.host_cases import CASES, HostCase
from tilefuse.cli import list_ops, main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU interpreter lane (the CUDA lane times real launches)")

SUBSET = "linear+gelu/fwd+bwd,batch_norm_act/train,cross_entropy,w8a8_linear,AdamW"
SUBSET_ROWS = {"linear+gelu/fwd+bwd", "batch_norm_act/train", "cross_entropy/ls=0.1",
               "cross_entropy/ls=0.1/grad", "w8a8_linear", "AdamW.step"}


def _run(tmp_path, *extra):
    path = tmp_path / "host.json"
    rc = main(["bench", "host", "--only", SUBSET, "--calls", "2", "--repeats", "1",
               "--json", str(path), *extra])
    return rc, path


def test_subset_report_launches_and_compare(tmp_path, capsys):
    threads = torch.get_num_threads()
    rc, path = _run(tmp_path)
    assert rc == 0
    assert torch.get_num_threads() == threads  # set to 1 for the run only
    out = capsys.readouterr().out
    assert "| op | tilefuse us | torch us | ratio | launches/call |" in out
    assert "geometric mean ratio" in out and "worst" in out
    rep = rpt.load(path)
    assert rep["kind"] == "host" and rep["errors"] == []
    assert rep["env"]["lane"] == "interpreter, launches stubbed" and rep["env"]["threads"] == 1
    ours = {e["op"]: e for e in rep["entries"] if e["impl"] == "tilefuse"}
    assert set(ours) == SUBSET_ROWS
    assert {e["op"] for e in rep["entries"] if e["impl"] == "eager"} == SUBSET_ROWS
    for e in ours.values():
        assert e["launches_per_call"] >= 1 and e["flag"] is None, e
        assert e["time_ms"] > 0 and e["time_us"] == pytest.approx(e["time_ms"] * 1e3)
    assert ours["linear+gelu/fwd+bwd"]["launches_per_call"] >= 2  # backward launches too
    # the report is what `tilefuse compare` reads; a slower tilefuse call is a regression
    assert main(["compare", str(path), str(path)]) == 0
    slower = copy.deepcopy(rep)
    for e in slower["entries"]:
        if e["key"] == "host/AdamW.step/tilefuse":
            e["time_ms"] *= 2
    res = compare.compare(rep, slower, 0.05)
    assert [r["key"] for r in res["regressions"]] == ["host/AdamW.step/tilefuse"]


def test_every_public_op_has_a_row():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert set(list_ops()) <= {c.op for c in CASES}
    assert "AdamW" in {c.op for c in CASES}


def test_stub_counts_and_is_restored_even_after_an_error():
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.__dict__["run"]
    x, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
    with pytest.raises(RuntimeError, match="inside"):
        with host.stub_launches() as count:
            tilefuse.ops.linear(x, w, b, activation="relu")
            assert count.n == 1
            assert InterpretedFunction.__dict__["run"] is not real
            raise RuntimeError("inside")
    assert InterpretedFunction.__dict__["run"] is real
    # a kernel runs for real again: the output is computed, not left uninitialised
    y = tilefuse.ops.linear(x, w, b, activation="relu")
    torch.testing.assert_close(y, F.relu(F.linear(x, w, b)), rtol=1e-4, atol=1e-4)


def test_cuda_lane_counter_wraps_and_restores_the_compiled_launch():
    from triton.runtime.jit import JITFunction

    real = JITFunction.__dict__["run"]
    with host.count_launches() as count:
        assert JITFunction.__dict__["run"] is not real and count.n == 0
    assert JITFunction.__dict__["run"] is real


def test_row_without_a_launch_is_flagged():
    def build(dev):
        x = torch.randn(4, 8, device=dev)
        return (lambda: x * 2), (lambda: x * 2), "x * 2"

    with host.stub_launches() as count:
        row = host.measure(HostCase("torch-only", "torch-only", build), "cpu", calls=2,
                           repeats=1, stub_count=count)
    assert row["launches_per_call"] == 0 and row["flag"] == host.NO_LAUNCH


def test_bad_arguments(tmp_path, capsys):
    assert main(["bench", "host", "--only", "nosuch", "--calls", "1", "--repeats", "1"]) == 2
    assert "only: unknown op(s) ['nosuch']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="calls must be a positive integer"):
        host.run("cpu", only=["matmul"], calls=0)
    assert main(["bench", "host", "--device", "cuda", "--only", "matmul"]) == 2
    assert "device:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "host", "--repeats", "0"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_reruns_itself_in_the_interpreter(tmp_path):
    """Started without TRITON_INTERPRET, the command re-runs itself with it set."""
    path = tmp_path / "h.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(tilefuse.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-m", "tilefuse", "bench", "host", "--device", "cpu",
                          "--only", "matmul", "--calls", "1", "--repeats", "1", "--json",
                          str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rep = json.loads(path.read_text())
    assert rep["env"]["interpreter"] is True
    # (--only matmul: the op's rows, matmul and matmul/grad)
    assert [e["launches_per_call"] for e in rep["entries"] if e["impl"] == "tilefuse"] == [1, 1]

"""Ahead-of-time compile check (tools/aot_check.py): the Triton kernels that tilefuse's public ops
launch compile for a real NVIDIA target (sm_90) with the ptxas bundled in the triton wheel, no GPU
needed. The tool must run in a fresh process without TRITON_INTERPRET (conftest sets it for the
interpreter lane), so each test runs it in a subprocess."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "aot_check.py"


def _has_ptxas() -> bool:
    try:
        import triton
    except Exception:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _has_ptxas(), reason="triton wheel without NVIDIA ptxas")


def _run(tmp_path, *args, timeout=900):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TILEFUSE_BACKEND", "TRITON_CACHE_DIR")}
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--json", str(out), "--cache-dir", str(tmp_path / "cache"),
         *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def _failures(report):
    lines = [f"{r['kernel']} [{r['spec']}] at {r['where']}: {r.get('error')}"
             for r in report["results"] if r["status"] == "FAIL"]
    lines += [f"driver: {e['scenario']}: {e['error']} ({e['where']})"
              for e in report["driver_errors"] if e.get("level") != "note"]
    return "\n".join(lines)


def scenario_report(tmp_path, families: str, scenarios) -> dict:
    """The ``--full --json`` report of exactly the named ``scenarios`` of ``families`` (each name
    matched literally), asserted to compile with no failure."""
    only = "^(" + "|".join(re.escape(n) for n in scenarios) + ")$"
    proc, rep = _run(tmp_path, "--families", families, "--only", only, "--full", "--jobs", "1",
                     timeout=600)
    assert rep is not None, proc.stdout + proc.stderr
    assert proc.returncode == 0, _failures(rep) or proc.stdout[-4000:]
    return rep


def test_aot_matmul_fp16_smoke(tmp_path):
    """One fp16 matmul launch compiles to an sm_90 cubin without a GPU (the aligned operands
    take the persistent TMA kernel there: TMA copies in its PTX)."""
    proc, report = _run(tmp_path, "--families", "matmul", "--only", r"^linear torch\.float16 M=48$",
                        "--jobs", "1", timeout=300)
    assert report is not None, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(report["results"]) == 1
    r = report["results"][0]
    assert r["kernel"] == "gemm_tma_kernel" and r["status"] in ("OK", "SPILL")
    assert r["tma"] and r["wgmma"]  # read from the PTX
    assert r["signature"]["a_ptr"] == "*fp16"
    assert r["regs"] and r["shared"] > 0  # read from the ptxas log / kernel metadata
    assert report["arch"] == 90


def test_aot_usage_error():
    proc = subprocess.run([sys.executable, str(TOOL), "--families", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown families" in proc.stderr


@pytest.mark.slow
def test_aot_int8_family(tmp_path):
    proc, report = _run(tmp_path, "--families", "int8")
    assert report is not None, proc.stdout + proc.stderr
    assert {r["kernel"] for r in report["results"]} >= {"int8_matmul_kernel",
                                                         "quantize_rows_kernel"}
    assert proc.returncode == 0, _failures(report) or proc.stdout[-4000:]


@pytest.mark.slow
def test_aot_all_families(tmp_path):
    """Every kernel family: every recorded specialization compiles and fits sm_90's 227 KB."""
    proc, report = _run(tmp_path, timeout=3600)
    assert report is not None, proc.stdout + proc.stderr
    assert proc.returncode == 0, _failures(report) or proc.stdout[-4000:]

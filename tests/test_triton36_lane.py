"""Interpreter tests under triton 3.6 (the GPU machines' version) where the `make aot36` lane is
installed (.venv-t36/site, docs/aot_check.md); skipped otherwise. Each runs in a subprocess with
triton 3.6 shadowing the venv's triton.

Regression: triton 3.6 lowers a float unary minus to ``0 - x`` (3.9: a true negation), so the
fp8 quantizer's ``-r`` turned -0.0 into +0.0, on the GPU as in the 3.6 interpreter."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / ".venv-t36" / "site"

pytestmark = pytest.mark.skipif(not (SITE / "triton" / "__init__.py").exists(),
                                reason="triton 3.6 lane not installed (make aot36)")


def _pytest36(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(SITE), TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", "not slow and not cuda", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_lane_runs_triton_36():
    env = dict(os.environ, PYTHONPATH=str(SITE))
    out = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().startswith("3.6"), out.stdout + out.stderr


def test_fp8_quantizer_keeps_negative_zero_under_triton_36():
    proc = _pytest36("tests/test_fp8_matmul.py", "-k", "quantizer_bit_exact")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

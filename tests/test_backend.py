"""Backend dispatch, the torch reference path, the CLI's `info`."""
import subprocess
import sys

import pytest
import torch

import tilefuse
from tilefuse import _backend, ops


def test_cpu_interpreter_lane_uses_triton():
    assert _backend.interpreter_enabled()
    assert tilefuse.backend_for(torch.zeros(1)) == "triton"


def test_forced_torch(monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    assert tilefuse.backend_for(torch.zeros(1)) == "torch"
    a, b = torch.randn(5, 3), torch.randn(3, 4)
    torch.testing.assert_close(ops.matmul(a, b, activation="relu"), torch.relu(a @ b))


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "cudnn")
    with pytest.raises(_backend.BackendError, match="TILEFUSE_BACKEND"):
        tilefuse.backend_for(torch.zeros(1))


def test_forced_triton_without_interpreter_is_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "_INTERPRET_AT_IMPORT", False)
    monkeypatch.setenv("TILEFUSE_BACKEND", "triton")
    with pytest.raises(_backend.BackendError, match="TRITON_INTERPRET=1"):
        _backend.backend_for_device("cpu")
    monkeypatch.setenv("TILEFUSE_BACKEND", "")
    assert _backend.backend_for_device("cpu") == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_path_matches_triton_path(monkeypatch, dtype):
    a = torch.randn(9, 12, dtype=dtype)
    w = torch.randn(5, 12, dtype=dtype)
    bias = torch.randn(5, dtype=dtype)
    y_triton = ops.linear(a, w, bias, activation="silu")
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    y_torch = ops.linear(a, w, bias, activation="silu")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y_triton, y_torch, rtol=tol, atol=tol)


def test_torch_path_backward(monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: ops.linear(x, w, activation="gelu"), (x, w))


def test_describe_has_versions():
    info = _backend.describe()
    assert info["torch"] == torch.__version__
    assert info["device"] == ("cpu" if not torch.cuda.is_available() else info["device"])


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "tilefuse", "info"], capture_output=True,
                         text=True, check=True).stdout
    for word in ("torch", "triton", "python", "device", "backend per op", "matmul",
                 "autotune cache"):
        assert word in out


def test_compat_index_fix_only_for_old_triton_with_new_numpy():
    """triton < 3.7's interpreter needs the int(array) fix under numpy >= 2.4 (tilefuse/_compat)."""
    from tilefuse._compat import interpreter_needs_index_fix as need

    assert need("3.6.0", "2.4.6")
    assert need("3.5.1", "2.4.0rc1")
    assert not need("3.6.0", "2.3.5")
    assert not need("3.7.0", "2.4.6")
    assert not need("3.9.0+git1234", "2.5.0")

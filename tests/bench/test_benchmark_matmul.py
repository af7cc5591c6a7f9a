"""pytest-benchmark: fused matmul+bias+GELU (tilefuse) vs eager mm+add+gelu, fwd and fwd+bwd.

CI runs these once each (``--benchmark-disable`` in pyproject's addopts) as a smoke check that the
benchmarked callables work; nothing asserts on time. To time them:
``python -m pytest tests/bench --benchmark-enable`` (on a GPU for meaningful numbers; on CPU with
TRITON_INTERPRET=1 the tilefuse rows time the Triton interpreter, not a kernel).
"""
import pytest
import torch
import torch.nn.functional as F

import tilefuse


def _eager(a, w, b):
    return F.gelu(torch.mm(a, w) + b)


def _ours(a, w, b):
    return tilefuse.ops.matmul(a, w, bias=b, activation="gelu")


@pytest.fixture
def operands(device):
    M, N, K = (4096, 4096, 4096) if device == "cuda" else (33, 24, 40)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(M, K, device=device, dtype=dtype)
    w = torch.randn(K, N, device=device, dtype=dtype) * K ** -0.5
    b = torch.randn(N, device=device, dtype=dtype)
    return a, w, b


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["tilefuse", "eager"])
def test_matmul_bias_gelu_fwd(benchmark, operands, device, impl):
    fn = _ours if impl == "tilefuse" else _eager
    benchmark.group = "matmul+bias+gelu fwd"

    def run():
        y = fn(*operands)
        _sync(device)
        return y

    y = benchmark(run)
    torch.testing.assert_close(y.float(), _eager(*operands).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", ["tilefuse", "eager"])
def test_matmul_bias_gelu_fwd_bwd(benchmark, operands, device, impl):
    fn = _ours if impl == "tilefuse" else _eager
    a, w, b = (t.clone().requires_grad_(True) for t in operands)
    g = torch.randn(a.shape[0], w.shape[1], device=device, dtype=a.dtype)
    benchmark.group = "matmul+bias+gelu fwd+bwd"

    def run():
        a.grad = w.grad = b.grad = None
        fn(a, w, b).backward(g)
        _sync(device)

    benchmark(run)
    assert a.grad is not None and w.grad is not None and b.grad is not None
    assert a.grad.shape == a.shape and torch.isfinite(w.grad.float()).all()

"""GPU-only checks of the compiled matmul (skipped without CUDA): realistic sizes, all dtypes,
TF32 semantics, large batch counts. Run by bench/gpu_check.sh."""
import pytest
import torch
import torch.nn.functional as F

from tilefuse import ops
from utils import assert_close_to_ref

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (1000, 1000, 1000), (4096, 4096, 512),
                                   (257, 513, 129)])
def test_large_vs_fp64(dtype, M, N, K):
    a = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5
    bias = torch.randn(N, device="cuda", dtype=dtype)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = ops.linear(a, w, bias, activation="gelu")
        eager = F.gelu(F.linear(a, w, bias))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    ref = F.gelu(F.linear(a.double(), w.double(), bias.double()))
    assert_close_to_ref(out, ref, eager, factor=4.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_large(dtype):
    x = torch.randn(512, 768, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(1024, 768, device="cuda", dtype=dtype) / 28).requires_grad_()
    b = torch.randn(1024, device="cuda", dtype=dtype, requires_grad=True)
    y = ops.linear(x, w, b, activation="silu")
    g = torch.randn_like(y)
    y.backward(g)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.silu(F.linear(xd, wd, bd)).backward(g.double())
    xe, we, be = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.silu(F.linear(xe, we, be)).backward(g)
    assert_close_to_ref(x.grad, xd.grad, xe.grad, name="dx")
    assert_close_to_ref(w.grad, wd.grad, we.grad, name="dw")
    assert_close_to_ref(b.grad, bd.grad, be.grad, factor=8.0, name="db")


def test_many_batches_grid_y_chunking():
    a = torch.randn(70000, 4, 8, device="cuda")
    b = torch.randn(70000, 8, 4, device="cuda")
    torch.testing.assert_close(ops.matmul(a, b), a @ b, rtol=1e-4, atol=1e-4)

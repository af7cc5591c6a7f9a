"""int8 GEMM (raw int32 exactness, fused epilogue) and weight-only int8 linear."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
from utils import assert_close_to_ref

ops = tilefuse.ops


def _i8(*shape, device="cpu"):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=device)


def _ref_int(a, b):
    return (a.long() @ b.long()).to(torch.int32)


@pytest.mark.parametrize("M,K,N", [(1, 37, 256), (33, 100, 70), (0, 16, 8), (5, 0, 7)])
def test_raw_int32_exact(device, M, K, N):
    a, b = _i8(M, K, device=device), _i8(K, N, device=device)
    out = ops.int8_matmul(a, b)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    assert torch.equal(out.cpu(), _ref_int(a.cpu(), b.cpu()))


def test_raw_strided_and_batched(device):
    base = _i8(6, 40, 2 * 50, device=device)
    a = base[..., ::2]                      # non-contiguous K
    w = _i8(24, 50, device=device)          # (N, K) weight read as b = w.t() through strides
    out = ops.int8_matmul(a, w.t())
    assert out.shape == (6, 40, 24)
    assert torch.equal(out.cpu(), _ref_int(a.cpu(), w.t().cpu()))
    v = ops.int8_matmul(a[0, 0], w.t())     # 1-D a
    assert torch.equal(v.cpu(), _ref_int(a[0, 0:1].cpu(), w.t().cpu())[0])


def test_torch_backend_matches(device, monkeypatch):
    a, b = _i8(9, 45, device=device), _i8(45, 13, device=device)
    kern = ops.int8_matmul(a, b)
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    assert torch.equal(ops.int8_matmul(a, b), kern)


@pytest.mark.parametrize("out_dtype,act", [(torch.float32, "gelu"), (torch.float16, "silu"),
                                           (torch.bfloat16, ("leaky_relu", 0.1))])
def test_epilogue(device, out_dtype, act):
    M, K, N = 19, 72, 40
    a, b = _i8(M, K, device=device), _i8(K, N, device=device)
    sa = torch.rand(M, 1, device=device) * 1e-3 + 1e-4
    sb = torch.rand(N, device=device) * 1e-2 + 1e-3
    bias = torch.randn(N, device=device)
    res = torch.randn(M, N, device=device).to(out_dtype)
    out = ops.int8_matmul(a, b, sa, sb, bias=bias, activation=act, residual=res,
                          out_dtype=out_dtype)
    assert out.dtype == out_dtype
    name, p = tilefuse.activations.parse_activation(act)
    z = (a.double() @ b.double()) * sa.double() * sb.double() + bias.double()
    ref = tilefuse.activations.torch_activation(z, name, p) + res.double()
    assert_close_to_ref(out, ref, eager=ref.to(out_dtype))


def test_per_tensor_scales_default_dtype(device):
    a, b = _i8(3, 4, 17, device=device), _i8(17, 9, device=device)
    sa, sb = torch.tensor(0.02, device=device), torch.tensor([0.5], device=device)
    out = ops.int8_matmul(a, b, a_scale=sa, b_scale=sb)
    assert out.dtype == torch.float32 and out.shape == (3, 4, 9)
    ref = (a.double() @ b.double()) * 0.02 * 0.5
    assert_close_to_ref(out, ref, eager=ref.float())
    per_row = ops.int8_matmul(a, b, a_scale=torch.full((3, 4), 0.02, device=device), b_scale=sb)
    assert torch.allclose(per_row, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_only_linear(device, dtype):
    w = torch.randn(48, 70, device=device)
    qw, s = ops.quantize_per_row(w)
    x = torch.randn(2, 3, 70, device=device).to(dtype)
    bias = torch.randn(48, device=device)
    out = ops.weight_only_int8_linear(x, qw, s, bias=bias, activation="relu")
    assert out.dtype == dtype and out.shape == (2, 3, 48)
    wd = qw.double() * s.double()
    ref = torch.relu(x.double() @ wd.t() + bias.double())
    eager = torch.relu(F.linear(x, wd.to(dtype), bias.to(dtype)))
    assert_close_to_ref(out, ref, eager=eager)


def test_weight_only_backward_to_x(device):
    w = torch.randn(24, 33, device=device)
    qw, s = ops.quantize_per_row(w)
    bias = torch.randn(24, device=device, requires_grad=True)
    x = torch.randn(5, 33, device=device, requires_grad=True)
    ops.weight_only_int8_linear(x, qw, s, bias=bias, activation="gelu").pow(2).sum().backward()
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    F.gelu(x64 @ (qw.double() * s.double()).t() + b64).pow(2).sum().backward()
    assert_close_to_ref(x.grad, x64.grad, name="dx")
    assert_close_to_ref(bias.grad, b64.grad, name="dbias")


def test_bad_inputs(device):
    a, b = _i8(4, 16, device=device), _i8(16, 8, device=device)
    with pytest.raises(TypeError, match="a must have dtype"):
        ops.int8_matmul(a.float(), b)
    with pytest.raises(TypeError, match="b must have dtype"):
        ops.int8_matmul(a, b.half())
    with pytest.raises(ValueError, match="inner dimensions"):
        ops.int8_matmul(a, _i8(15, 8, device=device))
    with pytest.raises(ValueError, match="a_scale"):
        ops.int8_matmul(a, b, a_scale=torch.ones(5, device=device))
    with pytest.raises(TypeError, match="b_scale"):
        ops.int8_matmul(a, b, b_scale=torch.ones(8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="b_scale"):
        ops.int8_matmul(a, b, b_scale=torch.ones(7, device=device))
    with pytest.raises(ValueError, match="raw accumulator"):
        ops.int8_matmul(a, b, b_scale=torch.ones(8, device=device), out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.int8_matmul(a, b, out_dtype=torch.int64)
    with pytest.raises(ValueError, match="bias"):
        ops.int8_matmul(a, b, bias=torch.ones(3, device=device))
    with pytest.raises(TypeError, match="qweight must have dtype"):
        ops.weight_only_int8_linear(torch.randn(2, 16, device=device), b.t().float(),
                                    torch.ones(8, device=device))
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.weight_only_int8_linear(a, b.t(), torch.ones(8, device=device))


@pytest.mark.slow
def test_compile_fullgraph(device):
    a, b = _i8(8, 32, device=device), _i8(32, 16, device=device)
    sb = torch.rand(16, device=device)
    fn = torch.compile(lambda a, b, s: ops.int8_matmul(a, b, b_scale=s, activation="relu"),
                       fullgraph=True)
    assert torch.allclose(fn(a, b, sb), ops.int8_matmul(a, b, b_scale=sb, activation="relu"))


@pytest.mark.cuda
def test_cuda_large_matches_int_mm():
    a, b = _i8(256, 4096, device="cuda"), _i8(4096, 1024, device="cuda")
    assert torch.equal(ops.int8_matmul(a, b), torch._int_mm(a, b))
    a1 = _i8(1, 4096, device="cuda")
    assert torch.equal(ops.int8_matmul(a1, b), _ref_int(a1.cpu(), b.cpu()).cuda())


def test_w8a8_bias_and_residual_grads(device):
    a, b = _i8(6, 20, device=device), _i8(20, 5, device=device)
    sa, sb = torch.rand(6, device=device) * 1e-4, torch.rand(5, device=device)
    bias = torch.randn(5, device=device, requires_grad=True)
    res = torch.randn(6, 5, device=device, requires_grad=True)
    ops.int8_matmul(a, b, sa, sb, bias=bias, activation="tanh", residual=res).sum().backward()
    z = (a.double() @ b.double()) * sa.double()[:, None] * sb.double() + bias.detach().double()
    assert_close_to_ref(bias.grad, (1 - torch.tanh(z) ** 2).sum(0), name="dbias")
    assert torch.equal(res.grad, torch.ones_like(res))

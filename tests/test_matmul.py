"""Fused matmul: forward/backward vs an fp64 reference (interpreter lane on CPU)."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse import ops
from tilefuse.activations import ACTIVATIONS, torch_activation
from utils import assert_close_to_ref

ACTS = sorted(ACTIVATIONS)


def _ref(a, b, bias=None, act="none", param=0.0, residual=None):
    z = a.double() @ b.double()
    if bias is not None:
        z = z + bias.double()
    y = torch_activation(z, act, param)
    if residual is not None:
        y = y + residual.double()
    return y


def _eager(a, b, bias=None, act="none", param=0.0, residual=None):
    z = a @ b
    if bias is not None:
        z = z + bias
    y = torch_activation(z, act, param)
    return y + residual if residual is not None else y


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (17, 31, 13), (1, 64, 5), (70, 33, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_dtypes(M, K, N, dtype, device):
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, N, device=device, dtype=dtype)
    bias = torch.randn(N, device=device, dtype=dtype)
    out = ops.matmul(a, b, bias, activation="gelu")
    assert out.dtype == dtype and out.shape == (M, N)
    eager = _eager(a.float(), b.float(), bias.float(), "gelu").to(dtype)
    assert_close_to_ref(out, _ref(a, b, bias, "gelu"), eager)


@pytest.mark.parametrize("act", ACTS)
def test_every_activation_fwd_bwd(act, device):
    param = 0.2 if act == "leaky_relu" else 0.0
    a = torch.randn(9, 20, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 20, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, device=device, dtype=torch.float64, requires_grad=True)
    # float constexprs are fp32 in Triton: the leaky slope is fp32-rounded, even in fp64 math
    tol = 1e-6 if act == "leaky_relu" else 1e-9
    y = ops.linear(a, w, bias, activation=(act, param))
    a2, w2, b2 = (t.detach().clone().requires_grad_() for t in (a, w, bias))
    y2 = torch_activation(F.linear(a2, w2, b2), act, param)
    torch.testing.assert_close(y, y2, rtol=tol, atol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    for t, t2 in ((a, a2), (w, w2), (bias, b2)):
        torch.testing.assert_close(t.grad, t2.grad, rtol=tol, atol=tol)


def test_gradcheck_fp64(device):
    a = torch.randn(5, 7, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    res = torch.randn(5, 3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, w, b, r: ops.linear(a, w, b, activation="silu", residual=r), (a, w, bias, res))


def test_grad_only_through_residual(device):
    a, b = torch.randn(4, 5, device=device), torch.randn(5, 3, device=device)
    r = torch.randn(4, 3, device=device, requires_grad=True)
    ops.matmul(a, b, activation="relu", residual=r).sum().backward()
    torch.testing.assert_close(r.grad, torch.ones_like(r))


def test_fp32_backward_close_to_torch(device):
    x = torch.randn(33, 48, device=device, requires_grad=True)
    ref = torch.nn.Linear(48, 19).to(device)
    m = tilefuse.nn.Linear(48, 19, activation="gelu_tanh").to(device)
    m.load_state_dict(ref.state_dict())
    x2 = x.detach().clone().requires_grad_()
    y = m(x)
    y2 = F.gelu(ref(x2), approximate="tanh")
    assert_close_to_ref(y, y2.double(), factor=4.0)
    y.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


def test_half_backward(device):
    x = torch.randn(16, 32, device=device, dtype=torch.float16, requires_grad=True)
    w = torch.randn(24, 32, device=device, dtype=torch.float16, requires_grad=True)
    y = ops.linear(x, w, activation="relu")
    g = torch.randn_like(y)
    y.backward(g)
    xd, wd = x.double().detach().requires_grad_(), w.double().detach().requires_grad_()
    F.relu(xd @ wd.t()).backward(g.double())
    assert x.grad.dtype == torch.float16
    assert_close_to_ref(x.grad, xd.grad, factor=4.0, name="dx")
    assert_close_to_ref(w.grad, wd.grad, factor=4.0, name="dw")


def test_transposed_and_sliced_inputs(device):
    base = torch.randn(40, 50, device=device)
    a = base[3:20:2, 5:35]            # non-contiguous rows
    b = torch.randn(25, 30, device=device).t()   # (30, 25), column-major
    assert not a.is_contiguous() and not b.is_contiguous()
    out = ops.matmul(a, b)
    assert_close_to_ref(out, _ref(a, b), a @ b)


@pytest.mark.parametrize("b_batched", [False, True])
def test_batched_3d(b_batched, device):
    a = torch.randn(3, 11, 9, device=device, requires_grad=True)
    b = torch.randn(*((3,) if b_batched else ()), 9, 6, device=device, requires_grad=True)
    out = ops.matmul(a, b, activation="relu")
    ref = torch.relu(a @ b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    ref.sum().backward()
    torch.testing.assert_close(ga, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, b.grad, rtol=1e-5, atol=1e-5)


def test_broadcast_batch_and_residual(device):
    a = torch.randn(2, 1, 5, 4, device=device)
    b = torch.randn(3, 4, 6, device=device)
    res = torch.randn(6, device=device)
    out = ops.matmul(a, b, residual=res)
    assert out.shape == (2, 3, 5, 6)
    torch.testing.assert_close(out, a @ b + res, rtol=1e-5, atol=1e-5)


def test_empty_dims(device):
    assert ops.matmul(torch.randn(0, 4, device=device), torch.randn(4, 3, device=device)).shape == (0, 3)
    assert ops.matmul(torch.randn(5, 4, device=device), torch.randn(4, 0, device=device)).shape == (5, 0)
    bias = torch.randn(3, device=device)
    out = ops.matmul(torch.randn(2, 0, device=device), torch.randn(0, 3, device=device), bias,
                     activation="relu")
    torch.testing.assert_close(out, torch.relu(bias).expand(2, 3))


def test_out_dtype(device):
    a = torch.randn(8, 8, device=device, dtype=torch.float16)
    out = ops.matmul(a, a, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close_to_ref(out, _ref(a, a), (a.float() @ a.float()))


@pytest.mark.parametrize("call,exc,word", [
    (lambda: ops.matmul(torch.randn(3, 4), torch.randn(5, 2)), ValueError, "inner"),
    (lambda: ops.matmul(torch.ones(3, 4, dtype=torch.int32), torch.ones(4, 2, dtype=torch.int32)),
     TypeError, "a must have dtype"),
    (lambda: ops.matmul(torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float16)), TypeError, "b has"),
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(4)), ValueError, "weight must be 2-D"),
    (lambda: ops.linear(torch.randn(3, 4), torch.randn(2, 5)), ValueError, "in_features"),
    (lambda: ops.matmul(torch.randn(3, 4), torch.randn(4, 2), bias=torch.randn(3)), ValueError, "bias"),
    (lambda: ops.matmul(torch.randn(3, 4), torch.randn(4, 2), activation="mish"), ValueError, "mish"),
    (lambda: ops.matmul(torch.randn(3, 4), torch.randn(4, 2), residual=torch.randn(4, 2)),
     ValueError, "residual"),
    (lambda: ops.matmul(torch.randn(3, 4), "x"), TypeError, "b must be a torch.Tensor"),
])
def test_bad_inputs(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_device_mismatch_is_named():
    a = torch.randn(3, 4)
    b = torch.randn(4, 2, device="meta")
    with pytest.raises(ValueError, match="b is on meta"):
        ops.matmul(a, b)


def test_module_drop_in_state_dict():
    ref = torch.nn.Linear(6, 4)
    m = tilefuse.nn.Linear(6, 4, activation="relu")
    assert set(m.state_dict()) == set(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    ref.load_state_dict(m.state_dict())
    assert isinstance(m, torch.nn.Linear)
    no_bias = tilefuse.nn.Linear(6, 4, bias=False)
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}
    x = torch.randn(2, 6)
    torch.testing.assert_close(m(x), torch.relu(ref(x)))


def test_weight_norm_parametrization():
    m = tilefuse.nn.Linear(5, 3, activation="gelu")
    m = torch.nn.utils.parametrizations.weight_norm(m)
    x = torch.randn(4, 5)
    y = m(x)
    y.sum().backward()
    assert m.parametrizations.weight.original0.grad is not None
    torch.testing.assert_close(y, F.gelu(F.linear(x, m.weight, m.bias)), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    m = torch.nn.Sequential(tilefuse.nn.Linear(8, 16, activation="silu"), tilefuse.nn.Linear(16, 2))
    x = torch.randn(4, 8, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, m(x))
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.slow
def test_large_offsets_int64():
    # > 2^31 elements through strides would need >8 GB; emulate with a huge stride on a tiny view
    base = torch.randn(2, 3)
    a = torch.as_strided(base, (2, 3), (3, 1))
    torch.testing.assert_close(ops.matmul(a, base.t()), a @ base.t())


@pytest.mark.parametrize("a_shape,b_shape", [((5,), (5, 3)), ((4, 5), (5,)), ((5,), (5,)),
                                             ((2, 4, 5), (5,)), ((5,), (2, 5, 3))])
def test_one_dim_operands_like_torch_matmul(a_shape, b_shape, device):
    a = torch.randn(*a_shape, device=device, requires_grad=True)
    b = torch.randn(*b_shape, device=device, requires_grad=True)
    y = ops.matmul(a, b, activation="relu")
    ref = torch.relu(torch.matmul(a, b))
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(ref.shape, device=device)
    ga, gb = torch.autograd.grad((y * g).sum(), (a, b))
    ra, rb = torch.autograd.grad((ref * g).sum(), (a, b))
    torch.testing.assert_close(ga, ra, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, rb, atol=1e-5, rtol=1e-5)


def test_one_dim_operands_bias_residual(device):
    a, b = torch.randn(4, 5, device=device), torch.randn(5, device=device)
    r = torch.randn(4, device=device)
    y = ops.matmul(a, b, bias=torch.full((1,), 0.5, device=device), residual=r)
    torch.testing.assert_close(y, a @ b + 0.5 + r, atol=1e-5, rtol=1e-5)
    v, w = torch.randn(5, device=device), torch.randn(5, 3, device=device)
    y = ops.matmul(v, w, residual=torch.ones(3, device=device))
    torch.testing.assert_close(y, v @ w + 1, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inner"):
        ops.matmul(torch.randn(4), torch.randn(5))

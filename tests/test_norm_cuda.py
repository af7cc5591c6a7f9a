"""GPU-only checks of the compiled norm kernels (skipped without CUDA): realistic sizes, every
layout and dtype, fwd and bwd vs fp64, determinism of the weight gradients."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse.kernels.norm as kn
from tilefuse import ops
from test_norm_helpers import check_fwd_bwd

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N", [(1, 4096), (4096, 768), (333, 5000), (64, 20000)])
def test_layer_rms_norm(dtype, M, N):
    x = torch.randn(M, N, device="cuda", dtype=dtype)
    r = torch.randn(M, N, device="cuda", dtype=dtype)
    w = torch.randn(N, device="cuda", dtype=dtype)
    b = torch.randn(N, device="cuda", dtype=dtype)
    check_fwd_bwd(lambda x, w, b, r: ops.layer_norm_act(x, N, w, b, activation="gelu", residual=r),
                  lambda x, w, b, r: F.gelu(F.layer_norm(x + r, (N,), w, b)),
                  dict(x=x, w=w, b=b, r=r))
    check_fwd_bwd(lambda x, w: ops.rms_norm_act(x, N, w, eps=1e-6, activation="silu"),
                  lambda x, w: F.silu(F.rms_norm(x, (N,), w, 1e-6)), dict(x=x, w=w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cl", [False, True])
def test_group_norm(dtype, cl):
    x = torch.randn(8, 64, 33, 31, device="cuda", dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(64, device="cuda", dtype=dtype)
    b = torch.randn(64, device="cuda", dtype=dtype)
    out = check_fwd_bwd(lambda x, w, b: ops.group_norm_act(x, 16, w, b, activation="silu"),
                        lambda x, w, b: F.silu(F.group_norm(x, 16, w, b)), dict(x=x, w=w, b=b))
    assert out.is_contiguous(memory_format=torch.channels_last) == cl


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", [((32, 64, 28, 28), False), ((32, 64, 28, 28), True),
                                      ((4096, 300), False), ((2, 3, 7, 7), False)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(dtype, shape, cl, training):
    x = torch.randn(*shape, device="cuda", dtype=dtype) + 10
    r = torch.randn(*shape, device="cuda", dtype=dtype)
    if cl:
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    C = shape[1]
    rm = torch.randn(C, device="cuda") + 10
    rv = torch.rand(C, device="cuda") + 0.5
    w = torch.randn(C, device="cuda", dtype=dtype)
    b = torch.randn(C, device="cuda", dtype=dtype)
    check_fwd_bwd(
        lambda x, w, b, r: ops.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training,
                                              activation="relu", residual=r),
        lambda x, w, b, r: F.relu(F.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b,
                                               training) + r),
        dict(x=x, w=w, b=b, r=r))


def test_weight_grads_deterministic():
    x = torch.randn(8192, 1024, device="cuda", requires_grad=True)
    w = torch.randn(1024, device="cuda", requires_grad=True)
    g = torch.randn(8192, 1024, device="cuda")
    grads = [torch.autograd.grad(ops.layer_norm_act(x, 1024, w, activation="gelu"), w, g)[0]
             for _ in range(3)]
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_wide_row_loop_path(monkeypatch):
    for cap in ("MAX_BLOCK", "FUSED_MAX_BLOCK", "BWD_MAX_BLOCK"):  # every on-chip row cap
        monkeypatch.setattr(kn, cap, 1024)
    x = torch.randn(100, 3001, device="cuda")
    w = torch.randn(3001, device="cuda")
    check_fwd_bwd(lambda x, w: ops.layer_norm_act(x, 3001, w, activation="tanh"),
                  lambda x, w: torch.tanh(F.layer_norm(x, (3001,), w)), dict(x=x, w=w))

"""Pre-norm residual stream (issue 17): ``layer_norm_act / rms_norm_act(..., residual=r,
prenorm=True)`` return ``(y, h)`` with ``h = x + r`` written by the norm's kernel, ``y =
act(norm(h))``; the backward reads ``h`` and adds ``dh`` to ``dx`` in its kernel.

Checked against torch (``h = x + r; y = act(norm(h))``) in fp64 and in the input dtype (the
tolerance tied to eager torch's own error), traffic and launches counted in the interpreter.
"""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
import tilefuse.kernels.norm as kn
from tilefuse import ops
from tilefuse.activations import torch_activation
from tilefuse.bench.traffic import count_traffic, nbytes
from utils import assert_close_to_ref


F32_EPS = torch.finfo(torch.float32).eps


def _ref(x, r, w, b, rms, act, rms_eps=F32_EPS):
    h = x + r
    N = x.shape[-1]
    if rms:
        z = F.rms_norm(h, (N,), w, rms_eps)
    else:
        z = F.layer_norm(h, (N,), w, b)
    return torch_activation(z, act or "none", 0.0), h


def _ours(x, r, w, b, rms, act):
    N = x.shape[-1]
    if rms:
        return ops.rms_norm_act(x, N, w, activation=act, residual=r, prenorm=True)
    return ops.layer_norm_act(x, N, w, b, activation=act, residual=r, prenorm=True)


def _leaves(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def _check(shape, rms, act, dtype=torch.float32):
    torch.manual_seed(0)
    N = shape[-1]
    base = [torch.randn(*shape) * 2 + 1, torch.randn(*shape), torch.randn(N),
            None if rms else torch.randn(N)]
    base = [None if t is None else t.to(dtype) for t in base]
    ours, ref, eager = _leaves(base), _leaves(base, torch.float64), _leaves(base)
    y, h = _ours(*ours, rms, act)
    ry, rh = _ref(*ref, rms, act)
    ey, eh = _ref(*eager, rms, act)
    assert y.dtype == h.dtype == dtype and h.shape == y.shape == base[0].shape
    # the same sum as eager's add: exact in fp32; bf16 within one ulp (the interpreter's fp32 ->
    # bf16 cast truncates where the GPU rounds to nearest even)
    ulp = 0.0 if dtype == torch.float32 else 2.0 ** -7
    torch.testing.assert_close(h, eh, rtol=ulp, atol=0)
    assert_close_to_ref(y, ry, ey, name="forward")
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    idx = [i for i, t in enumerate(ours) if t is not None]
    d_ours = torch.autograd.grad((y, h), [ours[i] for i in idx], (gy, gh))
    d_ref = torch.autograd.grad((ry, rh), [ref[i] for i in idx], (gy.double(), gh.double()))
    d_eag = torch.autograd.grad((ey, eh), [eager[i] for i in idx], (gy, gh))
    for i, a, r_, e in zip(idx, d_ours, d_ref, d_eag):
        assert a.dtype == dtype
        assert_close_to_ref(a, r_, e, name=f"grad {('x', 'residual', 'weight', 'bias')[i]}")


@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 4099)])
@pytest.mark.parametrize("rms,act", [(False, "gelu"), (True, "silu"), (False, None)])
def test_prenorm_matches_torch(shape, rms, act):
    _check(shape, rms, act)


@pytest.mark.parametrize("rms", [False, True])
def test_prenorm_bf16(rms):
    _check((4, 96), rms, "gelu", torch.bfloat16)


@pytest.mark.parametrize("rms", [False, True])
def test_prenorm_wide_rows(monkeypatch, rms):
    """Rows wider than the on-chip block: the looping forward stores h chunk by chunk, the
    column pass adds dh."""
    for cap in ("MAX_BLOCK", "FUSED_MAX_BLOCK", "BWD_MAX_BLOCK"):
        monkeypatch.setattr(kn, cap, 64)
    _check((8, 520), rms, "silu")


@pytest.mark.parametrize("rms", [False, True])
def test_prenorm_float64(rms):
    torch.manual_seed(1)
    ts = [torch.randn(6, 33, dtype=torch.float64) * 3 + 5, torch.randn(6, 33, dtype=torch.float64),
          torch.randn(33, dtype=torch.float64), None if rms else torch.randn(33, dtype=torch.float64)]
    ours, ref = _leaves(ts), _leaves(ts)
    y, h = _ours(*ours, rms, None)
    ry, rh = _ref(*ref, rms, "none", torch.finfo(torch.float64).eps)
    torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
    g = (torch.randn_like(y), torch.randn_like(h))
    idx = [i for i, t in enumerate(ours) if t is not None]
    for a, b in zip(torch.autograd.grad((y, h), [ours[i] for i in idx], g),
                    torch.autograd.grad((ry, rh), [ref[i] for i in idx], g)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_only_the_stream_used():
    """y unused downstream: d x = d residual = dh (no norm backward)."""
    x, r = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    _, h = ops.layer_norm_act(x, 8, residual=r, prenorm=True)
    gh = torch.randn(3, 8)
    gx, gr = torch.autograd.grad(h, (x, r), gh)
    assert torch.equal(gx, gh) and torch.equal(gr, gh)


def test_without_residual_h_is_x():
    x = torch.randn(3, 8)
    y, h = ops.rms_norm_act(x, 8, prenorm=True)
    assert h is x
    torch.testing.assert_close(y, F.rms_norm(x, (8,), eps=torch.finfo(torch.float32).eps))


def test_prenorm_must_be_bool():
    with pytest.raises(TypeError, match="prenorm"):
        ops.layer_norm_act(torch.randn(2, 4), 4, residual=torch.randn(2, 4), prenorm="yes")


def test_modules_and_custom_op_path():
    from tilefuse.fused._fast import custom_op_path

    torch.manual_seed(2)
    ln = tilefuse.nn.LayerNormAct(16, activation="gelu")
    rms = tilefuse.nn.RMSNormAct(16)
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for m in (ln, rms):
        y, h = m(x, residual=r, prenorm=True)
        torch.testing.assert_close(h, x + r)
        torch.testing.assert_close(y, m(x + r))
        xs = [t.clone().requires_grad_() for t in (x, r)]
        with custom_op_path():  # the traced path: the same values and gradients
            y2, h2 = m(*xs, prenorm=True)
        (y2.sum() + 2 * h2.sum()).backward()
        xf = [t.clone().requires_grad_() for t in (x, r)]
        y3, h3 = m(*xf, prenorm=True)
        (y3.sum() + 2 * h3.sum()).backward()
        assert torch.equal(y2, y3) and torch.equal(xs[0].grad, xf[0].grad)


@pytest.mark.parametrize("rms", [False, True])
def test_prenorm_budget(rms):
    """Forward: one kernel reading x, residual (and the parameters), writing y and h; backward
    reads dy, dh, h once and writes dx (the gradient of x and of residual: one tensor)."""
    M, N = 64, 256
    x = torch.randn(M, N, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(M, N, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, dtype=torch.bfloat16, requires_grad=True)
    b = None if rms else torch.randn(N, dtype=torch.bfloat16, requires_grad=True)
    with count_traffic() as fwd:
        y, h = _ours(x, r, w, b, rms, "gelu")
    assert fwd.launches == 1, (fwd.kernels, fwd.torch_ops)
    minimal = nbytes(x, r, w, b, y, h)
    assert fwd.distinct_bytes <= 1.15 * minimal and fwd.issued_bytes <= 2.05 * minimal
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    with count_traffic() as bwd:
        torch.autograd.backward((y, h), (gy, gh))
    assert bwd.launches <= 3, (bwd.kernels, bwd.torch_ops)
    minimal = nbytes(gy, gh, h, w, b, x.grad, w.grad, None if b is None else b.grad)
    assert bwd.distinct_bytes <= 1.15 * minimal, bwd.distinct_bytes / minimal
    assert bwd.issued_bytes <= 2.05 * minimal, bwd.issued_bytes / minimal
    assert torch.equal(x.grad, r.grad)

"""Fused LayerNorm / RMSNorm + activation (+ pre-norm residual): fwd and bwd vs fp64 torch."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse.kernels.norm as kn
from tilefuse import ops
from tilefuse.activations import ACTIVATIONS, torch_activation
from test_norm_helpers import check_fwd_bwd

ACTS = sorted(ACTIVATIONS)


def _ln_ref(act="none", param=0.0, shape=None, eps=1e-5):
    def ref(x, weight=None, bias=None, residual=None):
        h = x if residual is None else x + residual
        return torch_activation(F.layer_norm(h, shape or weight.shape, weight, bias, eps), act,
                                param)
    return ref


def _rms_ref(act="none", param=0.0, shape=None, eps=None):
    def ref(x, weight=None, residual=None):
        h = x if residual is None else x + residual
        e = torch.finfo(torch.float32).eps if eps is None else eps  # torch: the compute dtype's
        return torch_activation(F.rms_norm(h, shape or weight.shape, weight, e), act, param)
    return ref


def _ln(act="none", shape=None, eps=1e-5):
    return lambda x, weight=None, bias=None, residual=None: ops.layer_norm_act(
        x, shape or weight.shape, weight, bias, eps, activation=act, residual=residual)


def _rms(act="none", shape=None, eps=None):
    return lambda x, weight=None, residual=None: ops.rms_norm_act(
        x, shape or weight.shape, weight, eps, activation=act, residual=residual)


def _check_gelu_residual(M, N, rms):
    """LN / RMS + residual + GELU on an (M, N) input with a non-zero mean, fwd and bwd vs fp64."""
    x = torch.randn(M, N) * 2 + 3
    t = dict(x=x, weight=torch.randn(N), residual=torch.randn(M, N))
    if rms:
        check_fwd_bwd(_rms("gelu", eps=1e-6), _rms_ref("gelu", eps=1e-6), t)
    else:
        t["bias"] = torch.randn(N)
        check_fwd_bwd(_ln("gelu"), _ln_ref("gelu"), t)


@pytest.mark.parametrize("M,N", [(1, 7), (5, 37), (5, 4099)])
@pytest.mark.parametrize("rms", [False, True])
def test_shapes_residual(M, N, rms):
    _check_gelu_residual(M, N, rms)


@pytest.mark.parametrize("act", ACTS)
def test_every_activation(act):
    x = torch.randn(3, 20)
    p = ACTIVATIONS[act][1]
    check_fwd_bwd(_ln(act), _ln_ref(act, p),
                  dict(x=x, weight=torch.randn(20), bias=torch.randn(20)))
    check_fwd_bwd(_rms(act), _rms_ref(act, p), dict(x=x, weight=torch.randn(20)))


def test_leaky_param_and_module_spec():
    x = torch.randn(4, 9)
    w = torch.randn(9)
    y = ops.layer_norm_act(x, 9, w, activation=("leaky_relu", 0.3))
    ref = F.leaky_relu(F.layer_norm(x.double(), (9,), w.double()), 0.3)
    assert (y.double() - ref).abs().max() < 1e-5
    y2 = ops.rms_norm_act(x, 9, w, activation=torch.nn.GELU(approximate="tanh"))
    ref2 = F.gelu(F.rms_norm(x.double(), (9,), w.double(), torch.finfo(torch.float32).eps),
                  approximate="tanh")
    assert (y2.double() - ref2).abs().max() < 1e-5


@pytest.mark.parametrize("rms", [False, True])
def test_wide_rows_loop_path(rms, monkeypatch):
    """Rows wider than one block take the chunked (looping) kernel path."""
    for cap in ("MAX_BLOCK", "FUSED_MAX_BLOCK", "BWD_MAX_BLOCK"):  # every on-chip row cap
        monkeypatch.setattr(kn, cap, 32)
    x = torch.randn(6, 101) + 50.0  # a large mean: two-pass statistics stay accurate
    t = dict(x=x, weight=torch.randn(101), residual=torch.randn(6, 101))
    if rms:
        check_fwd_bwd(_rms("silu"), _rms_ref("silu"), t)
    else:
        t["bias"] = torch.randn(101)
        check_fwd_bwd(_ln("silu"), _ln_ref("silu"), t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    M, N = 4, 48
    t = dict(x=torch.randn(M, N, dtype=dtype), weight=torch.randn(N, dtype=dtype),
             bias=torch.randn(N, dtype=dtype), residual=torch.randn(M, N, dtype=dtype))
    check_fwd_bwd(_ln("relu"), _ln_ref("relu"), t)
    del t["bias"]
    check_fwd_bwd(_rms("tanh"), _rms_ref("tanh"), t)


def test_no_affine_and_multidim_normalized_shape():
    x = torch.randn(2, 3, 4, 5)
    check_fwd_bwd(_ln("silu", shape=(4, 5)), _ln_ref("silu", shape=(4, 5)), dict(x=x))
    check_fwd_bwd(_rms("none", shape=[5]), _rms_ref("none", shape=[5]),
                  dict(x=x, weight=torch.randn(5)))
    check_fwd_bwd(_ln("gelu", shape=(4, 5)), _ln_ref("gelu", shape=(4, 5)),
                  dict(x=x, weight=torch.randn(4, 5), bias=torch.randn(4, 5)))


def test_non_contiguous_inputs():
    base = torch.randn(6, 40)
    x = base[:, ::2]                      # column stride 2
    xt = torch.randn(16, 5).t()           # transposed: rows are strided
    r = torch.randn(20, 6).t()
    check_fwd_bwd(_ln("relu"), _ln_ref("relu"),
                  dict(x=x, weight=torch.randn(20), bias=torch.randn(20), residual=r))
    check_fwd_bwd(_rms("gelu"), _rms_ref("gelu"), dict(x=xt, weight=torch.randn(16)))
    # broadcast residual (one row for every row)
    check_fwd_bwd(_ln("none"), _ln_ref("none"),
                  dict(x=torch.randn(3, 8), weight=torch.randn(8), bias=None,
                       residual=torch.randn(1, 8)))


def test_empty_rows():
    x = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    y = ops.layer_norm_act(x, 8, w, activation="relu")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and torch.all(w.grad == 0)


def test_weight_grad_is_deterministic():
    x = torch.randn(13, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    g = torch.randn(13, 24)
    grads = [torch.autograd.grad(ops.layer_norm_act(x, 24, w, activation="gelu"), w, g)[0]
             for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("bad", ["shape", "weight", "dtype", "residual", "eps", "act"])
def test_bad_inputs(bad):
    x = torch.randn(4, 8)
    with pytest.raises((ValueError, TypeError)) as exc:
        if bad == "shape":
            ops.layer_norm_act(x, (7,))
        elif bad == "weight":
            ops.rms_norm_act(x, 8, weight=torch.randn(9))
        elif bad == "dtype":
            ops.layer_norm_act(x.int(), 8)
        elif bad == "residual":
            ops.layer_norm_act(x, 8, residual=torch.randn(3, 8))
        elif bad == "eps":
            ops.layer_norm_act(x, 8, eps=-1.0)
        else:
            ops.layer_norm_act(x, 8, activation="swishy")
    name = {"shape": "normalized_shape", "weight": "weight", "dtype": "x", "residual": "residual",
            "eps": "eps", "act": "activation"}[bad]
    assert name in str(exc.value)


def test_fp64_torch_path_gradcheck():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: ops.layer_norm_act(x, 6, w, b, activation="silu", residual=r),
        (x, w, b, r))


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("rms", [False, True])
def test_backward_loops_row_blocks_with_prefetch(rms, prefetch, monkeypatch):
    """Persistent backward programs walk several row blocks, the next one prefetched while the
    current one is computed (the last block partial, the one past the end fully masked), or
    loaded in turn where the tile is too large for two sets of registers."""
    monkeypatch.setattr(kn, "PREFETCH_BYTES", 1 << 30 if prefetch else 0)
    monkeypatch.setattr(kn, "_BWD_LAUNCH", {})
    M, N = 300, 700
    plan = kn._bwd_launch(M, N, torch.device("cpu"), rms, True, True, not rms, 4, 0.0, True,
                          not rms, None, False, 4)
    assert plan[0] == "one"
    consts = dict(zip(kn.norm_bwd_kernel.arg_names[kn._BWD_RUNTIME:], plan[2]))
    bm = consts["BLOCK_M"]
    assert consts["PREFETCH"] == prefetch
    assert plan[1] * bm < M and M % bm  # G programs, more than one block each, a partial one
    _check_gelu_residual(M, N, rms)

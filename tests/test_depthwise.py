"""Depthwise conv2d (issue 5): forward + backward vs an fp64 torch reference, on the Triton
interpreter on CPU (compiled Triton on CUDA). Small, awkward shapes."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse.activations import parse_activation, torch_activation
from tilefuse.fused.depthwise import resolve_padding
from utils import assert_close_to_ref


def _ref(x, w, b, stride, padding, dilation, act, residual=None):
    """torch's conv2d(groups=C) (+ explicit F.pad for 4-tuple padding) -> act -> + residual."""
    if isinstance(padding, tuple) and len(padding) == 4:
        x, padding = F.pad(x, padding), 0
    y = F.conv2d(x, w, b, stride, padding, dilation, x.shape[1])
    y = torch_activation(y, *parse_activation(act))
    return y + residual if residual is not None else y


def _run(x, w, b, stride, padding, dilation, act, residual=None, dtype=torch.float32):
    """Returns (kernel, fp64 reference, eager same-dtype) values of (y, dx, dw, db)."""
    outs = []
    for kind in ("kernel", "ref", "eager"):
        cast = torch.float64 if kind == "ref" else (torch.float32 if kind == "eager" else dtype)
        xx = x.detach().to(cast).requires_grad_()
        ww = w.detach().to(cast).requires_grad_()
        bb = b.detach().to(cast).requires_grad_()
        rr = residual.to(cast) if residual is not None else None
        if kind == "kernel":
            y = tilefuse.ops.depthwise_conv2d(xx, ww, bb, stride, padding, dilation, act, rr)
        else:
            y = _ref(xx, ww, bb, stride, padding, dilation, act, rr)
        g = torch.ones_like(y) if y.numel() == 0 else torch.linspace(
            -1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.device, cast)
        y.backward(g)
        vals = [y, xx.grad, ww.grad, bb.grad]
        if kind == "eager" and dtype != torch.float32:
            vals = [v.to(dtype) for v in vals]
        outs.append(vals)
    return outs


def _check(x, w, b, stride=1, padding=0, dilation=1, act=None, residual=None,
           dtype=torch.float32):
    out, ref, eager = _run(x, w, b, stride, padding, dilation, act, residual, dtype)
    for name, o, r, e in zip(("y", "grad_input", "grad_weight", "grad_bias"), out, ref, eager):
        assert o.dtype == dtype, name
        assert_close_to_ref(o, r, e, name=name)
    return out


# (N, C, H, W, k, stride, padding, dilation, multiplier, activation)
CASES = [
    pytest.param(2, 4, 1, 1, 3, 1, 1, 1, 1, None, id="1x1-spatial"),
    pytest.param(2, 3, 7, 9, 3, 1, 1, 1, 1, "relu", id="odd-7x9-p1"),
    pytest.param(1, 4, 9, 7, 3, 2, 1, 1, 1, "silu", id="s2-odd-batch1"),
    pytest.param(2, 3, 11, 10, 5, 2, 2, 1, 1, "gelu", id="k5-s2-p2"),
    pytest.param(2, 3, 8, 7, 4, 1, "same", 1, 1, None, id="k4-same-asym"),
    pytest.param(2, 4, 9, 9, 3, 1, "same", 2, 1, "relu6", id="dil2-same"),
    pytest.param(1, 2, 12, 11, 7, 1, "valid", 1, 1, None, id="k7-valid"),
    pytest.param(2, 3, 8, 9, 3, 2, 0, 2, 2, "leaky_relu", id="mult2-s2-dil2-p0"),
    pytest.param(1, 2, 9, 8, 3, 2, (0, 2, 1, 0), 1, 2, "tanh", id="pad4-mult2"),
    pytest.param(1, 3, 6, 7, (1, 3), (2, 1), (0, 1), 1, 1, None, id="rect-kernel"),
]


@pytest.mark.parametrize("N,C,H,W,k,s,p,d,m,act", CASES)
def test_forward_backward_fp32(N, C, H, W, k, s, p, d, m, act):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(N, C, H, W)
    w = torch.randn(C * m, 1, kh, kw) * 0.5
    b = torch.randn(C * m)
    _check(x, w, b, s, p, d, act)


def test_channels_last_in_and_out():
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 1, 3, 3), torch.randn(16)
    out = _check(x, w, b, 2, 1, 1, "relu")
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    assert out[1].is_contiguous(memory_format=torch.channels_last)


def test_non_contiguous_inputs():
    base = torch.randn(2, 10, 13, 12)
    x = base[:, 1:9:2, 1:12, ::2]                        # sliced: no dense layout at all
    w = torch.randn(4, 1, 3, 5).transpose(2, 3)          # (4, 1, 5, 3), non-contiguous
    b = torch.randn(8)[::2]
    res = torch.randn(2, 4, 1, 6).expand(2, 4, 11, 6)    # broadcast residual (stride 0)
    _check(x, w, b, 1, (2, 1), 1, "silu", residual=res)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    x = torch.randn(2, 4, 7, 9)
    w, b = torch.randn(8, 1, 3, 3) * 0.5, torch.randn(8)
    r = torch.randn(2, 8, 4, 5)
    _check(x, w, b, 2, 1, 1, "gelu", residual=r, dtype=dtype)


def test_unbatched_and_no_bias():
    x, w = torch.randn(3, 5, 6), torch.randn(3, 1, 3, 3)
    y = tilefuse.ops.depthwise_conv2d(x, w, padding=1)
    ref = F.conv2d(x.double(), w.double(), padding=1, groups=3)
    assert y.shape == (3, 5, 6)
    assert_close_to_ref(y, ref, F.conv2d(x, w, padding=1, groups=3))


def test_residual_grad_broadcast():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3)
    r = torch.randn(3, 1, 1, requires_grad=True)
    y = tilefuse.ops.depthwise_conv2d(x, w, padding=1, activation="relu", residual=r)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(r.grad, g.sum(dim=(0, 2, 3)).reshape(3, 1, 1))


def test_empty_batch():
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    y = tilefuse.ops.depthwise_conv2d(x, w, padding=1, activation="relu")
    assert y.shape == (0, 4, 6, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.all(w.grad == 0)


def test_torch_backend_matches(monkeypatch):
    """The plain-torch reference path (CPU without the interpreter) gives the same results."""
    x = torch.randn(2, 3, 7, 8).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, 1, 3, 3), torch.randn(6)
    args = (2, (1, 0, 2, 1), 1, "silu")
    vals = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("TILEFUSE_BACKEND", backend if backend == "torch" else "auto")
        xx, ww, bb = (t.detach().requires_grad_() for t in (x, w, b))
        y = tilefuse.ops.depthwise_conv2d(xx, ww, bb, *args)
        y.backward(torch.ones_like(y))
        vals[backend] = (y, xx.grad, ww.grad, bb.grad)
    for a, c in zip(vals["triton"], vals["torch"]):
        assert a.stride() == c.stride()
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_grad_weight_deterministic_splits():
    from tilefuse.kernels.depthwise_wgrad import launch_backward_weight

    x, dy = torch.randn(3, 4, 9, 9), torch.randn(3, 8, 5, 5)
    runs = [launch_backward_weight(dy, x, (3, 3), (2, 2), (1, 1), (1, 1), num_splits=s)[0]
            for s in (1, 3, 3)]
    assert torch.equal(runs[1], runs[2])                 # same splits -> bitwise identical
    ref = torch.ops.aten.convolution_backward(
        dy.double(), x.double(), torch.zeros(8, 1, 3, 3, dtype=torch.float64), None, [2, 2],
        [1, 1], [1, 1], False, [0, 0], 4, [False, True, False])[1]
    for r in runs:
        assert_close_to_ref(r, ref)


def test_resolve_padding_same_matches_torch():
    # torch puts the odd extra padding at the end (bottom/right)
    assert resolve_padding("same", (4, 3), (1, 1), (1, 2)) == (2, 2, 1, 2)
    assert resolve_padding((1, 2), (3, 3), (1, 1), (1, 1)) == (2, 2, 1, 1)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(w=torch.randn(4, 2, 3, 3)), ValueError, "not a depthwise weight"),
    (dict(w=torch.randn(6, 1, 3, 3)), ValueError, "not a depthwise weight"),
    (dict(w=torch.randn(4, 1, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(stride=2, padding="same"), ValueError, "strided"),
    (dict(padding="full"), ValueError, "padding must be"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(dilation=(1, 2, 3)), TypeError, "dilation must be"),
    (dict(w=torch.randn(4, 1, 9, 9)), ValueError, "smaller than the dilated kernel"),
    (dict(b=torch.randn(3)), ValueError, "bias must have shape"),
    (dict(activation="mish"), ValueError, "activation"),
    (dict(x=torch.randn(4, 5)), ValueError, "x must be 3-D or 4-D"),
    (dict(x=torch.randint(0, 3, (1, 4, 5, 5))), TypeError, "x must have dtype"),
    (dict(residual=torch.randn(2, 4, 5, 4)), ValueError, "residual"),
])
def test_bad_inputs(kwargs, exc, match):
    args = dict(x=torch.randn(2, 4, 5, 5), w=torch.randn(4, 1, 3, 3), b=None, stride=1,
                padding=0, dilation=1, activation=None, residual=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        tilefuse.ops.depthwise_conv2d(args["x"], args["w"], args["b"], args["stride"],
                                      args["padding"], args["dilation"], args["activation"],
                                      args["residual"])


@pytest.mark.slow
def test_torch_compile_fullgraph():
    x, w, b = torch.randn(2, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(4)

    def f(x, w, b):
        return tilefuse.ops.depthwise_conv2d(x, w, b, padding=1, activation="relu") * 2

    y = torch.compile(f, fullgraph=True)(x, w, b)
    torch.testing.assert_close(y, f(x, w, b))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("k,s,m,act", [(3, 1, 1, "relu6"), (5, 2, 2, "silu"), (7, 1, 1, None)])
def test_cuda_compiled(dtype, layout, k, s, m, act):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(4, 24, 33, 29, device="cuda").contiguous(memory_format=fmt)
    w = torch.randn(24 * m, 1, k, k, device="cuda") / k
    b = torch.randn(24 * m, device="cuda")
    _check(x, w, b, s, k // 2, 1, act, dtype=dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_many_sm_split_in_interpreter(monkeypatch, layout):
    """The interpreter runs the GPU's algorithm: with a GPU's SM count (132) the grad_weight
    split rule gives many splits, and the result still matches the reference."""
    import tilefuse.kernels as K

    monkeypatch.setattr(K, "INTERPRETER_SMS", 132)
    monkeypatch.setattr(K, "_SM_COUNTS", {})
    x = torch.randn(2, 6, 9, 13)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _check(x, torch.randn(12, 1, 5, 5) / 5, torch.randn(12), 2, 2, 1, "silu")


def test_no_interpreter_branches():
    """Tiles and splits are pure functions of the problem and sm_count (issue 18)."""
    import inspect

    import tilefuse.kernels.depthwise as kdw
    import tilefuse.kernels.depthwise_wgrad as kwg

    for mod in (kdw, kwg):
        assert "interpreter_enabled" not in inspect.getsource(mod)


def test_fit_block_matches_width():
    from tilefuse.kernels.depthwise import fit_block, tile_config

    assert fit_block(56, 64, 8) == 8 and fit_block(112, 64, 8) == 16
    assert fit_block(28, 64, 8) == 32 and fit_block(7, 64, 8) == 8
    cfg = tile_config(144, 56, 56, False)
    assert 56 % cfg["BLOCK_W"] == 0 and 56 % cfg["BLOCK_H"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("act", ["relu6", "silu"])
def test_torch_compile_backward(act):
    """The backward op (dy, saved output or pre-activation, act' folded in) traces with its fake
    kernel: compiled gradients equal eager ones (saved y for relu6, z for silu)."""
    x, w, b = (torch.randn(2, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(4))

    def f(x, w, b):
        return tilefuse.ops.depthwise_conv2d(x, w, b, padding=1, activation=act) * 2

    grads = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        ins = [t.clone().requires_grad_() for t in (x, w, b)]
        fn(*ins).sum().backward()
        grads.append([t.grad for t in ins])
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e)

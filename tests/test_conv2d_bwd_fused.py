"""conv2d backward with the activation gradient fused into the grad-input / grad-weight implicit
GEMMs' operand loads and ``dbias`` summed inside the grad-weight kernel (issue 20): fp64
gradients against torch for every combination of activation / post-activation / residual and
needed gradients, and byte / launch budgets counted in the interpreter (no ``dz`` tensor)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse.activations import torch_activation
from tilefuse.bench.traffic import count_traffic, nbytes


def _torch_ref(x, w, b, r, act, post, **geo):
    z = F.conv2d(x, w, b, **geo)
    u = torch_activation(z, act or "none", 0.01)
    if r is not None:
        u = u + r
    return torch_activation(u, post or "none", 0.01)


CASES = [("silu", None, False), ("gelu", None, False), (None, None, False),
         (None, "relu6", False), (None, "tanh", True), ("leaky_relu", "silu", True),
         ("relu", "relu", False)]
NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (True, False, True)]


@pytest.mark.parametrize("act,post,res", CASES)
@pytest.mark.parametrize("need", NEEDS, ids=lambda n: "".join("xwb"[i] for i in range(3) if n[i]))
def test_fused_backward_matches_torch_fp64(act, post, res, need):
    torch.manual_seed(0)
    geo = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    out_shape = F.conv2d(x, w, None, **geo).shape
    r = torch.randn(out_shape, dtype=torch.float64) if res else None
    leaves = [x, w, b] + ([r] if res else [])
    for t, n in zip(leaves, list(need) + [True]):
        t.requires_grad_(n)
    a = (act, 0.01) if act == "leaky_relu" else act
    y = tilefuse.ops.conv2d(x, w, b, activation=a, residual=r, post_activation=post, **geo)
    want = _torch_ref(x, w, b, r, act, post, **geo)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(want)
    grads = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad(y, grads, dy)
    ref = torch.autograd.grad(want, grads, dy)
    for g1, g2 in zip(got, ref):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)


def _inputs(layout, N=2, C=16, H=12, W=12, CO=24, k=3):
    torch.manual_seed(1)
    x = torch.randn(N, C, H, W)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(CO, C, k, k) / (3 * k)
    b = torch.randn(CO)
    return [t.requires_grad_() for t in (x, w, b)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("act,post", [("silu", None), ("relu", None), (None, None),
                                      (None, "relu")])
def test_backward_budget_one_activation(layout, act, post):
    """One activation, no residual gradient: 2 launches (grad-input, grad-weight with dbias)
    and the minimal distinct bytes (dy, the saved z or u, x, w, dx, dw, db): no dz tensor.
    Before the fusion: 6 launches (activation pass, dbias sum, two zero gradients) and 1.46x
    (no activation: 5 launches)."""
    x, w, b = _inputs(layout)
    y = tilefuse.ops.conv2d(x, w, b, padding=1, activation=act, post_activation=post)
    g = torch.randn_like(y)
    with count_traffic() as t:
        y.backward(g)
    saved = nbytes(y) if (act or post) else 0
    minimal = nbytes(g, x, w, x.grad, w.grad, b.grad) + saved
    assert t.launches == 2, (t.kernels, t.torch_ops)
    assert t.distinct_bytes <= 1.01 * minimal, t.distinct_bytes / minimal


def test_backward_budget_residual_block():
    """ResNet's conv2 (act, residual needing a gradient, post relu): du is the residual's
    gradient (one elementwise pass, also the GEMMs' g); dz = du * act'(z) is fused: 3 launches
    (was 7), du written once and read once, no dz (was 1.27x these bytes)."""
    x, w, b = _inputs("channels_last")
    r = torch.randn(2, 24, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = tilefuse.ops.conv2d(x, w, b, padding=1, activation="silu", residual=r,
                            post_activation="relu")
    g = torch.randn_like(y)
    with count_traffic() as t:
        y.backward(g)
    minimal = nbytes(g, x, w, x.grad, w.grad, b.grad, y, y, r.grad, r.grad)  # z, u; du w+r
    assert t.launches == 3, (t.kernels, t.torch_ops)
    assert t.distinct_bytes <= 1.01 * minimal, t.distinct_bytes / minimal


def test_dbias_with_split_weight_gradient():
    """A 1x1 conv with many pixels and few weight tiles splits the grad-weight reduction (4
    slices on the interpreter's 4-SM pseudo-device): dbias is summed per slice in the kernel,
    then in a fixed order; bitwise deterministic."""
    from tilefuse.kernels import conv_bwd

    torch.manual_seed(2)
    x = torch.randn(2, 8, 24, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    params = conv_bwd._wgrad_params((2 * 24 * 24, 8, 8, 1, (1, 1), (1, 1), (1, 1),
                                     torch.float64, False, False, 4, 6, 0.0, True))
    assert params[1] > 1  # split
    dy = torch.randn(2, 8, 24, 24, dtype=torch.float64)
    runs = []
    for _ in range(2):
        y = tilefuse.ops.conv2d(x, w, b, activation="silu")
        runs.append(torch.autograd.grad(y, (x, w, b), dy))
    want = torch.autograd.grad(F.silu(F.conv2d(x, w, b)), (x, w, b), dy)
    for got, ref, again in zip(runs[0], want, runs[1]):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
        assert torch.equal(got, again)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_unfused_rounding(dtype):
    """dz is rounded to the operand dtype in the load, as the elementwise pass stored it: the
    gradients match torch's (fp32 math on half inputs) within half-precision error."""
    torch.manual_seed(3)
    x = torch.randn(2, 8, 7, 7).to(dtype).requires_grad_()
    w = (torch.randn(8, 8, 3, 3) / 8).to(dtype).requires_grad_()
    b = torch.randn(8).to(dtype).requires_grad_()
    dy = torch.randn(2, 8, 7, 7).to(dtype)
    got = torch.autograd.grad(tilefuse.ops.conv2d(x, w, b, padding=1, activation="gelu"),
                              (x, w, b), dy)
    xs, ws, bs = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(F.gelu(F.conv2d(xs, ws, bs, padding=1)), (xs, ws, bs),
                               dy.double())
    for g1, g2 in zip(got, want):
        tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
        assert (g1.double() - g2).abs().max() <= tol * max(1.0, g2.abs().max().item())


def test_every_flag_combination_is_a_launch_signature():
    """The fused constexprs are part of the launch caches' keys (no stale reuse)."""
    from tilefuse.kernels import conv_bwd

    for act, db in itertools.product((0, 1, 6), (False, True)):
        p = conv_bwd._wgrad_params((64, 8, 8, 1, (3, 3), (1, 1), (1, 1), torch.float32, False,
                                    False, 4, act, 0.0, db))
        consts = dict(zip(conv_bwd.conv2d_wgrad_kernel.arg_names[conv_bwd._N_WGRAD:], p[3]))
        assert consts["ACTIVATION"] == act and consts["HAS_DBIAS"] == db

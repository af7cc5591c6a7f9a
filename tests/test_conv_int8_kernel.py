"""The int8 implicit-GEMM conv (``tilefuse::int8_conv2d``, the conv forward kernel's ``QUANT``
modes; issue 20): exact int32 results against fp64 references on awkward shapes (strides,
padding, dilation, NCHW and channels_last), the three activation-scale granularities, weight-only,
the torch backend, and the memory traffic of ``Int8Conv2d`` (no im2col buffer)."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse.bench.traffic import count_traffic, nbytes
from tilefuse.fused.conv import conv_geometry
from tilefuse.fused.conv_int8 import int8_conv2d_op
from tilefuse.nn import Int8Conv2d

GEOMETRIES = [
    dict(kernel=(3, 3), stride=1, padding=1, dilation=1),
    dict(kernel=(3, 2), stride=2, padding=(2, 1), dilation=2),
    dict(kernel=(1, 1), stride=2, padding=0, dilation=1),
    dict(kernel=(1, 1), stride=1, padding=1, dilation=1),   # 1x1 padding rows: bias only
    dict(kernel=(5, 5), stride=(1, 2), padding=2, dilation=1),
]


def _ints(*shape, lo=-127, hi=128):
    return torch.randint(lo, hi, shape, dtype=torch.int8)


def _layout(t, cl):
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _run(q, a_scale, w, w_scale, geo, bias=None, residual=None, act=0, post=0,
         out_dtype=torch.float32):
    stride, pad, dil, _, out_size = conv_geometry(q.shape, w.shape, geo["stride"],
                                                  geo["padding"], geo["dilation"], 1)
    return int8_conv2d_op(q, a_scale, w, w_scale, bias, residual, stride, pad, dil, out_size,
                          act, 0.0, post, 0.0, out_dtype)


def _ref(x, w, geo):
    return F.conv2d(x.double(), w.double(), None, geo["stride"], geo["padding"], geo["dilation"])


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: "k{}x{}".format(*g["kernel"]) +
                         f"s{g['stride']}p{g['padding']}d{g['dilation']}")
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_w8a8_exact_int32(geo, cl):
    """Unit / power-of-two scales keep every product exact in fp32 (|sums| < 2^23): the kernel's
    int32 accumulation must equal the fp64 conv of the int8 values bit for bit, per tensor,
    per image and per input pixel (which rescales each K step for kernels larger than 1x1)."""
    torch.manual_seed(0)
    N, C, H, W, CO = 2, 35, 11, 7, 33
    x = _layout(_ints(N, C, H, W), cl)
    w = _layout(_ints(CO, C, *geo["kernel"]), cl)
    ws = torch.full((CO,), 0.5).index_fill_(0, torch.arange(0, CO, 3), 2.0)
    exact = _ref(x, w, geo) * ws.double()[None, :, None, None]
    y = _run(x, torch.ones(1, 1, 1), w, ws, geo)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.double(), exact)
    per_image = torch.tensor([0.5, 2.0]).view(N, 1, 1)
    y = _run(x, per_image, w, ws, geo)
    assert torch.equal(y.double(), exact * per_image.double()[:, None])
    per_pixel = 2.0 ** torch.randint(-1, 2, (N, H, W)).float()
    y = _run(x, per_pixel, w, ws, geo)
    want = _ref(x.double() * per_pixel.double()[:, None], w, geo) * ws.double()[None, :, None, None]
    assert torch.equal(y.double(), want)
    # static scale: a float input on the int8 grid (x = q * 2^-3) is quantized back to q
    y = _run(_layout(x.float() / 8, cl), torch.tensor([0.125]), w, ws, geo)
    assert torch.equal(y.double(), exact * 0.125)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16,
                                       torch.float64])
def test_epilogue_bias_act_residual_post(out_dtype):
    torch.manual_seed(1)
    geo = GEOMETRIES[1]
    x, w = _ints(2, 19, 10, 9), _ints(12, 19, *geo["kernel"])
    sa, ws = torch.rand(2, 1, 1) / 50, torch.rand(12) / 50
    b = torch.randn(12)
    y0 = _run(x, sa, w, ws, geo)
    r = torch.randn(y0.shape, dtype=out_dtype)
    y = _run(x, sa, w, ws, geo, bias=b, residual=r, act=6, post=1, out_dtype=out_dtype)  # silu
    z = _ref(x, w, geo) * sa.double()[:, None] * ws.double()[None, :, None, None] \
        + b.double()[None, :, None, None]
    want = torch.relu(F.silu(z) + r.double())
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(out_dtype, 1e-5)
    assert y.dtype == out_dtype
    torch.testing.assert_close(y.double(), want, atol=tol * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_weight_only_float_input(dtype):
    torch.manual_seed(2)
    geo = GEOMETRIES[0]
    x = torch.randn(2, 13, 8, 6, dtype=dtype)
    w, ws = _ints(9, 13, 3, 3), torch.rand(9) / 100
    y = _run(x, None, w, ws, geo, out_dtype=dtype)
    want = _ref(x, w, geo) * ws.double()[None, :, None, None]
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2,
           torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(y.double(), want, atol=tol * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_scale_rounds_half_away_from_zero_and_clamps(dtype):
    """The static mode's in-load quantizer: round(x / s) half away from zero (as the row
    quantizer), clamped to +-127; a 1x1 identity conv shows the int8 values themselves."""
    v = torch.tensor([0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.6, 300.0, -300.0, 3.49])
    x = v.to(dtype).view(1, 1, 1, -1)
    y = _run(x, torch.tensor([1.0]), torch.ones(1, 1, 1, 1, dtype=torch.int8), torch.ones(1),
             GEOMETRIES[2] | dict(stride=1))
    want = torch.tensor([0, 1, -1, 2, -2, 3, -3, 127, 127, -127, 3.0]).view(1, 1, 1, -1)
    assert torch.equal(y, want)


def test_calibrate_static_scales_on_a_cnn():
    """tilefuse.nn.int8_conv.calibrate: every W8A8 conv gets a calibrated input_scale (state_dict
    round trip), one launch per conv (no quantizer), deviation from the float model as small as
    the dynamic modes'; an uncalibrated static conv refuses to run."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_conv_models import TorchvisionResNet, _randomize_bn
    from tilefuse.nn.int8_conv import calibrate

    torch.manual_seed(7)
    model = _randomize_bn(TorchvisionResNet(width=8)).eval()
    x = torch.randn(2, 3, 16, 16)
    q, rep = tilefuse.quantize(tilefuse.patch(model), calibration=x)
    convs = [m for m in q.modules() if isinstance(m, Int8Conv2d)]
    assert calibrate(q, x) == len(convs) > 0
    assert all(m.act_scale == "static" and m.input_scale.item() > 0 for m in convs)
    with torch.no_grad():
        want, got = model(x), q(x)
        dev = (got - want).abs().max() / want.abs().max()
        assert dev < 0.1 and torch.equal(got.argmax(1), want.argmax(1)), dev
        z = torch.randn(2, convs[1].in_channels, 8, 8)
        with count_traffic() as t:
            convs[1](z)
    assert t.launches == 1, (t.kernels, t.torch_ops)
    sd = convs[1].state_dict()
    assert list(sd) == ["weight", "weight_scale", "bias", "input_scale"]
    fresh = Int8Conv2d(convs[1].in_channels, convs[1].out_channels, convs[1].kernel_size,
                       convs[1].stride, convs[1].padding, act_scale="static",
                       bias=convs[1].bias is not None)
    with pytest.raises(RuntimeError, match="not calibrated"):
        fresh(torch.randn(1, convs[1].in_channels, 8, 8))
    fresh.activation, fresh.post_activation = convs[1].activation, convs[1].post_activation
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(z), convs[1](z))


def test_torch_backend_matches_kernel(monkeypatch):
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(10, 7, 3, stride=2, padding=1)
    x = torch.randn(2, 10, 9, 9)
    static = Int8Conv2d.from_float(conv, act_scale="static", activation="relu")
    static.observe(x)
    for scale in ("pixel", "sample", "tensor", static):
        q = static if scale is static else Int8Conv2d.from_float(conv, act_scale=scale,
                                                                   activation="relu")
        y = q(x)
        with monkeypatch.context() as m:
            m.setenv("TILEFUSE_BACKEND", "torch")
            ref = q(x)
        torch.testing.assert_close(y, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_int8_conv_moves_no_im2col_buffer():
    """W8A8 3x3 on a channels_last input: two launches (quantizer, conv); distinct bytes within
    1.05x of x + w + w_scale + bias + y and the int8 input and its scales written and read once
    (the old im2col path wrote and read a (N*OH*OW, 9*C) buffer: 9x the input)."""
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    q = Int8Conv2d.from_float(conv)
    x = torch.randn(2, 32, 12, 12).contiguous(memory_format=torch.channels_last)
    with count_traffic() as t:
        y = q(x)
    assert t.launches == 2, (t.kernels, t.torch_ops)
    qx = torch.empty(x.shape, dtype=torch.int8)
    scales = torch.empty(2 * 12 * 12, dtype=torch.float32)
    minimal = nbytes(x, q.weight, q.weight_scale, q.bias, y) + 2 * nbytes(qx, scales)
    assert t.distinct_bytes <= 1.05 * minimal, t.distinct_bytes / minimal


def test_weight_only_input_gradient():
    """weight_only with an input that needs a gradient: the float conv on the dequantized
    weight (autograd), same values as the int8 kernel."""
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(6, 4, 3, padding="same")
    q = Int8Conv2d.from_float(conv, mode="weight_only", activation="relu")
    x = torch.randn(2, 6, 7, 5, requires_grad=True)
    y = q(x)
    y.sum().backward()
    with torch.no_grad():
        ref = q(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    xd = x.detach().double().requires_grad_()
    F.relu(F.conv2d(xd, q.dequantized_weight(torch.float64), conv.bias.double(),
                    padding="same")).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-5, rtol=0)


def test_bad_arguments():
    x, w = _ints(1, 4, 5, 5), _ints(3, 4, 3, 3)
    from tilefuse.kernels.conv_fwd import launch_conv2d_fwd

    with pytest.raises(ValueError, match="w_scale"):
        launch_conv2d_fwd(x, w, torch.empty(1, 3, 3, 3))
    with pytest.raises(ValueError, match="act_scale"):
        Int8Conv2d(4, 3, 3, act_scale="row")
    assert tilefuse.nn.Int8Conv2d(4, 3, 3, act_scale="sample").act_scale == "sample"


def test_residual_gradient_still_flows():
    """A residual that needs a gradient (the im2col version's int8 GEMM had one): the add and
    post-activation run as torch ops after the int8 conv, same values."""
    torch.manual_seed(6)
    q = Int8Conv2d.from_float(torch.nn.Conv2d(4, 4, 3, padding=1), activation="silu",
                              post_activation="relu")
    x = torch.randn(2, 4, 6, 5)
    r = torch.randn(2, 4, 6, 5, requires_grad=True)
    y = q(x, r)
    (y * torch.arange(y.numel()).view(y.shape)).sum().backward()
    with torch.no_grad():
        ref = q(x, r)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    mask = (ref > 0).float()
    torch.testing.assert_close(r.grad, mask * torch.arange(y.numel()).view(y.shape).float())

"""Differential (hypothesis) fuzzers of the public ops that tests/test_fuzz_ops.py does not cover:
dense conv2d, the W8A8 linear (+ dequantize_per_row) and the fp8 family. Same lanes and
tolerance rule as there (``fuzz_utils.check``: tied to eager torch's error in the same dtype);
the quantized ops are compared with an fp64 reference computed from the same quantized operands
and scales (exact products, so only the fp32 accumulation and the epilogue's rounding remain).
The registry (``tilefuse.registry``) points each op at its fuzzer (tests/test_registry.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402
from fuzz_utils import fuzz, randn, seed  # noqa: E402
from test_fuzz_ops import ACTS, FLOATS, draw_layout, layout, ref_act, run_and_compare  # noqa: E402

from tilefuse import ops  # noqa: E402
from tilefuse._backend import backend_for_device  # noqa: E402

pytestmark = pytest.mark.skipif(backend_for_device("cpu") != "triton",
                                reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")


@fuzz(6, 150)
def test_fuzz_conv2d(data):
    g = seed(data)
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    n = data.draw(st.sampled_from([1, 2]), label="N")
    groups = data.draw(st.sampled_from([1, 1, 2]), label="groups")
    cin = groups * data.draw(st.sampled_from([1, 3, 4]), label="Cin/group")
    cout = groups * data.draw(st.sampled_from([1, 2, 5]), label="Cout/group")
    h = data.draw(st.sampled_from([1, 5, 8]), label="H")
    w = data.draw(st.sampled_from([1, 6, 7]), label="W")
    k = data.draw(st.sampled_from([1, 3, (3, 1), 2]), label="kernel")
    kh, kw = (k, k) if isinstance(k, int) else k
    stride = data.draw(st.sampled_from([1, 2]), label="stride")
    dilation = data.draw(st.sampled_from([1, 2]), label="dilation")
    padding = data.draw(st.sampled_from([0, 1, (1, 0), "same", "valid"]), label="padding")
    if padding == "same":
        stride = 1
    if isinstance(padding, tuple):
        pad_h, pad_w = padding
    else:
        pad_h = pad_w = {0: 0, 1: 1, "valid": 0, "same": dilation * max(kh, kw)}[padding]
    if h + 2 * pad_h < dilation * (kh - 1) + 1 or w + 2 * pad_w < dilation * (kw - 1) + 1:
        padding = "same"
        stride = 1
    act = data.draw(st.sampled_from(ACTS), label="act")
    has_bias = data.draw(st.booleans(), label="bias")
    x_layout = draw_layout(data, ["contig", "channels_last", "step"], "x_layout")
    x = randn(g, (n, cin, h, w), dtype)
    wt = randn(g, (cout, cin // groups, kh, kw), dtype, scale=(cin // groups * kh * kw) ** -0.5)
    bias = randn(g, (cout,), dtype) if has_bias else None
    out_shape = F.conv2d(x.double(), wt.double(), None, stride, padding, dilation, groups).shape
    res = randn(g, out_shape, dtype) if data.draw(st.booleans(), label="residual") else None
    nred = cin // groups * kh * kw

    def kern(x, w, bias, res):
        return ops.conv2d(layout(x, *x_layout), w, bias, stride, padding, dilation, groups,
                          activation=act, residual=res)

    def ref(x, w, bias, res):
        y = ref_act(F.conv2d(x, w, bias, stride, padding, dilation, groups), act)
        return y if res is None else y + res

    run_and_compare(data, g, dict(x=x, w=wt, bias=bias, res=res), kern, ref, name="conv2d",
                    n_reduce=nred)


def _check_scaled_gemm(y, qa, qw, sa, sw, bias, act, res, acc_terms):
    """``y`` vs the fp64 ``act((qa @ qw.T) * sa * sw + bias) + res`` computed from the same
    quantized operands: fp32 accumulation over ``acc_terms`` products (0: exact int32), fp32
    epilogue, rounding to ``y``'s dtype."""
    z = (qa.double() @ qw.double().t()) * sa.double() * sw.double()
    bound = (qa.double().abs() @ qw.double().abs().t()) * sa.double() * sw.double()
    if bias is not None:
        z = z + bias.double()
        bound = bound + bias.double().abs()
    ref = ref_act(z, act)
    if res is not None:
        ref = ref + res.double()
        bound = bound + res.double().abs()
    fi = torch.finfo(y.dtype)
    tol = ((acc_terms + 8) * 2.0 ** -24 + 2 * fi.eps) * (bound + ref.abs())
    # (+ one subnormal step of y's dtype: below fi.tiny its rounding error is absolute)
    assert bool(((y.double() - ref).abs() <= tol + fi.tiny * fi.eps + 1e-30).all())


@fuzz(6, 150)
def test_fuzz_w8a8_linear(data):
    g = seed(data)
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    lead = data.draw(st.sampled_from([(1,), (5,), (2, 3), (0,)]), label="lead")
    K = data.draw(st.sampled_from([1, 7, 16, 33]), label="K")
    N = data.draw(st.sampled_from([1, 5, 16, 31]), label="N")
    act = data.draw(st.sampled_from(ACTS), label="act")
    x = randn(g, lead + (K,), dtype, scale=data.draw(st.sampled_from([1.0, 1e-3, 50.0])))
    qw = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = randn(g, (N,), torch.float32).abs() * 0.01 + 1e-4
    bias = randn(g, (N,), dtype) if data.draw(st.booleans(), label="bias") else None
    res = randn(g, lead + (N,), dtype) if data.draw(st.booleans(), label="res") else None
    y = ops.w8a8_linear(x, qw, scale, bias=bias, activation=act, residual=res)
    assert y.dtype == dtype and y.shape == lead + (N,)
    qx, sx = ops.quantize_per_row(x)
    # documented as the fp32 product q * scale, then cast to dtype
    assert torch.equal(ops.dequantize_per_row(qx, sx, torch.float64),
                       (qx.float() * sx.float()).double())
    # int32 accumulation is exact; fp32 scaling + epilogue, then rounding to dtype
    _check_scaled_gemm(y, qx, qw, sx, scale, bias, act, res, acc_terms=0)


@fuzz(6, 150)
def test_fuzz_fp8_ops(data):
    g = seed(data)
    fmt = data.draw(st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]), label="fp8")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
                      label="dtype")
    M = data.draw(st.sampled_from([1, 3, 17]), label="M")
    K = data.draw(st.sampled_from([1, 16, 33]), label="K")
    N = data.draw(st.sampled_from([1, 8, 31]), label="N")
    act = data.draw(st.sampled_from(ACTS), label="act")
    x = randn(g, (M, K), dtype, scale=data.draw(st.sampled_from([1.0, 1e-2, 30.0])))
    # quantize / dequantize: q * scale within the format's half-ulp of x
    q, s = ops.quantize_fp8_per_row(x, fmt)
    assert q.dtype == fmt and s.shape == (M, 1)
    deq = ops.dequantize_fp8(q, s, torch.float64)
    rel = 2.0 ** -4 if fmt == torch.float8_e4m3fn else 2.0 ** -3
    fmax = torch.finfo(fmt).max
    assert bool(((deq - x.double()).abs() <= rel * x.double().abs() + s.double() * 2.0 ** -9
                 + s.double() * fmax * 2.0 ** -20).all())
    # fp8 linear = quantize x + fp8 GEMM with both scales and the epilogue
    w = randn(g, (N, K), torch.float32)
    qw, sw = ops.quantize_fp8_per_row(w, fmt)
    sw = sw.reshape(N)
    bias = randn(g, (N,), dtype) if data.draw(st.booleans(), label="bias") else None
    res = randn(g, (M, N), dtype) if data.draw(st.booleans(), label="res") else None
    y = ops.fp8_linear(x, qw, sw, bias=bias, activation=act, residual=res)
    assert y.dtype == dtype and y.shape == (M, N)
    _check_scaled_gemm(y, q, qw, s, sw, bias, act, res, acc_terms=K)
    # the raw GEMM with per-tensor scales agrees with the same reference
    y2 = ops.fp8_matmul(q, qw.t(), s, sw, bias=bias, activation=act, residual=res,
                        out_dtype=dtype)
    assert torch.equal(y2, y)

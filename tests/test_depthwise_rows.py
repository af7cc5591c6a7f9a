"""The aligned-row NCHW path of the depthwise kernels (``ROW_VEC > 1``: one 16-byte aligned
window load per kernel row, taps as in-register shifts): forward and gradients against torch on
shapes that take it, the host rule that picks it, and the per-tap fallback where rows are not
16-byte aligned (interpreter lane; the sm_90 load widths are in test_sm90_loads.py)."""
import pytest
import torch

from test_depthwise import _check  # noqa: I100
from tilefuse.kernels.depthwise import tile_config
from tilefuse.kernels.depthwise_rows import row_plan, row_plan_dgrad, row_plan_wgrad

# (N, C, H, W, k, stride, padding, dilation, multiplier, activation, dtype)
ROW_CASES = [
    pytest.param(2, 4, 8, 16, 3, 1, 1, 1, 1, "relu6", torch.float32, id="3x3-s1"),
    pytest.param(1, 3, 6, 24, 5, 2, 2, 1, 1, "silu", torch.float32, id="5x5-s2"),
    pytest.param(1, 2, 5, 16, 3, 1, "same", 2, 2, None, torch.float32, id="dil2-mult2"),
    pytest.param(1, 2, 12, 32, 7, 1, 3, 1, 1, "gelu", torch.float32, id="7x7"),
    pytest.param(1, 3, 7, 8, 3, 1, "valid", 1, 1, "relu", torch.float32, id="valid"),
    pytest.param(1, 2, 6, 16, 3, 1, (0, 2, 1, 0), 1, 1, "tanh", torch.float32, id="pad4"),
    pytest.param(2, 4, 8, 16, 3, 1, 1, 1, 1, "relu6", torch.float16, id="fp16"),
    pytest.param(1, 3, 9, 16, 5, 1, 2, 1, 1, "silu", torch.bfloat16, id="bf16-5x5"),
]


@pytest.mark.parametrize("N,C,H,W,k,s,p,d,m,act,dtype", ROW_CASES)
def test_row_path_matches_torch(N, C, H, W, k, s, p, d, m, act, dtype):
    x = torch.randn(N, C, H, W)
    w = torch.randn(C * m, 1, k, k) * 0.5
    b = torch.randn(C * m)
    res = torch.randn(N, C * m, 1, 1) if act == "relu6" else None
    _check(x, w, b, s, p, d, act, residual=res, dtype=dtype)


def _plan(x, k=3, s=1, p=1, d=1):
    OW = (x.shape[3] + 2 * p - d * (k - 1) - 1) // s + 1
    OH = (x.shape[2] + 2 * p - d * (k - 1) - 1) // s + 1
    cfg = tile_config(x.shape[1], OH, OW, False)
    return row_plan(x, cfg, s, d, p, k, k, False)


def test_row_plan_rule():
    """ROW_VEC: 16 bytes of elements when W, the strides and the tile start allow it; less or 1
    (per-tap loads) otherwise. The MobileNet widths: 56 takes 128-bit rows in every dtype, 28
    only in fp32 (a 56-byte fp16 row is 8-byte aligned), 14 and 7 never."""
    f32, f16 = torch.float32, torch.float16
    assert _plan(torch.empty(1, 8, 56, 56, dtype=f16))["ROW_VEC"] == 8
    assert _plan(torch.empty(1, 8, 56, 56, dtype=f32))["ROW_VEC"] == 4
    assert _plan(torch.empty(1, 8, 28, 28, dtype=f32))["ROW_VEC"] == 4
    assert _plan(torch.empty(1, 8, 28, 28, dtype=f16))["ROW_VEC"] == 4
    assert _plan(torch.empty(1, 8, 14, 14, dtype=f32))["ROW_VEC"] == 2
    assert _plan(torch.empty(1, 8, 7, 7, dtype=f16))["ROW_VEC"] == 1
    plan = _plan(torch.empty(1, 8, 56, 56, dtype=f16))
    assert plan["WIN_A"] == 8 and plan["WIN_W"] == 32 and plan["TAPS"] == 16
    assert _plan(torch.empty(1, 8, 56, 57)[..., :56])["ROW_VEC"] == 1  # row stride 57
    assert _plan(torch.empty(1, 8, 56, 64)[..., 1:57])["ROW_VEC"] == 1  # 4-byte aligned start
    cl = torch.empty(1, 8, 56, 56).to(memory_format=torch.channels_last)
    assert row_plan(cl, tile_config(8, 56, 56, True), 1, 1, 1, 3, 3, True)["ROW_VEC"] == 1
    # grad_input: dz windows of dy and the saved output, unit column stride only
    dy = torch.empty(1, 8, 56, 56, dtype=f16)
    cfg = tile_config(8, 56, 56, False)
    plan = row_plan_dgrad(dy, dy, cfg, 1, 1, 1, 3, 3, False)
    assert plan["ROW_VEC"] == 8 and plan["WIN_A"] == 8 and plan["WIN_W"] == 32
    assert row_plan_dgrad(dy, dy, cfg, 2, 1, 1, 3, 3, False)["ROW_VEC"] == 1
    assert row_plan_dgrad(dy, dy[..., :28], cfg, 1, 1, 1, 3, 3, False)["ROW_VEC"] == 4
    # grad_weight: x windows as the forward, dz tiles of dy and saved; one ROW_VEC for all
    assert row_plan_wgrad(dy, dy, dy, cfg, 1, 1, 1, 3, False)["ROW_VEC"] == 8
    assert row_plan_wgrad(dy.float(), dy, dy, cfg, 1, 1, 1, 3, False)["ROW_VEC"] == 4
    assert row_plan_wgrad(dy, dy, dy[..., :28], cfg, 1, 1, 1, 3, False)["ROW_VEC"] == 4


def test_unaligned_views_fall_back():
    """A view starting mid-row (4-byte aligned) takes the per-tap loads; aligned views with a
    padded row stride (40) take the row path; all match torch."""
    base = torch.randn(2, 4, 8, 40)
    for x in (base[..., 1:17], base[..., :16], base[..., 8:24]):
        _check(x, torch.randn(4, 1, 3, 3), torch.randn(4), 1, 1, 1, "relu")

"""The aligned NCHW paths of the depthwise kernels: aligned rows (``ROW_VEC > 1``: one 16-byte
aligned window load per kernel row, taps as in-register shifts; forward, grad_input, grad_weight)
and whole planes (``FLAT_N > 0``: small maps, forward): results against torch on shapes that
take them, the host rules that pick them, and the per-tap fallback where they do not apply
(interpreter lane; the sm_90 load widths are in test_sm90_loads.py)."""
import pytest
import torch

from test_depthwise import _check  # noqa: I100
from tilefuse.kernels.depthwise import tile_config
from tilefuse.kernels.depthwise_planes import flat_plan
from tilefuse.kernels.depthwise_rows import row_plan, row_plan_dgrad, row_plan_wgrad, row_vec

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
    # stride-2 grad_input on dz row windows (BLOCK_W / 2 columns of dz per tile)
    pytest.param(1, 3, 12, 32, 3, 2, 1, 1, 1, "relu6", torch.float32, id="dgrad-s2"),
    pytest.param(1, 2, 11, 32, 3, 2, 1, 1, 1, "silu", torch.float16, id="dgrad-s2-fp16"),
    pytest.param(1, 2, 12, 32, 3, 2, 2, 2, 2, None, torch.float32, id="dgrad-s2-dil2-mult2"),
    pytest.param(1, 2, 12, 32, 5, 2, 2, 1, 1, "gelu", torch.bfloat16, id="dgrad-s2-5x5-bf16"),
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
    return row_plan(x, cfg, s, d, p, k, k, False, OH, OW, 1, s, d)


def test_row_plan_rule():
    """ROW_VEC: 16 bytes of elements when W, the strides and the tile start allow it, else 1
    (per-tap loads). The MobileNet widths: 56 takes 128-bit rows in every dtype, 28 only in
    fp32 (a 56-byte fp16 row is 8-byte aligned), 14 and 7 never (they take whole planes when
    the tile covers the map: test_flat_plan_rule)."""
    f32, f16 = torch.float32, torch.float16
    assert _plan(torch.empty(1, 8, 56, 56, dtype=f16))["ROW_VEC"] == 8
    assert _plan(torch.empty(1, 8, 56, 56, dtype=f32))["ROW_VEC"] == 4
    assert row_vec([torch.empty(1, 8, 28, 28)], 8) == 4
    assert row_vec([torch.empty(1, 8, 28, 28, dtype=f16)], 8) == 1
    assert row_vec([torch.empty(1, 8, 14, 14)], 8) == 1
    assert row_vec([torch.empty(1, 8, 7, 7, dtype=f16)], 8) == 1
    assert _plan(torch.empty(1, 8, 56, 56))["FLAT_N"] == 0
    plan = _plan(torch.empty(1, 8, 56, 56, dtype=f16))
    assert plan["WIN_A"] == 8 and plan["WIN_W"] == 32 and plan["TAPS"] == 16
    assert _plan(torch.empty(1, 8, 56, 57)[..., :56])["ROW_VEC"] == 1  # row stride 57
    assert _plan(torch.empty(1, 8, 56, 64)[..., 1:57])["ROW_VEC"] == 1  # 4-byte aligned start
    cl = torch.empty(1, 8, 56, 56).to(memory_format=torch.channels_last)
    assert row_plan(cl, tile_config(8, 56, 56, True), 1, 1, 1, 3, 3, True, 56, 56, 1, 1,
                    1)["ROW_VEC"] == 1
    # grad_input: dz windows of dy and the saved output, unit column stride only
    dy = torch.empty(1, 8, 56, 56, dtype=f16)
    cfg = tile_config(8, 56, 56, False)
    plan = row_plan_dgrad(dy, dy, cfg, 1, 1, 1, 3, 3, False, 56, 56, 1, 1, 1)
    assert plan["ROW_VEC"] == 8 and plan["WIN_A"] == 8 and plan["WIN_W"] == 32
    assert row_plan_dgrad(dy, dy, cfg, 2, 1, 1, 3, 3, False, 56, 56, 1, 2, 1)["ROW_VEC"] == 1
    assert row_plan_dgrad(dy, dy[..., :28], cfg, 1, 1, 1, 3, 3, False, 56, 56, 1, 1,
                          1)["ROW_VEC"] == 1
    # grad_weight: x windows as the forward, dz tiles of dy and saved; one ROW_VEC for all
    assert row_plan_wgrad(dy, dy, dy, cfg, 1, 1, 1, 3, False, 1, 3, 1, 1)["ROW_VEC"] == 8
    assert row_plan_wgrad(dy.float(), dy, dy, cfg, 1, 1, 1, 3, False, 1, 3, 1,
                          1)["ROW_VEC"] == 1
    assert row_plan_wgrad(dy, dy, dy[..., :28], cfg, 1, 1, 1, 3, False, 1, 3, 1,
                          1)["ROW_VEC"] == 1


def _plan_dgrad(N, C, H, W, k, s, p, d=1, m=1, dtype=torch.float32):
    OH, OW = (H + 2 * p - d * (k - 1) - 1) // s + 1, (W + 2 * p - d * (k - 1) - 1) // s + 1
    dy = torch.empty(N, C * m, OH, OW, dtype=dtype)
    return row_plan_dgrad(dy, dy, tile_config(C, H, W, False), s, d, p, k, k, False, H, W, m, s,
                          d)


@pytest.mark.parametrize("case", [c.id for c in ROW_CASES if c.id.startswith("dgrad-s2")])
def test_row_plan_dgrad_strided(case):
    """The stride-2 cases above really run grad_input on dz row windows: the window starts at dz
    column iw0 / 2, so BLOCK_W / 2 (not BLOCK_W) must be a multiple of the 16-byte group."""
    N, C, H, W, k, s, p, d, m, _, dtype = next(c.values for c in ROW_CASES if c.id == case)
    plan = _plan_dgrad(N, C, H, W, k, s, p, d, m, dtype)
    assert plan["ROW_VEC"] == 16 // dtype.itemsize and plan["FLAT_N"] == 0, plan


def test_row_plan_dgrad_mobilenet_strided():
    """MobileNetV2's stride-2 3x3 layers: 112 -> 56 takes dz rows in every dtype (16-wide dx
    tiles read 8 dz columns), 56 -> 28 in fp32 only (a 28-wide fp16 dz row is 8-byte aligned)."""
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        plan = _plan_dgrad(2, 32, 112, 112, 3, 2, 1, dtype=dt)
        assert plan["ROW_VEC"] == 16 // dt.itemsize and plan["WIN_A"] == 0, plan
    assert _plan_dgrad(2, 32, 56, 56, 3, 2, 1)["ROW_VEC"] == 4
    assert _plan_dgrad(2, 32, 56, 56, 3, 2, 1, dtype=torch.float16)["ROW_VEC"] == 1


def test_unaligned_views_fall_back():
    """A view starting mid-row (4-byte aligned) takes the per-tap loads; aligned views with a
    padded row stride (40) take the row path; all match torch."""
    base = torch.randn(2, 4, 8, 40)
    for x in (base[..., 1:17], base[..., :16], base[..., 8:24]):
        _check(x, torch.randn(4, 1, 3, 3), torch.randn(4), 1, 1, 1, "relu")


# whole-plane forward: (N, C, H, W, k, stride, padding, activation, residual, dtype)
FLAT_CASES = [
    pytest.param(2, 8, 14, 14, 3, 1, 1, "relu6", True, torch.float32, id="14x14-res"),
    pytest.param(2, 16, 7, 7, 3, 1, 1, "silu", False, torch.float16, id="7x7-fp16"),
    pytest.param(1, 4, 14, 14, 7, 1, 3, None, False, torch.bfloat16, id="14x14-k7-bf16"),
    pytest.param(1, 5, 14, 14, 3, 2, 1, "gelu", True, torch.float32, id="s2-partial-cblock"),
    pytest.param(1, 1, 28, 28, 5, 2, 2, None, False, torch.float32, id="28x28-s2-one-plane"),
]


@pytest.mark.parametrize("N,C,H,W,k,s,p,act,res,dtype", FLAT_CASES)
def test_flat_path_matches_torch(N, C, H, W, k, s, p, act, res, dtype):
    x = torch.randn(N, C, H, W)
    OH = (H + 2 * p - k) // s + 1
    assert _plan_flat(x.to(dtype), k, s, p) > 0
    r = torch.randn(N, C, OH, OH) if res else None
    _check(x, torch.randn(C, 1, k, k) * 0.5, torch.randn(C), s, p, 1, act, residual=r,
           dtype=dtype)


def _plan_flat(x, k, s, p):
    OH = (x.shape[2] + 2 * p - k) // s + 1
    OW = (x.shape[3] + 2 * p - k) // s + 1
    return flat_plan(x, tile_config(x.shape[1], OH, OW, False), OH, OW, 1)


def test_flat_plan_rule():
    """Whole planes when the tile covers the output plane and the tile's planes are whole
    16-byte groups: 14x14 and 7x7 in every dtype, not 56x56 (row path), not an odd plane count
    with odd planes (7x7x3 fp32 = 147 elements), not a sliced (non-contiguous) image."""
    assert _plan_flat(torch.empty(2, 32, 14, 14, dtype=torch.float16), 3, 1, 1) == 1024
    assert _plan_flat(torch.empty(2, 64, 7, 7, dtype=torch.bfloat16), 3, 1, 1) == 1024
    assert _plan_flat(torch.empty(2, 32, 56, 56), 3, 1, 1) == 0
    assert _plan_flat(torch.empty(1, 3, 7, 7), 3, 1, 1) == 0
    assert _plan_flat(torch.empty(2, 32, 14, 16)[..., :14], 3, 1, 1) == 0
    # grad_input: whole dz planes (any stride), multiplier 1
    dy = torch.empty(2, 32, 14, 14, dtype=torch.float16)
    cfg = tile_config(32, 14, 14, False)
    assert row_plan_dgrad(dy, dy, cfg, 1, 1, 1, 3, 3, False, 14, 14, 1, 1, 1)["FLAT_N"] == 1024
    # multiplier 2: per output channel a band of dz rows (here the whole 14x14 plane)
    plan = row_plan_dgrad(dy, dy, cfg, 1, 1, 1, 3, 3, False, 14, 14, 2, 1, 1)
    assert plan["BAND"] == 1 and plan["FLAT_N"] == 256, plan
    plan = row_plan_wgrad(dy, dy, dy, cfg, 1, 1, 1, 3, False, 1, 3, 1, 1)  # wgrad: all planes
    assert plan["FLAT_N"] == plan["FLAT_X"] == 1024
    cfg = tile_config(32, 28, 28, False)  # 28x28 dx tiles are 4 rows: not whole planes,
    plan = row_plan_dgrad(dy, dy, cfg, 2, 1, 1, 3, 3, False, 28, 28, 1, 2, 1)  # but bands
    # 3 rows of 14 + misalignment (49), raised to one 16-byte group per thread (128 x 8 / 8)
    assert plan["BAND"] == 1 and plan["FLAT_N"] == 128, plan



# grad_input on bands of dz rows (BAND=1): (N, C, H, W, k, stride, padding, dilation, mult, act,
# dtype); the 28x28 5x5 stride-2 layer's dx tiles are 4-row bands of a 14x14 dz map
BAND_CASES = [
    pytest.param(2, 4, 28, 28, 5, 2, 2, 1, 1, "relu6", torch.float32, id="28x28-k5-s2"),
    pytest.param(1, 4, 28, 28, 5, 2, 2, 1, 1, "silu", torch.float16, id="28x28-k5-s2-fp16"),
    pytest.param(1, 4, 28, 28, 3, 2, 1, 1, 1, None, torch.bfloat16, id="28x28-k3-s2-bf16"),
    pytest.param(1, 2, 20, 20, 3, 2, 2, 2, 2, "gelu", torch.float32, id="dil2-s2-mult2"),
    pytest.param(2, 4, 14, 14, 3, 1, 1, 1, 2, "relu", torch.float32, id="14x14-mult2"),
    pytest.param(1, 8, 15, 17, 3, 1, 2, 2, 2, "relu6", torch.float16, id="15x17-dil2-mult2"),
]


@pytest.mark.parametrize("N,C,H,W,k,s,p,d,m,act,dtype", BAND_CASES)
def test_band_path_matches_torch(N, C, H, W, k, s, p, d, m, act, dtype):
    plan = _plan_dgrad(N, C, H, W, k, s, p, d, m, dtype)
    assert plan["BAND"] == 1 and plan["ROW_VEC"] == 16 // dtype.itemsize, plan
    x = torch.randn(N, C, H, W)
    _check(x, torch.randn(C * m, 1, k, k) * 0.5, torch.randn(C * m), s, p, d, act, dtype=dtype)


def test_band_plan_rule():
    """Bands need a contiguous NCHW dz whose image is whole 16-byte groups (3 fp16 planes of
    14x14 are not) and dx tiles spanning the width, or a few of them (7 tiles of 8 columns over
    a 56-wide map re-read too much)."""
    assert _plan_dgrad(1, 3, 28, 28, 5, 2, 2, dtype=torch.float16)["FLAT_N"] == 0
    assert _plan_dgrad(1, 4, 28, 28, 5, 2, 2, dtype=torch.float16)["FLAT_N"] == 256
    assert _plan_dgrad(1, 16, 28, 28, 5, 2, 2)["FLAT_N"] == 64  # 4 rows of 14 + 3, fp32
    assert _plan_dgrad(2, 32, 56, 56, 3, 2, 1, dtype=torch.float16)["FLAT_N"] == 0
    dy = torch.empty(1, 4, 14, 16)[..., :14]  # sliced: row stride 16
    cfg = tile_config(4, 28, 28, False)
    assert row_plan_dgrad(dy, dy, cfg, 2, 1, 2, 5, 5, False, 28, 28, 1, 2, 1)["FLAT_N"] == 0


def _plan_wgrad(N, C, H, W, k, s, p, d=1, m=1, dtype=torch.float32):
    OH, OW = (H + 2 * p - d * (k - 1) - 1) // s + 1, (W + 2 * p - d * (k - 1) - 1) // s + 1
    x, dy = torch.empty(N, C, H, W, dtype=dtype), torch.empty(N, C * m, OH, OW, dtype=dtype)
    return row_plan_wgrad(x, dy, dy, tile_config(C * m, OH, OW, False), s, d, p, k, False, m,
                          k, s, d)


# grad_weight on bands of dz and x rows: (N, C, H, W, k, stride, padding, dilation, mult, act,
# dtype); 24 -> 12 fp16 is MobileNetV2's 56 -> 28 stride-2 layer in small (12-wide fp16 dz rows
# are not 16-byte aligned, the 4-row output tiles not whole planes)
WGRAD_BAND_CASES = [
    pytest.param(1, 8, 24, 24, 3, 2, 1, 1, 1, "relu6", torch.float16, id="24-s2-fp16"),
    pytest.param(2, 4, 20, 20, 5, 2, 2, 1, 1, "silu", torch.bfloat16, id="20-k5-s2-bf16"),
    pytest.param(1, 8, 15, 17, 3, 1, 2, 2, 2, "relu6", torch.float32, id="15x17-dil2-mult2"),
    pytest.param(2, 4, 14, 14, 3, 1, 1, 1, 2, None, torch.float16, id="14x14-mult2-fp16"),
]


@pytest.mark.parametrize("N,C,H,W,k,s,p,d,m,act,dtype", WGRAD_BAND_CASES)
def test_band_wgrad_matches_torch(N, C, H, W, k, s, p, d, m, act, dtype):
    plan = _plan_wgrad(N, C, H, W, k, s, p, d, m, dtype)
    assert plan["BAND"] == 1 and plan["FLAT_X"] > 0, plan
    x = torch.randn(N, C, H, W)
    _check(x, torch.randn(C * m, 1, k, k) * 0.5, torch.randn(C * m), s, p, d, act, dtype=dtype)


def test_band_wgrad_plan_mobilenet():
    """56 -> 28 stride 2 in fp16/bf16: x rows are aligned, dz rows (28 wide) are not: bands of
    4 dz rows (128 with the one-group-per-thread floor) and 9 x rows (504 + 7 -> 512)."""
    for dt in (torch.float16, torch.bfloat16):
        plan = _plan_wgrad(2, 32, 56, 56, 3, 2, 1, dtype=dt)
        assert (plan["BAND"], plan["FLAT_N"], plan["FLAT_X"]) == (1, 128, 512), plan
    assert _plan_wgrad(2, 32, 56, 56, 3, 2, 1)["ROW_VEC"] == 4  # fp32: aligned rows
    assert "BAND" not in _plan_wgrad(2, 32, 56, 56, 3, 2, 1)


def test_row_wgrad_strided_window_lowers_block_c():
    """A stride-2 grad_weight tile's x row window spans twice its columns (2 x 128 columns x 16
    fp32 channels here: 140-255 registers on sm_90): the plan halves BLOCK_C until a window
    holds at most ROW_WIN_BYTES, and the launch sizes its grid from that BLOCK_C (every
    channel's gradient is still computed). The same window in fp16 is 8 KB: kept."""
    plan = _plan_wgrad(1, 16, 12, 64, 3, 2, 1)
    assert plan["ROW_VEC"] == 4 and plan["WIN_W"] == 128 and plan["BLOCK_C"] == 8, plan
    assert "BLOCK_C" not in _plan_wgrad(1, 16, 12, 64, 3, 1, 1)
    assert "BLOCK_C" not in _plan_wgrad(2, 32, 112, 112, 3, 2, 1, dtype=torch.float16)
    _check(torch.randn(1, 16, 12, 64), torch.randn(16, 1, 3, 3) * 0.5, torch.randn(16), 2, 1, 1,
           "relu6")


def test_band_forward_plan():
    """The forward reads x as row bands where whole planes (multiplier 1 only) and aligned rows
    do not apply: multiplier 2 on small maps (14x14: the whole plane of each output channel's
    input channel; 15x17 dilation 2: 3 tiles of 8 columns share each band)."""
    for (N, C, H, W, k, s, p, d, m, dt, flat) in [
            (2, 4, 14, 14, 3, 1, 1, 1, 2, torch.float32, 256),
            (1, 8, 15, 17, 3, 1, 2, 2, 2, torch.float16, 512),
            (1, 8, 15, 17, 3, 1, 2, 2, 2, torch.float32, 512)]:
        OH = (H + 2 * p - d * (k - 1) - 1) // s + 1
        OW = (W + 2 * p - d * (k - 1) - 1) // s + 1
        plan = row_plan(torch.empty(N, C, H, W, dtype=dt), tile_config(C * m, OH, OW, False), s,
                        d, p, k, k, False, OH, OW, m, s, d)
        assert (plan.get("BAND"), plan["FLAT_N"]) == (1, flat), plan
    assert "BAND" not in _plan(torch.empty(1, 3, 15, 17))  # 765 elements: not whole groups

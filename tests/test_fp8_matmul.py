"""fp8 GEMM (tilefuse.ops.fp8_matmul) and the fused per-row fp8 quantizer, against fp64
references computed from the same fp8 operands and scales (interpreter lane on CPU)."""
import pytest
import torch

import tilefuse
from tilefuse.activations import torch_activation
from tilefuse.kernels import quant

from fast_path_utils import assert_compiles_to_custom_op, assert_fast_equals_custom_op  # noqa: I100

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
ops = tilefuse.ops
OUT_EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.fixture
def dev(device):
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    return device


def fp8(*shape, dtype=E4, device="cpu", scale=4.0):
    return (torch.randn(*shape) * scale).to(dtype).to(device)


def reference(a, b, sa, sb, bias=None, activation=None, residual=None):
    """fp64 result and an error bound for fp32 accumulation over K (+ epilogue rounding)."""
    K = a.shape[-1]
    a64, b64 = a.double(), b.double()
    sa64 = sa.double().reshape(-1, 1) if sa.numel() > 1 else sa.double().reshape(())
    sb64 = sb.double().reshape(-1) if sb.numel() > 1 else sb.double().reshape(())
    scale = (sa64 * sb64).abs() if sa64.dim() else sb64.abs() * sa64.abs()
    z = (a64 @ b64) * sa64 * sb64
    bound = (a64.abs() @ b64.abs()) * scale
    if bias is not None:
        z = z + bias.double()
        bound = bound + bias.double().abs()
    name, param = (activation, 0.0) if not isinstance(activation, tuple) else activation
    y = torch_activation(z, name or "none", param)
    tol = (K + 8) * 2.0 ** -24 * 1.2 * bound + 2e-6 * z.abs() + 1e-30
    if residual is not None:
        y = y + residual.double()
        tol = tol + 2.0 ** -24 * residual.double().abs()
    return y, tol


def check(out, ref, tol, out_dtype):
    tol = tol + OUT_EPS[out_dtype] * ref.abs()
    err = (out.double() - ref).abs()
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert bool((err <= tol).all()), f"max err {err.max().item()} (tol {tol.min().item()})"


# -------------------------------------------------------------------------------- GEMM
@pytest.mark.parametrize("adt,bdt", [(E4, E4), (E5, E5), (E4, E5), (E5, E4)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_formats_and_out_dtypes(dev, adt, bdt, out_dtype):
    M, K, N = 33, 100, 40
    a, w = fp8(M, K, dtype=adt, device=dev), fp8(N, K, dtype=bdt, device=dev)
    sa, sb = torch.rand(M, device=dev) + 0.5, torch.rand(N, device=dev) / 64
    bias = torch.randn(N, device=dev)
    out = ops.fp8_matmul(a, w.t(), sa, sb, bias=bias, out_dtype=out_dtype)
    check(out, *reference(a, w.t(), sa, sb, bias), out_dtype)


@pytest.mark.parametrize("M,K,N", [(1, 32, 16), (1, 7, 3), (7, 37, 13), (65, 129, 67), (2, 1, 5)])
def test_awkward_shapes(dev, M, K, N):
    a, b = fp8(M, K, device=dev), fp8(K, N, dtype=E5, device=dev)  # b row-major (N contiguous)
    sa, sb = torch.rand(M, 1, device=dev) + 0.5, torch.rand(1, device=dev) + 0.5
    out = ops.fp8_matmul(a, b, sa, sb, out_dtype=torch.float32)
    check(out, *reference(a, b, sa, sb), torch.float32)


def test_non_contiguous_and_batched(dev):
    big = fp8(10, 2, 48, device=dev)
    a = big[:, 1, :20]                        # (10, 20), row stride 96
    at = fp8(20, 10, device=dev).t()          # transposed operand
    w = fp8(30, 40, device=dev)[::2, ::2]     # (15, 20), strided both ways
    sb = torch.rand(15, device=dev)
    for x in (a, at):
        sa = torch.rand(10, device=dev)
        out = ops.fp8_matmul(x, w.t(), sa, sb, out_dtype=torch.float32)
        check(out, *reference(x, w.t(), sa, sb), torch.float32)
    a3 = fp8(2, 3, 20, device=dev)            # leading dims fold into M
    sa3, res = torch.rand(2, 3, 1, device=dev), torch.randn(15, device=dev)
    out = ops.fp8_matmul(a3, w.t(), sa3, sb, residual=res, out_dtype=torch.float32)
    assert out.shape == (2, 3, 15)
    ref, tol = reference(a3.reshape(6, 20), w.t(), sa3.reshape(6), sb, residual=res.expand(6, 15))
    check(out.reshape(6, 15), ref, tol, torch.float32)
    v = fp8(20, device=dev)                   # 1-D a: (K,) -> (N,)
    one = torch.ones(1, device=dev)
    out = ops.fp8_matmul(v, w.t(), one, sb, out_dtype=torch.float32)
    ref, tol = reference(v[None], w.t(), one, sb)
    check(out, ref.reshape(15), tol.reshape(15), torch.float32)


ACTS = [None, "relu", "relu6", ("leaky_relu", 0.2), "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"]


@pytest.mark.parametrize("activation", ACTS)
def test_every_epilogue(dev, activation):
    M, K, N = 9, 64, 24
    a, w = fp8(M, K, device=dev), fp8(N, K, device=dev)
    sa, sb = torch.rand(M, device=dev) / 16, torch.rand(N, device=dev) / 16
    bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
    res = torch.randn(M, N, device=dev)
    out = ops.fp8_matmul(a, w.t(), sa, sb, bias=bias, activation=activation, residual=res,
                         out_dtype=torch.float32)
    check(out, *reference(a, w.t(), sa, sb, bias, activation, res), torch.float32)


def test_fast_accum_and_torch_backend_agree(dev, monkeypatch):
    a, w = fp8(20, 96, device=dev), fp8(12, 96, device=dev)
    sa, sb = torch.rand(20, device=dev), torch.rand(12, device=dev)
    ref, tol = reference(a, w.t(), sa, sb, activation="silu")
    for kwargs in ({}, {"fast_accum": True}):
        out = ops.fp8_matmul(a, w.t(), sa, sb, activation="silu", out_dtype=torch.float32,
                             **kwargs)
        check(out, ref, tol if dev == "cpu" or not kwargs else tol * 64, torch.float32)
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    out = ops.fp8_matmul(a, w.t(), sa, sb, activation="silu", out_dtype=torch.float32)
    check(out, ref, tol, torch.float32)


def test_bad_inputs():
    a, b, s = fp8(4, 32), fp8(32, 8), torch.ones(1)
    with pytest.raises(TypeError, match="a must have dtype in .*float8_e4m3fn"):
        ops.fp8_matmul(a.half(), b, s, s)
    with pytest.raises(TypeError, match="b must have dtype"):
        ops.fp8_matmul(a, b.to(torch.int8), s, s)
    with pytest.raises(ValueError, match="b must be 2-D"):
        ops.fp8_matmul(a, b[None], s, s)
    with pytest.raises(ValueError, match="inner dimensions"):
        ops.fp8_matmul(a, fp8(16, 8), s, s)
    with pytest.raises(TypeError, match="a_scale must have dtype in .float32"):
        ops.fp8_matmul(a, b, s.half(), s)
    with pytest.raises(TypeError, match="b_scale must be a torch.Tensor, got None"):
        ops.fp8_matmul(a, b, s, None)
    with pytest.raises(ValueError, match="a_scale must have one element"):
        ops.fp8_matmul(a, b, torch.ones(3), s)
    with pytest.raises(ValueError, match="b_scale must have one element"):
        ops.fp8_matmul(a, b, s, torch.ones(4, 2))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.fp8_matmul(a, b, s, s, bias=torch.ones(7))
    with pytest.raises(ValueError, match="residual of shape"):
        ops.fp8_matmul(a, b, s, s, residual=torch.ones(3, 8))
    with pytest.raises(TypeError, match="out_dtype"):
        ops.fp8_matmul(a, b, s, s, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="fast_accum"):
        ops.fp8_matmul(a, b, s, s, fast_accum=1)
    with pytest.raises(ValueError, match="activation"):
        ops.fp8_matmul(a, b, s, s, activation="nope")
    with pytest.raises(RuntimeError, match="inference-only"):
        ops.fp8_matmul(a, b, s, s, bias=torch.ones(8, requires_grad=True))
    with torch.no_grad():  # fine without grad mode
        ops.fp8_matmul(a, b, s, s, bias=torch.ones(8, requires_grad=True))


def test_capability_check(monkeypatch):
    from tilefuse.kernels import fp8_matmul as k

    monkeypatch.setattr(k, "_CAPABILITY", {})
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    with pytest.raises(RuntimeError, match=r"compute capability >= 8.9.*sm_80"):
        k.check_capability(dev)
    monkeypatch.setattr(k, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    k.check_capability(dev)  # Hopper: fine (and cached)
    assert k._CAPABILITY[dev] == (9, 0)


# -------------------------------------------------------------------------------- quantizer
def _edge_rows(dtype):
    """Every finite fp8 value, every midpoint (ties) and its float neighbours, -0.0 and the max."""
    fmax = quant.FORMATS[dtype][0]
    vals = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    vals = vals[torch.isfinite(vals)].sort().values
    mids = (vals[1:] + vals[:-1]) / 2
    inf = torch.tensor(float("inf"))
    row = torch.cat([vals, mids, mids.nextafter(inf), mids.nextafter(-inf),
                     torch.tensor([fmax, -0.0])])
    x = torch.stack([row, row * 0.37, torch.randn(row.numel()) * 1e-36, torch.zeros(row.numel()),
                     torch.randn(row.numel()) * 1e4, torch.randn(row.numel())])
    x[5, 7] = float("nan")
    return x


def _same(q, s, rq, rs):
    return (torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
            and torch.equal(s.nan_to_num(-1.0), rs.nan_to_num(-1.0)))


@pytest.mark.parametrize("dtype", [E4, E5])
def test_quantizer_bit_exact_against_torch_rounding(dev, dtype, monkeypatch):
    x = _edge_rows(dtype).to(dev)
    rq, rs = quant.torch_quantize_rows(x, dtype)
    q, s = ops.quantize_fp8_per_row(x, dtype)
    assert q.dtype == dtype and s.shape == (6, 1) and _same(q, s.reshape(-1), rq, rs)
    assert torch.isnan(s[5]).all() and (q[5].float() == 0).all() and s[3].item() == 1.0
    # the two-pass path (rows wider than one tile)
    monkeypatch.setattr(quant, "quant_config",
                        lambda M, N: dict(BLOCK_M=2, BLOCK_N=64, ONE_TILE=False, num_warps=4))
    quant._LAUNCH.clear()
    q2, s2 = ops.quantize_fp8_per_row(x, dtype)
    assert _same(q2, s2.reshape(-1), rq, rs)


def test_quantizer_inputs_and_error_bound(dev):
    x = torch.randn(3, 5, 70, device=dev, dtype=torch.bfloat16)[:, :, ::2]  # non-contiguous
    q, s = ops.quantize_fp8_per_row(x)
    assert q.shape == x.shape and s.shape == (3, 5, 1)
    rq, rs = quant.torch_quantize_rows(x.reshape(15, 35), E4)
    assert _same(q.reshape(15, 35), s.reshape(-1), rq, rs)
    xf = x.float()
    assert bool(((q.float() * s - xf).abs() <= xf.abs() / 16 + s * 2.0 ** -9).all())
    assert (q.float().abs().amax(-1) == 448).all()  # absmax maps to the format's max
    q1, s1 = ops.quantize_fp8_per_row(torch.randn(19, dtype=torch.float16, device=dev), E5)
    assert q1.shape == (19,) and s1.shape == (1,) and q1.dtype == E5
    with pytest.raises(TypeError, match="dtype must be torch.float8"):
        ops.quantize_fp8_per_row(x, torch.int8)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.quantize_fp8_per_row(q)
    deq = ops.dequantize_fp8(q, s, torch.bfloat16)
    assert deq.dtype == torch.bfloat16 and torch.equal(deq, (q.float() * s).bfloat16())


# -------------------------------------------------------------------------------- fast path
def test_fast_path_equals_custom_op_and_compiles():
    a, w = fp8(6, 32), fp8(10, 32)
    sa, sb, bias = torch.rand(6), torch.rand(10), torch.randn(10)

    def gemm(bias):
        return ops.fp8_matmul(a, w.t(), sa, sb, bias=bias, activation="gelu")

    def quant(x):
        return ops.quantize_fp8_per_row(x, E5)

    def linear(x):
        return ops.fp8_linear(x, w, sb, bias, activation="relu")

    x = torch.randn(4, 32)
    assert_fast_equals_custom_op(gemm, [bias], grad=False)
    assert_fast_equals_custom_op(quant, [x], grad=False)
    assert_fast_equals_custom_op(linear, [x], grad=True)  # x is quantized detached
    assert_compiles_to_custom_op(linear, [x], "quantize_fp8_per_row")
    assert_compiles_to_custom_op(gemm, [bias], "fp8_matmul")


# -------------------------------------------------------------------------------- autotune
def test_autotune_space(monkeypatch, tmp_cache):
    from tilefuse import autotune
    from tilefuse.autotune import chain
    from tilefuse.autotune.space import Limits
    from tilefuse.kernels import fp8_matmul as k

    space = autotune.get_space("fp8_matmul")
    assert "fp8_matmul" in autotune.registered_spaces()
    with monkeypatch.context() as mp:  # the GPU heuristics (tmp_cache keeps its patches)
        mp.setattr(k, "interpreter_enabled", lambda: False)
        key = dict(M=4096, N=4096, K=4096)
        ada, h100 = Limits(shared_mem=101376), Limits(shared_mem=232448)
        quick, full = space.candidates(key, ada), space.candidates(key, ada, exhaustive=True)
        assert quick[0] == space.default(key) and len(full) > len(quick) > 5
        assert len(space.candidates(key, h100, exhaustive=True)) > len(full)
        for c in full:
            assert c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] <= ada.shared_mem
            assert 4 <= c["BLOCK_M"] * c["BLOCK_N"] / (32 * c["num_warps"]) <= 128
            assert min(c["BLOCK_M"], c["BLOCK_N"]) >= 16 and c["BLOCK_K"] >= 32
        for c in space.candidates(dict(M=1, N=20, K=8), ada, exhaustive=True):
            assert c["BLOCK_M"] == 16 and c["BLOCK_N"] <= 32 and c["BLOCK_K"] == 32
        assert space.bucket(space.parse_shape("3x4000x100 fp32")) == "M=16,N=4096,K=128"
        assert space.parse_shape("3x4x5")["dtype"] == "bfloat16"
        for bad, msg in (("4x8", "MxNxK"), ("1x1x1 fp64", "output dtype"), ("0x1x1", "positive")):
            with pytest.raises(ValueError, match=msg):
                space.parse_shape(bad)
    # the problem's check rejects a wrong output; a tuned entry reaches the launcher
    pkey = dict(M=5, N=24, K=40, dtype="float32")
    problem = space.prepare(pkey, "cpu")
    out = problem.run(space.default(pkey)).clone()
    assert problem.check(out)
    out[2, 3] += 0.01 * max(1.0, out[2, 3].abs().item())
    assert not problem.check(out)
    assert str(chain.cache_path()).startswith(str(tmp_cache))  # never the real user DB
    entry = autotune.tune("fp8_matmul", pkey, exhaustive=True,
                          timer=lambda fn, cfg: (fn(), cfg["BLOCK_K"] + cfg["BLOCK_N"] / 1e3)[1])
    assert entry["failed"] == 0 and entry["tried"] >= 2
    assert entry["config"]["BLOCK_K"] == 32 and entry["default_config"]["BLOCK_K"] == 64
    chain.reset()
    assert k.get_config(7, 30, 33) == entry["config"]


def test_autotune_default_shapes_skip_gpus_without_fp8(monkeypatch):
    from tilefuse import autotune

    space = autotune.get_space("fp8_matmul")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert space.default_shapes("cuda") == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    shapes = space.default_shapes("cuda")
    assert dict(M=4096, N=4096, K=4096, dtype="bfloat16") in shapes and len(shapes) == 8
    assert len(space.default_shapes("cpu")) == 2

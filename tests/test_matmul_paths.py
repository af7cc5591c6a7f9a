"""GEMM paths (issue 19): the SM-filling small-M rule (H100 profile), split-K with its
deterministic reduction, the persistent TMA kernel in the interpreter (tensor descriptors), the
path decision and its fallback for operands TMA cannot take."""
from __future__ import annotations

import pytest
import torch

from tilefuse.activations import ACTIVATIONS, NAMES, torch_activation
from tilefuse.kernels import gemm_common as gc
from tilefuse.kernels import int8_matmul as ki
from tilefuse.kernels import matmul as km
from tilefuse.kernels.matmul_tma import WS_WARPS, gemm_tma_kernel, launch_tma, tma_params
from utils import assert_close_to_ref

H100_SMS = 132
CODES = {name: code for code, name in NAMES.items()}


@pytest.fixture
def gpu_rules(monkeypatch):
    """The launchers' GPU heuristics (the interpreter ones pick few, large tiles)."""
    monkeypatch.setattr(km, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(ki, "interpreter_enabled", lambda: False)


@pytest.fixture
def tma_on_cpu(monkeypatch):
    """The path decision treats CPU tensors as an sm_90 device (the interpreter runs TMA)."""
    monkeypatch.setattr(gc, "TMA_ON_CPU", True)


# ------------------------------------------------------------------------ SM-filling heuristic
@pytest.mark.parametrize("M", [1, 16, 64, 128, 256])
def test_small_m_grid_covers_h100(gpu_rules, M):
    for N in (768, 4096):
        for K in (768, 4096):
            cases = [km.heuristic_config(M, N, K, dt, sms=H100_SMS, tma=tma)
                     for dt in (torch.float16, torch.bfloat16, torch.float32)
                     for tma in (False, True)]
            cases += [ki.heuristic_config(M, N, K, a8, a32, sms=H100_SMS, tma=tma)
                      for a8, a32, tma in ((True, False, False), (True, False, True),
                                           (False, False, False), (False, True, False))]
            for cfg in cases:
                assert gc.grid_size(cfg, M, N) >= H100_SMS, (M, N, K, cfg)
                k_tiles = -(-K // cfg["BLOCK_K"])
                assert k_tiles >= gc.MIN_K_TILES_PER_SPLIT * cfg["SPLIT_K"], cfg
                assert cfg["BLOCK_N"] >= gc.MIN_BLOCK_N and cfg["SPLIT_K"] <= gc.MAX_SPLIT_K


def test_large_and_fp64_keep_whole_k(gpu_rules):
    big = km.heuristic_config(4096, 4096, 4096, torch.bfloat16, sms=H100_SMS, tma=True)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["SPLIT_K"]) == (128, 256, 1)
    assert km.heuristic_config(4096, 4096, 4096, torch.bfloat16, sms=H100_SMS)["BLOCK_N"] == 128
    i8 = ki.heuristic_config(4096, 4096, 4096, True, sms=H100_SMS, tma=True)
    assert (i8["BLOCK_M"], i8["BLOCK_N"], i8["BLOCK_K"], i8["SPLIT_K"]) == (128, 256, 128, 1)
    assert km.heuristic_config(16, 768, 768, torch.float64, sms=H100_SMS)["SPLIT_K"] == 1
    # a short K is not split (documented reason: < 2 K tiles per split)
    assert km.heuristic_config(1, 64, 64, torch.float16, sms=H100_SMS)["SPLIT_K"] == 1


# ------------------------------------------------------------------------ split-K (classic)
def _ref(a, b, bias=None, act="none", param=0.0, residual=None):
    z = a.double() @ b.double()
    if bias is not None:
        z = z + bias.double()
    y = torch_activation(z, act, param)
    return (y + residual.double() if residual is not None else y), z


def _cfg(**kw):
    return dict(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1),
                **kw)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_splitk_every_epilogue_fp32(act):
    M, N, K = 7, 40, 200
    param = 0.2 if act == "leaky_relu" else 0.0
    a, b = torch.randn(M, K), torch.randn(N, K).t()
    bias, res = torch.randn(N), torch.randn(N).expand(M, N)  # broadcast residual (stride 0)
    out, pre = torch.empty(M, N), torch.empty(M, N)
    km.launch_matmul(a, b, out, bias=bias, residual=res, pre=pre, activation=CODES[act],
                     act_param=param, config=_cfg(SPLIT_K=3))
    ref, z = _ref(a, b, bias, act, param, res)
    assert_close_to_ref(out, ref, name=f"{act} out")
    assert_close_to_ref(pre, z, name=f"{act} pre-activation")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_splitk_half_deterministic(dtype):
    M, N, K = 5, 33, 300
    a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
    bias, res = torch.randn(N, dtype=dtype), torch.randn(M, N, dtype=dtype)
    outs = []
    for split in (4, 4, 1):
        out = torch.empty(M, N, dtype=dtype)
        km.launch_matmul(a, b, out, bias=bias, residual=res, activation=CODES["gelu"],
                         config=_cfg(SPLIT_K=split))
        outs.append(out)
    assert torch.equal(outs[0], outs[1])  # fixed summation order: run to run identical
    ref, _ = _ref(a, b, bias, "gelu", 0.0, res)
    for out in (outs[0], outs[2]):
        assert_close_to_ref(out, ref, eager=None)


def test_linear_default_heuristic_splits_and_backprops():
    import tilefuse

    M, N, K = 3, 24, 512  # one tile on the interpreter's 4 pseudo-SMs: split K by 4
    cfg = km.heuristic_config(M, N, K, torch.float32)
    assert cfg["SPLIT_K"] == 4
    x = torch.randn(M, K, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(N, K).requires_grad_()
    b = torch.randn(N).requires_grad_()
    y = tilefuse.ops.linear(x, w, b, activation="silu")
    g = torch.randn(M, N)
    y.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = torch.nn.functional.silu(x64 @ w64.t() + b64)
    y64.backward(g.double())
    assert_close_to_ref(y, y64.detach())
    for t, t64 in ((x, x64), (w, w64), (b, b64)):
        assert_close_to_ref(t.grad, t64.grad)


def test_int8_splitk_bit_identical_to_unsplit():
    M, N, K = 6, 40, 512
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8).t()
    sa, sb = torch.rand(M) / 100, torch.rand(N) / 100  # outputs stay finite in fp16
    bias, res = torch.randn(N), torch.randn(M, N)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=8)
    raw = [ki.launch_int8_matmul(a, b, torch.empty(M, N, dtype=torch.int32),
                                 config=dict(cfg, SPLIT_K=s)) for s in (1, 4)]
    assert torch.equal(raw[0], raw[1]) and torch.equal(raw[0], (a.long() @ b.long()).int())
    full = [ki.launch_int8_matmul(a, b, torch.empty(M, N, dtype=torch.float16), sa, sb, bias, res,
                                  activation=CODES["gelu"], config=dict(cfg, SPLIT_K=s))
            for s in (1, 4)]
    assert torch.equal(full[0], full[1])  # int32 partials: the same accumulator, same epilogue
    x = torch.randn(M, K, dtype=torch.bfloat16)  # weight-only: fp32 partials
    wo = ki.launch_int8_matmul(x, b, torch.empty(M, N, dtype=torch.bfloat16), b_scale=sb,
                               config=dict(cfg, SPLIT_K=3))
    assert_close_to_ref(wo, (x.double() @ b.double()) * sb.double())


# ------------------------------------------------------------------------ persistent TMA kernel
def _aligned(rows, cols, dtype, pad=8):
    """(rows, cols) view of a wider buffer: awkward sizes, 16-byte aligned row stride."""
    buf = torch.randn(rows, cols + (-cols) % pad + pad).to(dtype)
    return buf[:, :cols]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layouts", [("row", "col"), ("row", "row"), ("col", "col")])
def test_tma_kernel_every_layout_and_epilogue(dtype, layouts):
    M, N, K = 37, 45, 53
    a = _aligned(M, K, dtype) if layouts[0] == "row" else _aligned(K, M, dtype).t()
    b = _aligned(K, N, dtype) if layouts[1] == "row" else _aligned(N, K, dtype).t()
    assert gc.operand_layout(a) == layouts[0] and gc.operand_layout(b) == layouts[1]
    bias, res = torch.randn(N, dtype=dtype), torch.randn(M, N, dtype=dtype)
    act = "gelu_tanh" if dtype == torch.float32 else "silu"
    for split in (1, 2):
        out, pre = torch.empty(M, N, dtype=dtype), torch.empty(M, N, dtype=dtype)
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, SPLIT_K=split)
        epi = dict(EPI_DTYPE=km.tl.float32, HAS_A_SCALE=False, HAS_B_SCALE=False, HAS_BIAS=True,
                   SAVE_PRE=True, ACTIVATION=CODES[act], ACT_PARAM=0.0, HAS_RESIDUAL=True)
        params = tma_params(M, N, K, *layouts, False, cfg, epi, km.tl.float32, False, "ieee",
                            dtype == torch.bfloat16, 4)
        ws = torch.empty(split, M, N) if split > 1 else None
        launch_tma(params, a, b, out, ws=ws, bias=bias, residual=res, pre=pre,
                   a_layout=layouts[0], b_layout=layouts[1])
        if split > 1:
            gc.launch_reduce(gc.reduce_params(M, N, split, epi), ws, out, None, None, bias, res,
                             pre)
        ref, z = _ref(a, b, bias, act, 0.0, res)
        assert_close_to_ref(out, ref, name=f"split={split} out")
        assert_close_to_ref(pre, z, name=f"split={split} pre")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dispatch_takes_tma_for_aligned_and_falls_back(tma_on_cpu, dtype):
    M, N = 19, 24
    bias = torch.randn(N, dtype=dtype)
    cases = {  # K=56 rows are 16-byte aligned; K=53 (and a 2-byte offset base) are not
        "tma": (torch.randn(M, 56, dtype=dtype), torch.randn(N, 56, dtype=dtype).t()),
        "stride": (torch.randn(M, 53, dtype=dtype), torch.randn(N, 53, dtype=dtype).t()),
        "base": (torch.randn(M * 56 + 1, dtype=dtype)[1:].view(M, 56),
                 torch.randn(N, 56, dtype=dtype).t()),
    }
    for name, (a, w_t) in cases.items():
        assert gc.gemm_path(a, w_t)[0] == ("tma" if name == "tma" else "classic"), name
        out = torch.empty(M, N, dtype=dtype)
        km.launch_matmul(a, w_t, out, bias=bias, activation=CODES["relu"])
        assert_close_to_ref(out, _ref(a, w_t, bias, "relu")[0], name=name)
    # unaligned C row stride (N=20 half = 40 bytes): TMA loads, masked stores
    a, w_t = cases["tma"][0], torch.randn(20, 56, dtype=dtype).t()
    out = torch.empty(M, 20, dtype=dtype)
    km.launch_matmul(a, w_t, out)
    assert_close_to_ref(out, _ref(a, w_t)[0])
    # fp32 takes TMA only with TF32 (CUDA); batched products stay on the grouped-order kernel
    assert gc.gemm_path(a.float(), w_t.float())[0] == "classic"
    assert gc.gemm_path(a.float(), w_t.float(), tf32=True)[0] == "tma"


def test_warp_spec_is_a_tuning_option(tma_on_cpu):
    """``WARP_SPEC`` (config only): the persistent loop's ``warp_specialize`` flag, launched
    with the 4 warps Triton's Hopper warp specialization needs; off in the heuristic. The
    interpreter runs the same loop (the flag is a compiler hint), so a tuned config's results
    match the reference there."""
    epi = dict(EPI_DTYPE=km.tl.float32, HAS_A_SCALE=False, HAS_B_SCALE=False, HAS_BIAS=False,
               SAVE_PRE=False, ACTIVATION=0, ACT_PARAM=0.0, HAS_RESIDUAL=False)
    cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    args = (4096, 4096, 4096, "row", "col", True)
    rest = (epi, km.tl.float32, False, "ieee", False, H100_SMS)
    _, consts, opts = tma_params(*args, cfg, *rest)
    _, consts_ws, opts_ws = tma_params(*args, dict(cfg, WARP_SPEC=True), *rest)
    names = gemm_tma_kernel.arg_names[-len(consts):]
    assert dict(zip(names, consts))["WARP_SPEC"] is False
    assert dict(zip(names, consts_ws))["WARP_SPEC"] is True
    assert opts["num_warps"] == 8 and opts_ws["num_warps"] == WS_WARPS == 4
    assert "WARP_SPEC" not in km.heuristic_config(4096, 4096, 4096, torch.bfloat16, sms=H100_SMS,
                                                  tma=True)
    M, N, K = 37, 40, 72
    a, w = torch.randn(M, K, dtype=torch.float16), torch.randn(N, K, dtype=torch.float16)
    bias = torch.randn(N, dtype=torch.float16)
    for split in (1, 2):
        out = torch.empty(M, N, dtype=torch.float16)
        km.launch_matmul(a, w.t(), out, bias=bias, activation=CODES["gelu"],
                         config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4,
                                     SPLIT_K=split, WARP_SPEC=True))
        assert_close_to_ref(out, _ref(a, w.t(), bias, "gelu")[0], name=f"split={split}")
    # the same tuned entry on operands the grouped-order kernel takes (unaligned K; TMA=0)
    a5, w5 = a[:, :69].contiguous(), w[:, :69].contiguous()
    assert gc.gemm_path(a5, w5.t())[0] == "classic"
    out = torch.empty(M, N, dtype=torch.float16)
    km.launch_matmul(a5, w5.t(), out, config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4,
                                                  WARP_SPEC=True))
    assert_close_to_ref(out, _ref(a5, w5.t())[0], name="classic")
    # ... without passing it on to the grouped-order kernels (a GPU launch rejects unknown
    # keywords; the interpreter ignores them)
    classic = ("classic", None, None)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, WARP_SPEC=True)
    kind, (_, _, opts), _, _ = km._launch_params(M, N, 69, torch.float16, 0, 0.0, False, False,
                                                 False, True, False, False, classic, False,
                                                 False, 2, a.device, cfg)
    assert kind == "classic" and "WARP_SPEC" not in opts
    kind, (_, _, opts), _, _ = ki._launch_params(M, N, K, torch.int8, True, False, False, False,
                                                 False, 0, 0.0, classic, False, a.device, cfg)
    assert kind == "classic" and "WARP_SPEC" not in opts
    qa = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    qw = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    for tma in (1, 0):
        c = torch.empty(M, N, dtype=torch.int32)
        ki.launch_int8_matmul(qa, qw.t(), c, config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32,
                                                         GROUP_M=4, WARP_SPEC=True, TMA=tma))
        assert torch.equal(c, qa.int() @ qw.int().t()), tma


def test_int8_tma_matches_classic_and_row_major_b_falls_back(tma_on_cpu, monkeypatch):
    M, N, K = 21, 48, 96
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    sa, sb, bias = torch.rand(M), torch.rand(N), torch.randn(N)
    assert gc.gemm_path(a, q.t()) == ("tma", "row", "col")          # K-major weight: fast path
    assert gc.gemm_path(a, q.t().contiguous())[0] == "classic"      # row-major (K, N): fallback
    assert gc.gemm_path(a.float(), q.t())[0] == "classic"           # weight-only: classic
    outs = {}
    for tma in (True, False):
        monkeypatch.setattr(gc, "TMA_ON_CPU", tma)
        raw = ki.launch_int8_matmul(a, q.t(), torch.empty(M, N, dtype=torch.int32))
        assert torch.equal(raw, (a.long() @ q.long().t()).int())
        outs[tma] = ki.launch_int8_matmul(a, q.t(), torch.empty(M, N, dtype=torch.bfloat16), sa,
                                          sb, bias, activation=CODES["relu6"])
    assert torch.equal(outs[True], outs[False])
    monkeypatch.setattr(gc, "TMA_ON_CPU", True)
    b_rm = q.t().contiguous()
    raw = ki.launch_int8_matmul(a, b_rm, torch.empty(M, N, dtype=torch.int32))
    assert torch.equal(raw, (a.long() @ b_rm.long()).int())


def test_info_reports_the_gemm_path(capsys):
    from tilefuse.cli import main

    assert "no TMA path" in gc.describe_path("cpu")
    assert main(["info"]) == 0
    assert "GEMM path" in capsys.readouterr().out


def test_bench_linear_cases_compare_with_cublas_layout():
    from tilefuse.bench.kernels_matmul import cases

    lin = [c for c in cases("cpu", torch.float32, "tiny") if c.name.startswith("linear/")]
    assert [c.name for c in lin] == ["linear/16x96x80"]
    ours, vendor = lin[0].fns["tilefuse"](), lin[0].fns["vendor"]()
    assert_close_to_ref(ours, vendor.double())

"""Tuning spaces of int8_matmul and layer_norm, and the CLI across families (CPU: interpreter,
stand-in timers)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilefuse import autotune
from tilefuse.autotune import chain, db as dbmod
from tilefuse.autotune.cli import default_kernels
from tilefuse.autotune.space import Limits
from tilefuse.cli import main

H100 = Limits(shared_mem=232448)
SMALL_SMEM = Limits(shared_mem=101376)



def _store(space_name, key, config):
    space, ident = autotune.get_space(space_name), autotune.current_identity()
    chain.user_db(ident).update({chain.db_key(space, ident, space.bucket(key)):
                                 {"kernel": space_name, "config": config, "time_ms": 1.0}})
    chain.reset()


def test_registered_families():
    assert {"matmul", "int8_matmul", "layer_norm"} <= set(autotune.registered_spaces())
    assert default_kernels()[0] == "matmul"


# ------------------------------------------------------------------------------------ int8
@pytest.fixture
def gpu_heuristics(monkeypatch):
    """The launchers' GPU heuristics (the interpreter ones pick few, large tiles)."""
    import tilefuse.kernels.int8_matmul as ki
    import tilefuse.kernels.norm as kn

    monkeypatch.setattr(ki, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(kn, "interpreter_enabled", lambda: False)


def test_int8_pruning(gpu_heuristics):
    space = autotune.get_space("int8_matmul")
    for mode, a_elem in (("w8a8", 1), ("w8a16", 2), ("w8a32", 4)):
        key = dict(M=4096, N=4096, K=4096, mode=mode)
        quick = space.candidates(key, SMALL_SMEM)
        full = space.candidates(key, SMALL_SMEM, exhaustive=True)
        assert quick[0] == space.default(key) and len(full) > len(quick) > 5
        for c in full:
            smem = c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] * a_elem
                                      + c["BLOCK_K"] * c["BLOCK_N"])
            smem += 0 if mode == "w8a8" else c["BLOCK_K"] * c["BLOCK_N"] * a_elem
            assert smem <= SMALL_SMEM.shared_mem
            assert 4 <= c["BLOCK_M"] * c["BLOCK_N"] / (32 * c["num_warps"]) <= 128
            assert min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16
            assert c["BLOCK_K"] >= 32 if mode == "w8a8" else True
            assert c["BLOCK_K"] <= 32 if mode == "w8a32" else True
        assert len(space.candidates(key, H100, exhaustive=True)) > len(full)
    # shape: decode rows / a short K never get bigger blocks than the bucket; int8 K >= 32
    for c in space.candidates(dict(M=1, N=20, K=8, mode="w8a8"), SMALL_SMEM, exhaustive=True):
        assert c["BLOCK_M"] == 16 and c["BLOCK_N"] <= 32 and c["BLOCK_K"] == 32
    interp = space.candidates(dict(M=4096, N=4096, K=4096, mode="w8a16"), Limits(interpreter=True))
    assert {(c["num_warps"], c["num_stages"]) for c in interp} == {(4, 1)}
    assert len({tuple(c.values()) for c in interp}) == len(interp)


def test_int8_bucket_modes_and_parsing():
    from tilefuse.kernels.int8_matmul import get_config

    space = autotune.get_space("int8_matmul")
    # what get_config passes (no dtype) and what the CLI parses land in the same bucket
    assert space.bucket(dict(M=1, N=4000, K=4096, mode="w8a16")) == "M=16,N=4096,K=4096,w8a16"
    assert space.bucket(space.parse_shape("16x4096x4096 w8a16")) == "M=16,N=4096,K=4096,w8a16"
    assert space.bucket(dict(M=3, N=3, K=3, mode="w8a8")) == "M=16,N=16,K=32,w8a8"
    assert space.parse_shape({"shape": "4x8x16", "dtype": "int32"})["mode"] == "w8a8"
    assert space.parse_shape({"shape": "4x8x16", "dtype": "fp32"})["mode"] == "w8a32"
    assert space.parse_shape({"shape": "4x8x16", "mode": "w8a32", "dtype": "bf16"}) == dict(
        M=4, N=8, K=16, mode="w8a16", dtype="bfloat16")  # weight-only follows A's dtype
    assert space.parse_shape({"shape": "4x8x16", "mode": "w8a8", "dtype": "bf16"})["mode"] == "w8a8"
    for bad, msg in (("4x8", "MxNxK"), ("4x8x8 w8a8 fp16", "MxNxK"), ({"shape": "1x1x1", "mode": "w4a16"}, "mode"),
                     ({"shape": "1x1x1", "mode": "w8a16", "dtype": "int32"}, "needs mode w8a8"),
                     ({"shape": "1x1x1", "dtype": "fp64"}, "dtype")):
        with pytest.raises(ValueError, match=msg):
            space.parse_shape(bad)
    assert get_config(5, 7, 9, True) == space.default(dict(M=5, N=7, K=9, mode="w8a8"))


@pytest.mark.parametrize("mode,dtype", [("w8a8", "int32"), ("w8a8", "float16"),
                                        ("w8a16", "bfloat16"), ("w8a32", "float32")])
def test_int8_problem_checks_reject_wrong_outputs(mode, dtype):
    space = autotune.get_space("int8_matmul")
    key = dict(M=5, N=24, K=40, mode=mode, dtype=dtype)
    problem = space.prepare(key, "cpu")
    out = problem.run(space.default(key)).clone()
    assert problem.check(out)
    out[2, 3] += 1 if dtype == "int32" else 0.05 * max(1.0, out[2, 3].abs().item())
    assert not problem.check(out)


def test_int8_tune_then_launch_uses_the_entry(tmp_cache):
    from tilefuse.kernels.int8_matmul import get_config

    def wide_n_wins(fn, cfg):  # stand-in timer; the kernel really runs
        fn()
        return -cfg["BLOCK_N"] + cfg["BLOCK_M"] / 1e3

    entry = autotune.tune("int8_matmul", dict(M=5, N=40, K=40, mode="w8a16", dtype="float16"),
                          timer=wide_n_wins)
    assert entry["failed"] == 0 and entry["tried"] >= 2
    # the default narrows N to fill the interpreter's 4 pseudo-SMs (gemm_common.fill_sms)
    assert entry["config"]["BLOCK_N"] == 64 and entry["default_config"]["BLOCK_N"] == 32
    chain.reset()
    assert get_config(9, 33, 50, False) == entry["config"]        # same bucket (w8a16)
    assert get_config(9, 33, 50, True) != entry["config"]         # w8a8: another bucket
    assert get_config(9, 33, 50, False, True) != entry["config"]  # w8a32
    # the launcher (config=None: goes through lookup) stays correct with the tuned tiles
    from tilefuse.kernels.int8_matmul import launch_int8_matmul

    x, q = torch.randn(9, 50).half(), torch.randint(-127, 128, (33, 50), dtype=torch.int8)
    scale = torch.rand(33) / 100
    out = launch_int8_matmul(x, q.t(), torch.empty(9, 33, dtype=torch.float16), b_scale=scale)
    ref = (x.double() @ q.double().t()) * scale.double()
    assert (out.double() - ref).abs().max() <= 2e-3 * ref.abs().max() + 1e-3


# ------------------------------------------------------------------------------------ norms
def test_norm_pruning(gpu_heuristics, monkeypatch):
    space = autotune.get_space("layer_norm")
    gpu = Limits(shared_mem=232448)
    for N in (768, 4096, 8192, 20000, 50000):
        key = dict(M=16384, N=N, dtype="bfloat16", rms=False)
        quick = space.candidates(key, gpu)
        full = space.candidates(key, gpu, exhaustive=True)
        assert quick[0] == space.default(key) and len(full) > len(quick) >= 4
        import tilefuse.kernels.norm as kn

        cap = min(autotune.next_pow2(N), kn.MAX_BLOCK)
        for c in full:
            assert c["BLOCK_N"] <= cap and c["BLOCK_N"] & (c["BLOCK_N"] - 1) == 0
            if c["BLOCK_N"] >= N:  # packed rows up to 16K elements; one row up to MAX_BLOCK
                assert c["BLOCK_M"] == 1 or c["BLOCK_M"] * c["BLOCK_N"] <= 16384
            else:
                assert c["BLOCK_M"] == 1 and c["BLOCK_N"] >= 256  # looping path: one row each
            assert 1 <= c["BLOCK_M"] * c["BLOCK_N"] / (32 * c["num_warps"]) <= 64
        assert any(c["BLOCK_N"] < N for c in quick)  # the looping path is always tried
    small = space.candidates(dict(M=3, N=40, dtype="float32"), gpu, exhaustive=True)
    assert all(c["BLOCK_M"] <= 4 and c["BLOCK_N"] <= 64 for c in small)
    interp = space.candidates(dict(M=64, N=300, dtype="float32"), Limits(interpreter=True))
    assert {c["num_warps"] for c in interp} == {4} and len(interp) > 2
    import tilefuse.kernels.norm as kn

    monkeypatch.setattr(kn, "MAX_BLOCK", 64)  # the module's register cap bounds the space
    assert max(c["BLOCK_N"] for c in space.candidates(dict(M=8, N=300, dtype="float32"), gpu,
                                                       exhaustive=True)) == 64


def test_norm_bucket_parsing_and_validation():
    space = autotune.get_space("layer_norm")
    key = space.parse_shape({"shape": "4096x768", "dtype": "bf16", "norm": "rms"})
    assert key == dict(M=4096, N=768, dtype="bfloat16", rms=True)
    assert space.bucket(key) == "M=4096,N=1024,bfloat16,rms"
    assert space.bucket(dict(M=3000, N=1000, dtype="bfloat16", rms=True)) == space.bucket(key)
    assert space.bucket(dict(M=4096, N=768, dtype="float16", rms=False)).endswith("float16,ln")
    for bad in ("4096", {"M": 0, "N": 3}, {"shape": "2x2", "norm": "batch"},
                {"shape": "2x2", "dtype": "fp64"}):
        with pytest.raises(ValueError, match="layer_norm|not tunable"):
            space.parse_shape(bad)
    assert space.validate(dict(BLOCK_M=4, BLOCK_N=256, num_warps=4))
    assert not space.validate(dict(BLOCK_M=3, BLOCK_N=256, num_warps=4))      # tl.arange: 2^k
    assert not space.validate(dict(BLOCK_M=1, BLOCK_N=256))


@pytest.mark.parametrize("rms", [False, True])
def test_norm_problem_checks_reject_wrong_outputs(rms):
    space = autotune.get_space("layer_norm")
    key = dict(M=6, N=40, dtype="float16", rms=rms)
    problem = space.prepare(key, "cpu")
    y, mean, rstd = (t.clone() if t is not None else None
                     for t in problem.run(dict(BLOCK_M=2, BLOCK_N=64, num_warps=4)))
    assert problem.check((y, mean, rstd))
    assert problem.check(problem.run(dict(BLOCK_M=1, BLOCK_N=16, num_warps=4)))  # looping
    bad = y.clone()
    bad[1, 2] += 0.05
    assert not problem.check((bad, mean, rstd))
    assert not problem.check((y, mean, rstd * 1.001))


def _ln_ref(x, w, b, rms):
    if rms:
        return F.rms_norm(x.double(), (x.shape[1],), w.double(), 1e-5)
    return F.layer_norm(x.double(), (x.shape[1],), w.double(), b.double(), 1e-5)


def test_norm_tune_then_launch_uses_the_entry(tmp_cache):
    from tilefuse.kernels.norm import get_fwd_config, launch_norm_fwd

    def small_blocks_win(fn, cfg):  # stand-in timer: the looping path wins
        fn()
        return cfg["BLOCK_N"] * cfg["BLOCK_M"]

    entry = autotune.tune("layer_norm", dict(M=12, N=300, dtype="float32", rms=True),
                          timer=small_blocks_win)
    assert entry["failed"] == 0 and entry["config"] == dict(BLOCK_M=1, BLOCK_N=256, num_warps=4)
    assert entry["default_config"]["BLOCK_N"] == 512
    chain.reset()
    assert get_fwd_config(16, 400, torch.float32, True) == entry["config"]   # same bucket
    assert get_fwd_config(16, 400, torch.float32, False) != entry["config"]  # LayerNorm
    assert get_fwd_config(16, 400, torch.float16, True) != entry["config"]   # dtype
    x, w = torch.randn(16, 400) + 2, torch.randn(400)
    y, rstd = torch.empty(16, 400), torch.empty(16)
    launch_norm_fwd(x, None, w, None, y, None, rstd, 1e-5, True, 0, 0.0)  # via lookup
    assert (y.double() - _ln_ref(x, w, None, True)).abs().max() < 1e-4


def test_norm_stored_config_is_safe_for_any_width_of_its_bucket(tmp_cache):
    """A stored BLOCK_M > 1 with a BLOCK_N narrower than the row runs the looping path with one
    row per program; a BLOCK_N wider than the row is clamped."""
    from tilefuse.kernels.norm import launch_norm_fwd

    for cfg, N in ((dict(BLOCK_M=4, BLOCK_N=32, num_warps=4), 100),
                   (dict(BLOCK_M=2, BLOCK_N=128, num_warps=2), 70)):
        _store("layer_norm", dict(M=7, N=N, dtype="float32", rms=False), cfg)
        x, w, b = torch.randn(7, N) * 3 + 5, torch.randn(N), torch.randn(N)
        y, mean, rstd = torch.empty(7, N), torch.empty(7), torch.empty(7)
        launch_norm_fwd(x, None, w, b, y, mean, rstd, 1e-5, False, 0, 0.0)
        assert (y.double() - _ln_ref(x, w, b, False)).abs().max() < 1e-4
        assert (mean.double() - x.double().mean(1)).abs().max() < 1e-5


# ------------------------------------------------------------------------------------ CLI
def test_cli_unknown_kernels_are_named(tmp_cache, capsys):
    assert main(["autotune", "--kernels", "layer_norm,foo,matmull", "--timer", "model"]) == 2
    err = capsys.readouterr().err
    assert "'foo'" in err and "'matmull' (did you mean 'matmul'?)" in err
    assert "registered tuning spaces: " in err and "int8_matmul, layer_norm, matmul" in err
    assert not autotune.cache_path().exists()


def test_cli_new_families_default_shapes_and_budget(tmp_cache, capsys):
    argv = ["autotune", "--kernels", "int8_matmul,layer_norm", "--timer", "model",
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "16x32x64 w8a8 int32" in out and "5x20x40 w8a16 float16" in out
    assert "8x48 float32 ln" in out and "5x100 float32 rms" in out
    assert not [line for line in out.splitlines() if line.startswith("matmul ")]
    kernels = {e["kernel"] for e in dbmod.TuningDB(autotune.cache_path()).entries().values()}
    assert kernels == {"int8_matmul", "layer_norm"}
    # no --kernels: every family; the total budget stops after the first tuned problem
    assert main(["autotune", "--timer", "model", "--no-progress", "--budget-s", "1e-9"]) == 0
    out = capsys.readouterr().out
    assert out.count("(cached)") == 5 and "skipped (budget)" in out
    assert "problems not tuned: --budget-s" in out
    rows = [line.split()[0] for line in out.splitlines() if "tuned (" in line]
    assert rows == ["matmul"]
    # shapes file with the new families; --dtype applies where the family takes it
    shapes = tmp_cache / "s.txt"
    shapes.write_text("layer_norm 64x300\nint8_matmul 8x16x64 w8a8\n")
    assert main(["autotune", "--shapes", str(shapes), "--dtype", "fp16,fp64", "--timer", "model",
                 "--no-progress", "--max-configs", "2"]) == 0
    captured = capsys.readouterr()
    assert "64x300 float16 ln" in captured.out and "8x16x64 w8a8 float16" in captured.out
    assert "skipping layer_norm fp64" in captured.err


def test_no_family_tunes_on_first_use_by_default(monkeypatch):
    """Issue 15 item 5: the request path never tunes unless opted in (TILEFUSE_AUTOTUNE=1 or
    tune_on_first_use(True)); matmul used to tune on CUDA by default."""
    from tilefuse.autotune import chain
    from tilefuse.autotune.identity import DeviceIdentity

    h200 = DeviceIdentity("NVIDIA H200", "9.0", "3.6.0")
    monkeypatch.setattr(DeviceIdentity, "is_cuda", property(lambda self: True))
    monkeypatch.delenv("TILEFUSE_AUTOTUNE", raising=False)
    for family in ("matmul", "layer_norm", "int8_matmul"):
        assert not chain.autotune_enabled(h200, autotune.get_space(family))
    monkeypatch.setenv("TILEFUSE_AUTOTUNE", "1")
    for family in ("matmul", "layer_norm", "int8_matmul"):
        assert chain.autotune_enabled(h200, autotune.get_space(family))


@pytest.mark.parametrize("space_name,key", [
    ("matmul", dict(M=4096, N=4096, K=4096, dtype="bfloat16", tma=True)),
    ("int8_matmul", dict(M=4096, N=4096, K=4096, mode="w8a8", tma=True)),
])
def test_tma_keys_offer_the_warp_specialized_variant(gpu_heuristics, space_name, key):
    """Issue 19 item 4: a tuning run on an sm_90 GPU can choose the persistent TMA kernel's
    warp-specialized loop (WARP_SPEC); its accumulator lives in two consumer warp groups, so
    the register rule counts 8 warps. Keys without TMA never get it."""
    space = autotune.get_space(space_name)
    cands = space.candidates(key, H100)
    ws = [c for c in cands if c.get("WARP_SPEC")]
    assert ws and all(c["TMA"] == 1 and c["SPLIT_K"] == 1 for c in ws)
    assert any(c["BLOCK_M"] * c["BLOCK_N"] >= 128 * 128 for c in ws)
    plain = dict(key, tma=False)
    assert not any(c.get("WARP_SPEC") for c in space.candidates(plain, H100))


def test_warp_spec_entry_reaches_the_tma_launch():
    """A tuned entry with WARP_SPEC launches the persistent kernel warp-specialized, with the
    warp count Triton's Hopper pass needs; without it the tile's own warps."""
    import triton.language as tl

    from tilefuse.kernels import matmul_tma

    cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    epi = dict(EPI_DTYPE=tl.float32, HAS_A_SCALE=False, HAS_B_SCALE=False, HAS_BIAS=False,
               SAVE_PRE=False, ACTIVATION=0, ACT_PARAM=0.0, HAS_RESIDUAL=False)
    args = (4096, 4096, 4096, "row", "col", True)
    rest = (epi, tl.float32, False, "ieee", False, 132)
    _, _, opts = matmul_tma.tma_params(*args, dict(cfg, WARP_SPEC=1), *rest)
    _, _, plain = matmul_tma.tma_params(*args, cfg, *rest)
    assert opts["num_warps"] == matmul_tma.WS_WARPS and plain["num_warps"] == 8

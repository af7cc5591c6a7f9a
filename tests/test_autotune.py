"""Tuning DB, lookup chain and the tuning loop (CPU: Triton interpreter + instant timers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from tilefuse import autotune
from tilefuse.autotune import chain, db as dbmod
from tilefuse.autotune.identity import DeviceIdentity
from tilefuse.autotune.space import KernelSpace, Limits, Problem, register_space, _REGISTRY
from tilefuse.autotune.tuner import tune

from utils import assert_close_to_ref



class FakeSpace(KernelSpace):
    """A kernel-free space: configs {"BLOCK": b}; 'time' is given by ``costs``."""
    name = "fake"
    required = ("BLOCK",)

    def __init__(self, costs=None, bad=()):
        self.costs = costs or {16: 3.0, 32: 1.0, 64: 2.0}
        self.bad = set(bad)
        self.prepared = 0

    def sources(self):
        return ("def fake_kernel(): pass",)

    def bucket(self, key):
        return f"n={autotune.next_pow2(key['n'])}"

    def default(self, key):
        return {"BLOCK": 16}

    def candidates(self, key, limits, exhaustive=False):
        return [{"BLOCK": b} for b in self.costs]

    def prepare(self, key, device):
        self.prepared += 1

        def run(cfg):
            if cfg["BLOCK"] in self.bad:
                raise RuntimeError("out of resources")
            return cfg["BLOCK"]
        return Problem(run=run, check=lambda out: out != 64 or 64 not in self.bad)


@pytest.fixture
def fake(tmp_cache):
    space = register_space(FakeSpace())
    yield space
    _REGISTRY.pop("fake", None)


def _timer(space):
    return lambda fn, cfg: space.costs[fn()]


def _entry(cfg, ms=1.0):
    return {"kernel": "fake", "bucket": "n=8", "config": cfg, "time_ms": ms}


# ------------------------------------------------------------------------------------ DB file
def test_db_round_trip_merge_and_export(tmp_path):
    db = dbmod.TuningDB(tmp_path / "d" / "gpu.json", device={"name": "x"})
    assert db.entries() == {}
    assert db.update({"k1": _entry({"BLOCK": 16}, 2.0), "k2": _entry({"BLOCK": 32})})
    again = dbmod.TuningDB(tmp_path / "d" / "gpu.json")
    assert again.get("k1")["config"] == {"BLOCK": 16} and len(again) == 2
    # merge-on-write keeps the faster entry unless replace=True
    db.update({"k1": _entry({"BLOCK": 64}, 5.0)})
    assert again.get("k1")["config"] == {"BLOCK": 16}
    db.update({"k1": _entry({"BLOCK": 64}, 1.5)})
    assert again.get("k1")["config"] == {"BLOCK": 64}
    data = json.loads((tmp_path / "d" / "gpu.json").read_text())
    assert data["format"] == dbmod.FORMAT and data["device"] == {"name": "x"}
    assert not [p for p in os.listdir(tmp_path / "d") if p.startswith(".tmp-")]
    assert db.export(tmp_path / "table.json") == 2
    table = dbmod.TuningDB(tmp_path / "table.json", read_only=True)
    assert table.get("k2")["config"] == {"BLOCK": 32}
    with pytest.raises(PermissionError):
        table.update({"k": _entry({})})
    assert db.clear() and db.entries() == {} and not db.clear()


_WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tfdb", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
db = mod.TuningDB(sys.argv[2])
for i in range(30):
    assert db.update({f"{sys.argv[3]}-{i}": {"config": {"BLOCK": i + 1}, "time_ms": 1.0}})
"""


def test_concurrent_writers_keep_every_entry(tmp_path):
    path = tmp_path / "gpu.json"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, dbmod.__file__, str(path), tag])
             for tag in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    entries = dbmod.TuningDB(path).entries()
    assert len(entries) == 60
    assert entries["a-29"]["config"] == {"BLOCK": 30} and entries["b-0"]["config"] == {"BLOCK": 1}


@pytest.mark.parametrize("content", ["{not json", '{"format": 999, "kind": "tilefuse-autotune", '
                                     '"entries": {}}', "[1, 2]",
                                     b"\xff\xfe\x00\x80 binary junk \xc3\x28" * 40])
def test_corrupt_or_foreign_db_is_ignored_then_rebuilt(tmp_path, monkeypatch, content):
    # binary junk (not UTF-8) used to raise UnicodeDecodeError out of the reader (issue 14 item 3)
    monkeypatch.setattr(dbmod, "_warned", set())
    path = tmp_path / "gpu.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    db = dbmod.TuningDB(path)
    with pytest.warns(RuntimeWarning, match="ignoring unusable database"):
        assert db.entries() == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per file
        assert dbmod.TuningDB(path).entries() == {}
        assert db.update({"k": _entry({"BLOCK": 16})})
    assert dbmod.TuningDB(path).get("k")["config"] == {"BLOCK": 16}


def test_unwritable_db_warns_and_does_not_raise(tmp_path, monkeypatch):
    monkeypatch.setattr(dbmod, "_warned", set())
    (tmp_path / "file").write_text("x")
    db = dbmod.TuningDB(tmp_path / "file" / "sub" / "gpu.json")  # parent is a file
    with pytest.warns(RuntimeWarning, match="could not write"):
        assert db.update({"k": _entry({"BLOCK": 16})}) is False


# ------------------------------------------------------------------------------------ keys
def test_key_changes_with_source_triton_gpu_and_bucket(fake):
    ident = DeviceIdentity("NVIDIA H200", "9.0", "3.6.0")
    base = chain.db_key(fake, ident, "n=8")
    for part in ("fake", "NVIDIA H200", "sm=9.0", "triton=3.6.0", "n=8", "src="):
        assert part in base
    assert chain.db_key(fake, DeviceIdentity("NVIDIA H200", "9.0", "3.9.0"), "n=8") != base
    assert chain.db_key(fake, DeviceIdentity("NVIDIA H100", "9.0", "3.6.0"), "n=8") != base
    assert chain.db_key(fake, ident, "n=16") != base
    fake.sources = lambda: ("def fake_kernel(): return 1",)
    chain.reset()  # drops the memoised source hash
    assert chain.db_key(fake, ident, "n=8") != base
    assert DeviceIdentity("NVIDIA H200 (SXM)", "9.0", "x").slug == "nvidia-h200-sxm"


def test_matmul_key_tracks_kernel_source():
    from tilefuse.kernels import gemm_common, matmul

    space = autotune.get_space("matmul")
    h = autotune.source_hash(*space.sources())
    # the kernel and the shared jit helpers it calls for its tile and split-K range
    assert h == autotune.source_hash(matmul.matmul_kernel, gemm_common.tile_offsets,
                                     gemm_common.k_tile_range, __import__(
                                         "tilefuse.kernels.activations", fromlist=["x"]))
    assert autotune.source_hash(matmul.matmul_kernel) != autotune.source_hash(matmul.launch_matmul)


# ------------------------------------------------------------------------------------ lookup chain
def test_lookup_order_memory_user_shipped_default(fake, monkeypatch):
    monkeypatch.setenv("TILEFUSE_AUTOTUNE", "0")
    ident = autotune.current_identity()
    assert ident.name == "triton-interpreter"
    default = {"BLOCK": 999}
    assert autotune.lookup("fake", {"n": 5}, default) is default  # nothing stored
    key = chain.db_key(fake, ident, "n=8")
    table = chain.TABLES_DIR / f"{ident.slug}.json"
    dbmod.TuningDB(table).update({key: _entry({"BLOCK": 32})})
    chain.reset()
    assert autotune.lookup("fake", {"n": 7}, default) == {"BLOCK": 32}       # shipped table
    chain.user_db(ident).update({key: _entry({"BLOCK": 64})})
    chain.reset()
    assert autotune.lookup("fake", {"n": 8}, default) == {"BLOCK": 64}       # user DB first
    chain.user_db(ident).update({key: _entry({"BLOCK": 128}, 0.1)})
    assert autotune.lookup("fake", {"n": 6}, default) == {"BLOCK": 128}  # own write: caches dropped
    # another process's write (the file replaced behind this one's back): memory first until reset
    path = chain.cache_path(ident)
    data = json.loads(path.read_text())
    data["entries"][key]["config"] = {"BLOCK": 256}
    path.write_text(json.dumps(data))
    assert autotune.lookup("fake", {"n": 6}, default) == {"BLOCK": 128}
    chain.reset()
    assert autotune.lookup("fake", {"n": 6}, default) == {"BLOCK": 256}
    # an unusable stored config is skipped, falling through to the shipped table
    chain.user_db(ident).update({key: _entry({"BLOCK": "big"}, 0.01)}, replace=True)
    chain.reset()
    assert autotune.lookup("fake", {"n": 6}, default) == {"BLOCK": 32}
    assert autotune.lookup("no_such_kernel", {"n": 6}, default) is default
    assert fake.prepared == 0


def test_autotune_env_controls_tuning(fake, monkeypatch):
    default = {"BLOCK": 16}
    assert not chain.autotune_enabled(autotune.current_identity())  # off in the interpreter
    assert autotune.lookup("fake", {"n": 3}, default) == default and fake.prepared == 0
    monkeypatch.setenv("TILEFUSE_AUTOTUNE", "0")
    assert not chain.autotune_enabled(DeviceIdentity("NVIDIA H200", "9.0", "3.6.0"))
    assert chain.autotune_enabled(DeviceIdentity("NVIDIA H200", "9.0", "3.6.0")) is False
    monkeypatch.setenv("TILEFUSE_AUTOTUNE", "1")
    monkeypatch.setattr(chain, "on_demand_timer", _timer(fake))
    chain.reset()
    with pytest.warns(RuntimeWarning, match="autotuning fake"):
        assert autotune.lookup("fake", {"n": 3}, default) == {"BLOCK": 32}  # tuned now
    assert fake.prepared == 1
    # a "second process": fresh memory, the tuned entry comes from the user DB, no tuning
    chain.reset()
    assert autotune.lookup("fake", {"n": 4}, default) == {"BLOCK": 32} and fake.prepared == 1
    entry = chain.user_db().get(chain.db_key(fake, autotune.current_identity(), "n=4"))
    assert entry["default_config"] == default and entry["tried"] == 3


def test_tune_on_first_use_is_opt_in(fake, monkeypatch):
    """Issue 15 item 5: a first call with a new shape never tunes by default, even on a GPU and
    for a space that asks for it; TILEFUSE_AUTOTUNE=1 or tune_on_first_use(True) opt in."""
    h200 = DeviceIdentity("NVIDIA H200", "9.0", "3.6.0")
    monkeypatch.setattr(chain, "current_identity", lambda device=None: h200)
    monkeypatch.setattr(chain, "_first_use", None)  # restored after the test
    fake.tune_on_first_use = True  # what made matmul tune inside the first call before
    default = {"BLOCK": 16}
    assert autotune.lookup("fake", {"n": 3}, default) == default and fake.prepared == 0
    # opt in through the API (this identity is a stand-in: tune on the interpreter's)
    monkeypatch.setattr(chain, "current_identity", lambda device=None: DeviceIdentity(
        "triton-interpreter", "-", h200.triton))
    monkeypatch.setattr(chain, "on_demand_timer", "model")  # a timer name works here too
    assert autotune.tune_on_first_use() is None
    assert autotune.tune_on_first_use(True) is None
    with pytest.warns(RuntimeWarning, match="autotuning fake"):
        assert autotune.lookup("fake", {"n": 3}, default) == {"BLOCK": 64}  # model: largest wins
    assert fake.prepared == 1
    # the API wins over the environment, None hands the choice back to it
    monkeypatch.setenv("TILEFUSE_AUTOTUNE", "1")
    assert autotune.tune_on_first_use(False) is True
    assert autotune.lookup("fake", {"n": 100}, default) == default and fake.prepared == 1
    assert autotune.tune_on_first_use(None) is False
    assert chain.autotune_enabled(autotune.current_identity())
    with pytest.raises(TypeError, match="tune_on_first_use"):
        autotune.tune_on_first_use("yes")


def test_lookup_hot_path_reads_no_file(fake, monkeypatch):
    """Repeated lookups of one key are one dict probe: the DB is read once, not per launch."""
    ident = autotune.current_identity()
    chain.user_db(ident).update({chain.db_key(fake, ident, "n=8"): _entry({"BLOCK": 32})})
    reads = []
    real = dbmod.TuningDB.entries
    monkeypatch.setattr(dbmod.TuningDB, "entries", lambda self: reads.append(1) or real(self))
    for _ in range(200):
        assert autotune.lookup("fake", {"n": 7}, {"BLOCK": 16}) == {"BLOCK": 32}
    assert len(reads) == 1  # the user DB answered the first lookup; the rest hit memory
    cfg = autotune.lookup("fake", {"n": 7}, {"BLOCK": 16})
    cfg["BLOCK"] = -1  # callers get a copy: the cache cannot be corrupted
    assert autotune.lookup("fake", {"n": 7}, {"BLOCK": 16}) == {"BLOCK": 32}


def test_tune_accepts_timer_names_rejects_non_callables(fake):
    """Issue 14 item 4: timer="model" was "not callable" for every candidate, caught as a failed
    config, so tune() returned None and stored nothing."""
    entry = autotune.tune("fake", {"n": 8}, timer="model")
    assert entry is not None and entry["timer"] == "model" and entry["failed"] == 0
    assert chain.user_db().get(chain.db_key(fake, autotune.current_identity(), "n=8"))
    with pytest.raises(TypeError, match="timer must be a name"):
        autotune.tune("fake", {"n": 8}, timer=42)
    with pytest.raises(ValueError, match="unknown timer 'sundial'"):
        autotune.tune("fake", {"n": 8}, timer="sundial")


def test_tune_matmul_with_timer_name_stores_an_entry(tmp_cache):
    entry = autotune.tune("matmul", dict(M=64, N=64, K=64, dtype="fp32"), timer="model",
                          max_configs=2)
    assert entry is not None and entry["timer"] == "model" and len(chain.user_db()) == 1


def test_lookup_never_raises(fake, monkeypatch):
    def boom(key):
        raise KeyError("n")
    monkeypatch.setattr(fake, "bucket", boom)
    with pytest.warns(RuntimeWarning, match="lookup for fake failed"):
        assert autotune.lookup("fake", {}, {"BLOCK": 16}) == {"BLOCK": 16}


# ------------------------------------------------------------------------------------ tuner
def test_tuner_picks_fastest_and_rejects_broken_configs(fake):
    fake.costs = {16: 3.0, 32: 1.0, 64: 0.5, 128: 0.1}
    fake.bad = {64, 128}  # 128 raises, 64 "computes a wrong result"
    ident = autotune.current_identity()
    calls = []
    entry = tune(fake, {"n": 8}, identity=ident, timer=lambda fn, cfg: calls.append(cfg) or
                 fake.costs[fn()], progress=lambda i, n: None)
    assert entry["config"] == {"BLOCK": 32} and entry["time_ms"] == 1.0
    assert entry["default_time_ms"] == 3.0 and entry["failed"] == 2
    assert entry["runner_up"] == [{"config": {"BLOCK": 16}, "time_ms": 3.0}]
    assert {"BLOCK": 128} not in calls
    fake.bad = set(fake.costs)
    assert tune(fake, {"n": 8}, identity=ident, timer=_timer(fake)) is None
    fake.bad = set()
    entry = tune(fake, {"n": 8}, identity=ident, timer=_timer(fake), max_configs=2)
    assert entry["tried"] == 2


def test_tune_real_matmul_in_interpreter_then_launch_uses_it(tmp_cache):
    from tilefuse.kernels.matmul import get_config

    def small_tiles_win(fn, cfg):  # a deterministic stand-in timer; the kernel really runs
        fn()
        return cfg["BLOCK_M"] * cfg["BLOCK_N"] * cfg["BLOCK_K"] / 1e3

    entry = autotune.tune("matmul", dict(M=33, N=17, K=29, dtype="float32"), timer=small_tiles_win)
    assert entry["failed"] == 0 and entry["tried"] >= 2
    assert entry["config"]["BLOCK_M"] == 16
    assert entry["config"] != entry["default_config"] and entry["default_time_ms"] > entry["time_ms"]
    chain.reset()  # a new process: the config comes from the DB
    assert get_config(33, 17, 29, torch.float32, (0, False, False)) == entry["config"]
    assert get_config(40, 30, 20, torch.float32, (0, False, False)) == entry["config"]  # bucket
    assert get_config(33, 17, 29, torch.float32, (1, True, False)) != entry["config"]   # flags
    assert get_config(33, 17, 29, torch.float64, (0, False, False)) != entry["config"]  # dtype
    assert len(chain.user_db()) == 1


def test_stored_config_drives_ops_and_stays_correct(tmp_cache):
    space = autotune.get_space("matmul")
    ident = autotune.current_identity()
    odd = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
    key = dict(M=37, N=19, K=23, dtype="float32", flags=(4, True, False))
    chain.user_db(ident).update({chain.db_key(space, ident, space.bucket(key)):
                                 {"kernel": "matmul", "config": odd, "time_ms": 1.0}})
    from tilefuse.kernels.matmul import get_config, launch_matmul

    assert get_config(37, 19, 23, torch.float32, (4, True, False)) == odd
    a, w, b = torch.randn(37, 23), torch.randn(19, 23), torch.randn(19)
    y = torch.empty(1, 37, 19)
    launch_matmul(a[None], w.T[None], y, bias=b, activation=4)  # config=None: goes via lookup
    ref = torch.nn.functional.gelu(a.double() @ w.double().T + b.double())
    eager = torch.nn.functional.gelu(a @ w.T + b)
    assert_close_to_ref(y[0], ref, eager)


# ------------------------------------------------------------------------------------ pruning
def test_matmul_pruning():
    space = autotune.get_space("matmul")
    big = dict(M=4096, N=4096, K=4096, dtype="float16")
    gpu = Limits(shared_mem=101376)
    quick = space.candidates(big, gpu)
    full = space.candidates(big, gpu, exhaustive=True)
    assert quick[0] == space.default(big)
    assert len(full) > len(quick) > 5
    for c in full:
        smem = c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * 2
        assert smem <= gpu.shared_mem
        assert 4 <= c["BLOCK_M"] * c["BLOCK_N"] / (32 * c["num_warps"]) <= 128
    assert len(space.candidates(big, Limits(shared_mem=232448), True)) > len(full)
    # shape: never a block bigger than the (power-of-two) problem; equivalent GROUP_M collapse
    small = dict(M=5, N=20, K=3, dtype="float32")
    for c in space.candidates(small, gpu, exhaustive=True):
        assert c["BLOCK_M"] == 16 and c["BLOCK_N"] <= 32 and c["BLOCK_K"] <= 16
    cands = space.candidates(small, gpu, exhaustive=True)
    assert len({tuple(v for k, v in c.items() if k != "GROUP_M") for c in cands}) == len(cands)
    # the interpreter ignores warps/stages: they collapse
    interp = space.candidates(big, Limits(interpreter=True))
    assert {(c["num_warps"], c["num_stages"]) for c in interp} == {(4, 1)}
    assert len({tuple(c.values()) for c in interp}) == len(interp)


def test_matmul_bucket_and_shape_parsing():
    space = autotune.get_space("matmul")
    b = space.bucket(dict(M=100, N=3, K=129, dtype="float16", flags=(4, True, False)))
    assert b == "M=128,N=16,K=256,float16,act=4,bias=1,res=0"
    assert space.bucket(dict(M=65, N=16, K=256, dtype=torch.float16, flags=(4, 1, 0))) == b
    assert space.parse_shape("8x16x32")["N"] == 16
    k = space.parse_shape({"shape": "8x16x32", "dtype": "bf16", "activation": "gelu", "bias": 1})
    assert k["dtype"] == "bfloat16" and k["flags"] == (4, True, False)
    for bad in ("8x16", {"M": 1, "N": 0, "K": 2}, {"M": "a", "N": 1, "K": 1}):
        with pytest.raises(ValueError, match="matmul shape"):
            space.parse_shape(bad)
    with pytest.raises(ValueError, match="not tunable"):
        space.parse_shape({"shape": "1x1x1", "dtype": "int4"})


_SECOND_PROCESS = """
import json, torch
import tilefuse.autotune.tuner as tuner
def no_tuning(*a, **k):
    raise AssertionError("tuned in the second process")
tuner.tune = no_tuning
from tilefuse.kernels.matmul import get_config
print(json.dumps(get_config(200, 256, 256, torch.float16, (0, False, False))))
"""


@pytest.mark.cuda
def test_gpu_second_process_uses_tuned_config_without_tuning(tmp_cache, monkeypatch):
    entry = autotune.tune("matmul", dict(M=256, N=256, K=256, dtype="float16"), max_configs=6)
    assert entry is not None and entry["failed"] < entry["tried"]
    assert entry["device"]["name"] == torch.cuda.get_device_name()
    monkeypatch.setenv("TILEFUSE_AUTOTUNE", "1")
    out = subprocess.run([sys.executable, "-c", _SECOND_PROCESS], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == entry["config"]

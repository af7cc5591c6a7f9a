"""``tilefuse autotune`` end to end on CPU: Triton interpreter, instant ``model`` timer."""
from __future__ import annotations

import json

import pytest
import torch

import tilefuse
from tilefuse import autotune
from tilefuse.autotune import chain, db as dbmod
from tilefuse.autotune.shapes import BUILTIN_MODELS, load_shapes, record_shapes
from tilefuse.cli import main



def test_cli_tune_show_export_clear(tmp_cache, capsys):
    shapes = tmp_cache / "shapes.txt"
    shapes.write_text("# two problems, one bucket shared by the last two lines\n"
                      "matmul 16x32x16\n33x17x29 fp32\n40x20x30 fp32\n")
    argv = ["autotune", "--shapes", str(shapes), "--timer", "model", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tuning 2 problems" in out and "speedup" in out and "geomean" in out
    assert "33x17x29 float32" in out and "tuned (" in out
    path = autotune.cache_path()
    assert path.parent == tmp_cache / "cache" and path.name == "triton-interpreter.json"
    assert len(dbmod.TuningDB(path).entries()) == 2
    # second run: served from the DB, no tuning
    assert main(argv) == 0
    assert capsys.readouterr().out.count("user (cached)") == 2
    assert main(["autotune", "--show"]) == 0
    out = capsys.readouterr().out
    assert "user DB" in out and "M=64,N=32,K=32,float32" in out and "yes" in out
    table = tmp_cache / "export.json"
    assert main(["autotune", "--export", str(table)]) == 0
    data = json.loads(table.read_text())
    assert data["kind"] == "tilefuse-autotune" and len(data["entries"]) == 2
    # shipped table: exported file placed in the tables dir is found by lookup after --clear
    assert main(["autotune", "--clear"]) == 0
    assert "removed" in capsys.readouterr().out and not path.exists()
    (tmp_cache / "tables").mkdir()
    table.rename(tmp_cache / "tables" / "triton-interpreter.json")
    space = autotune.get_space("matmul")
    entry, source = chain.stored_entry(space, autotune.current_identity(),
                                       space.bucket(dict(M=33, N=17, K=29, dtype="float32")))
    assert source == "shipped" and entry["kernel"] == "matmul"
    assert main(["autotune", "--export", str(tmp_cache / "none.json")]) == 1


def test_cli_errors_and_unknown_kernels(tmp_cache, capsys):
    assert main(["autotune", "--shapes", str(tmp_cache / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_cache / "bad.txt"
    bad.write_text("matmul 1x2\n")
    assert main(["autotune", "--shapes", str(bad), "--timer", "model"]) == 2
    assert "expected 'MxNxK'" in capsys.readouterr().err
    assert main(["autotune", "--kernels", "no_such_kernel", "--timer", "model",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown kernel family 'no_such_kernel'" in err and "matmul" in err
    assert main(["autotune", "--shapes", "model:nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["autotune", "--timer", "sundial"])
    capsys.readouterr()


def test_cli_json_shapes_dtype_and_budget(tmp_cache, capsys):
    shapes = tmp_cache / "shapes.json"
    shapes.write_text(json.dumps([{"kernel": "matmul", "M": 9, "N": 20, "K": 11,
                                   "activation": "relu", "bias": True}]))
    assert main(["autotune", "--shapes", str(shapes), "--dtype", "fp32,fp64", "--timer", "model",
                 "--budget-s", "30", "--max-configs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "9x20x11 float32+act1+bias" in out and "9x20x11 float64+act1+bias" in out
    buckets = {e["bucket"] for e in dbmod.TuningDB(autotune.cache_path()).entries().values()}
    assert buckets == {"M=16,N=32,K=16,float32,act=1,bias=1,res=0",
                       "M=16,N=32,K=16,float64,act=1,bias=1,res=0"}


def test_record_shapes_from_a_model(monkeypatch):
    # the recorder only needs the forward to run: skip the fused op (its first call imports
    # torch._dynamo, seconds of test time that say nothing about the hooks)
    import tilefuse.nn.linear as tf_linear

    monkeypatch.setattr(tf_linear, "fused_linear",
                        lambda x, w, b, activation: torch.nn.functional.linear(x, w, b))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                tilefuse.nn.Linear(16, 4, bias=False, activation="gelu"),
                                torch.nn.Linear(4, 4))
    specs = record_shapes(model, torch.randn(2, 3, 8))
    assert specs == [
        dict(M=6, N=16, K=8, dtype="float32", activation=0, bias=True, layout="nt"),
        dict(M=6, N=4, K=16, dtype="float32", activation=4, bias=False, layout="nt"),
        dict(M=6, N=4, K=4, dtype="float32", activation=0, bias=True, layout="nt")]
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed
    space = autotune.get_space("matmul")
    assert space.parse_shape(specs[1])["flags"] == (4, False, False)
    assert space.parse_shape(specs[1])["layout"] == "nt"  # linear reads weight.T: K contiguous
    assert ",nt" in space.bucket(space.parse_shape(specs[1]))


def test_model_shapes_recorded_or_builtin(monkeypatch):
    from types import SimpleNamespace

    class Tiny(torch.nn.Module):  # token model, like tilefuse.models.text_classifier
        def __init__(self):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(50, 8), torch.nn.Embedding(6, 8)
            self.ffn = tilefuse.nn.Linear(8, 16, activation="gelu")
            self.head = torch.nn.Linear(16, 2)

        def forward(self, ids):
            assert tilefuse.backend_for(ids) == "torch"  # recording never runs kernels
            return self.head(self.ffn(self.tok(ids)))[:, 0]

    import tilefuse.nn.linear as tf_linear  # skip the fused op's first-call torch._dynamo import

    monkeypatch.setattr(tf_linear, "fused_linear", lambda x, w, b, activation:
                        torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)))
    zoo = SimpleNamespace(text_classifier=Tiny)  # the CLI passes tilefuse.models
    problems, origin = load_shapes("model:textcls", ["matmul"], "cpu", models=zoo)
    assert "recorded" in origin
    assert [(s["M"], s["N"], s["K"], s["activation"]) for _, s in problems] == [
        (6, 16, 8, 4), (6, 2, 16, 0), (192, 16, 8, 4), (192, 2, 16, 0)]
    assert "TILEFUSE_BACKEND" not in __import__("os").environ
    # without a model zoo: the built-in lists
    problems, origin = load_shapes("model:textcls", ["matmul"], "cpu")
    assert len(problems) == len(BUILTIN_MODELS["textcls"]) and "built-in" in origin
    space = autotune.get_space("matmul")
    keys = [space.parse_shape(s) for _, s in problems]
    assert dict(M=128, N=3072, K=768, flags=(4, True, False)).items() <= keys[2].items()
    problems, _ = load_shapes("model:resnet50", ["matmul"], "cpu")
    assert {(s["M"], s["N"], s["K"]) for _, s in problems} == {(1, 1000, 2048), (32, 1000, 2048)}
    problems, origin = load_shapes(None, ["matmul"], "cpu")
    assert origin == "default shapes" and all(max(s.values()) <= 64 for _, s in problems)


# ------------------------------------------------------------------ issue 14 items 3, 5 and 15
def _one_problem(tmp_cache):
    shapes = tmp_cache / "one.txt"
    shapes.write_text("matmul 16x32x16 fp32\n")
    return ["autotune", "--shapes", str(shapes), "--timer", "model", "--no-progress"]


def test_cli_binary_junk_db_warns_once_in_one_line_and_is_rebuilt(tmp_cache, capsys):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe binary junk \xc3\x28" * 30)
    assert main(["autotune", "--show"]) == 0
    captured = capsys.readouterr()
    assert "(0 entries)" in captured.out
    assert captured.err.splitlines() == [captured.err.strip()]  # one line, no source echo
    assert captured.err.startswith("warning: tilefuse autotune: ignoring unusable database")
    assert "warnings.warn" not in captured.err and "Traceback" not in captured.err
    assert main(_one_problem(tmp_cache)) == 0
    capsys.readouterr()
    data = json.loads(path.read_text())  # rebuilt on the write
    assert data["kind"] == "tilefuse-autotune" and len(data["entries"]) == 1


def test_cli_fails_when_nothing_can_be_persisted(tmp_cache, capsys, monkeypatch):
    path = autotune.cache_path()
    path.mkdir(parents=True)  # a directory where the DB file belongs
    assert main(_one_problem(tmp_cache)) == 1
    err = capsys.readouterr().err
    assert "cannot save tuning results" in err and "not a file" in err
    # the cache "directory" is a file
    blocker = tmp_cache / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("TILEFUSE_CACHE_DIR", str(blocker / "cache"))
    assert main(_one_problem(tmp_cache)) == 1
    assert "is not a directory" in capsys.readouterr().err
    # the write itself fails (disk full, ...): stop with the reason, not exit 0
    monkeypatch.setenv("TILEFUSE_CACHE_DIR", str(tmp_cache / "ok"))

    def full(self, entries):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(dbmod.TuningDB, "_write_file", full)
    assert main(_one_problem(tmp_cache)) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err


def test_cli_show_marks_invalid_stored_configs(tmp_cache, capsys):
    space = autotune.get_space("matmul")
    ident = autotune.current_identity()
    good = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=1)
    keys = [space.parse_shape({"shape": s, "dtype": "fp32"}) for s in ("16x32x16", "64x64x64")]
    chain.user_db(ident).update({
        chain.db_key(space, ident, space.bucket(keys[0])): {
            "kernel": "matmul", "bucket": space.bucket(keys[0]), "config": good, "time_ms": 1.0},
        chain.db_key(space, ident, space.bucket(keys[1])): {
            "kernel": "matmul", "bucket": space.bucket(keys[1]), "config": dict(good, BLOCK_M="x"),
            "time_ms": "fast"}})
    assert main(["autotune", "--show"]) == 0
    rows = {line.split()[2]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith("user ")}
    assert rows[space.bucket(keys[0])].endswith("yes")
    assert rows[space.bucket(keys[1])].endswith("invalid (not used)")
    assert main(["autotune", "--export", str(tmp_cache / "t.json")]) == 0
    assert len(json.loads((tmp_cache / "t.json").read_text())["entries"]) == 1


def test_cli_progress_is_plain_lines_when_not_a_terminal(tmp_cache, capsys):
    argv = [a for a in _one_problem(tmp_cache) if a != "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "16x32x16 float32: 1/1 cfg" in err.splitlines()


def test_top_level_help_is_whole_sentences(capsys):
    from tilefuse.cli import build_parser

    description = build_parser().description
    assert description.endswith(".") and "compare" in description
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "regression gate" in capsys.readouterr().out

"""House-style tooling (issue 16 item 4): LICENSE, one version source, TOML through tomllib/tomli,
ruff in ``make test``, and an import graph in which the tuning package never reaches the model
zoo (whose kernels import the tuning package)."""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import pathlib
import subprocess
import sys
import textwrap
import types

import pytest

import tilefuse

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "tilefuse"


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# ------------------------------------------------------------------ LICENSE and the version
def test_license_file_is_the_apache_2_text_pyproject_names():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    assert _pyproject()["project"]["license"] == {"text": "Apache-2.0"}


def test_one_version_source():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "tilefuse.__version__"}
    # setuptools reads the attribute statically (no import of torch at build time): it must stay
    # a plain string literal at the top level of tilefuse/__init__.py
    tree = ast.parse((PKG / "__init__.py").read_text(encoding="utf-8"))
    literals = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and [getattr(t, "id", None) for t in n.targets] == ["__version__"]
                and isinstance(n.value, ast.Constant)]
    assert literals == [tilefuse.__version__]
    try:
        installed = importlib.metadata.version("tilefuse")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        pytest.skip("tilefuse is not installed")
    assert installed == tilefuse.__version__, "stale install: pip install -e '.[test,bench]'"


# ------------------------------------------------------------------ targets.toml
def test_targets_toml_is_read_by_tomllib_or_tomli(monkeypatch, tmp_path):
    from tilefuse.bench import targets

    assert not hasattr(targets, "parse_toml_subset")  # no hand-written parser
    assert targets.tomllib is tomllib
    deps = _pyproject()["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("tomli") and "python_version<'3.11'" in
               d.replace(" ", "") for d in deps), deps
    # Python 3.10: the module takes tomli (faked here by tomllib itself)
    fake = types.ModuleType("tomli")
    fake.loads, fake.TOMLDecodeError = tomllib.loads, tomllib.TOMLDecodeError
    monkeypatch.setitem(sys.modules, "tomli", fake)
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    spec = importlib.util.spec_from_file_location("_targets_py310", targets.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.undo()
    assert mod.tomllib is fake and mod.load_targets() == targets.load_targets()
    bad = tmp_path / "bad.toml"
    bad.write_text("[[inference]\n")
    with pytest.raises(ValueError, match="bad.toml"):
        targets.load_targets(bad)


# ------------------------------------------------------------------ ruff
def test_make_test_runs_ruff_before_pytest():
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = make.split("\ntest: ", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    ruff = [i for i, ln in enumerate(recipe) if "ruff check tilefuse tests tools" in ln]
    pytest_ = [i for i, ln in enumerate(recipe) if "-m pytest" in ln]
    assert ruff and pytest_ and ruff[0] < pytest_[0], recipe
    assert not any("ruff format" in ln for ln in recipe)  # formatting is not enforced (yet)
    cfg = _pyproject()["tool"]["ruff"]
    assert (cfg["line-length"], cfg["target-version"]) == (100, "py310")
    assert any(d.startswith("ruff") for d in _pyproject()["project"]["optional-dependencies"]["test"])


# ------------------------------------------------------------------ the import graph
def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str):
    """Every tilefuse module ``name`` imports, at module level or inside a function (lazy imports
    close cycles too), with the parent packages an import runs, except the root ``tilefuse``
    (its ``__init__`` imports the whole library by design)."""
    path = MODULES[name]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative (ruff bans them; resolved anyway)
                pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            parts = t.split(".")
            out |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    out.discard(name)
    return out


def _cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while not scc or w != v:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
            sccs.append(scc)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in graph:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return [s for s in sccs if len(s) > 1]


def test_tuning_library_never_imports_the_model_zoo():
    """Only the ``tilefuse autotune`` command (autotune/cli.py) builds zoo models, to record their
    shapes; the library records the shapes of whatever model it is given."""
    offenders = {m: sorted(t for t in _imports(m) if t.split(".")[:2] == ["tilefuse", "models"])
                 for m in MODULES if m.startswith("tilefuse.autotune") and
                 m != "tilefuse.autotune.cli"}
    assert not {m: t for m, t in offenders.items() if t}


def test_no_import_cycle_through_autotune_and_models():
    graph = {m: _imports(m) for m in MODULES}
    assert graph["tilefuse.autotune.cli"] >= {"tilefuse.models"}  # the graph sees lazy imports
    bad = [sorted(c) for c in _cycles(graph)
           if any(m.startswith("tilefuse.autotune") for m in c)
           and any(m.startswith("tilefuse.models") for m in c)]
    assert not bad


def test_cycle_finder_sees_a_lazy_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_autotune_and_model_shapes_load_no_model_zoo():
    """In a fresh interpreter, without the root package's ``__init__`` (which imports the whole
    library): the tuning package, its command module and ``model:NAME`` without a zoo passed in
    (the built-in lists) never import ``tilefuse.models``."""
    code = textwrap.dedent(f"""
        import sys, types
        root = types.ModuleType("tilefuse")
        root.__path__ = [{str(PKG)!r}]
        sys.modules["tilefuse"] = root
        import torch
        import tilefuse.autotune as autotune
        import tilefuse.autotune.cli
        from tilefuse.autotune.shapes import load_shapes
        problems, origin = load_shapes("model:textcls", ["matmul"], "cpu")
        assert problems and "built-in" in origin, origin
        specs = autotune.record_shapes(torch.nn.Linear(4, 2), torch.randn(3, 4))
        assert [(s["M"], s["N"], s["K"]) for s in specs] == [(3, 2, 4)], specs
        print(sorted(m for m in sys.modules if m.startswith("tilefuse.models")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_autotune_command_records_the_zoo_models_shapes():
    """``tilefuse autotune --shapes model:NAME`` still records from ``tilefuse.models``: the
    command passes the zoo in."""
    import argparse

    from tilefuse.autotune import cli
    from tilefuse.autotune.identity import current_identity

    args = argparse.Namespace(kernels="matmul", shapes="model:textcls", dtype=None)
    problems, origin = cli._problems(args, current_identity())
    assert origin == "recorded from tilefuse.models (textcls)" and problems


def test_tests_share_one_tolerance_rule_and_one_import_style():
    """Helpers are imported as top-level modules of tests/ (``from utils import ...``), never as
    ``tests.utils`` (two module objects); the tolerance rule is ``utils.check`` (fuzz_utils and
    ``assert_close_to_ref`` use it)."""
    import re
    from pathlib import Path

    import fuzz_utils
    import utils

    tests = Path(__file__).resolve().parent
    offenders = [p.name for p in tests.glob("*.py")
                 if re.search(r"^\s*from tests[. ]", p.read_text(), re.M)]
    assert offenders == []
    assert fuzz_utils.check is utils.check

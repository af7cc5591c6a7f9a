"""The README's and docs/*.md Python examples run as written (blocks of one file share globals,
in order, like a reader pasting them into one session)."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("i,code", list(enumerate(_blocks(ROOT / "README.md"))))
def test_readme_python_blocks(i, code, capsys):
    exec(compile(code, f"README.md[python block {i}]", "exec"), {})


DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_docs_python_blocks(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files (ONNX, reports) write here
    monkeypatch.setenv("TILEFUSE_CACHE_DIR", str(tmp_path / "cache"))  # never the user's tuning DB
    env = {"__name__": "__docs__"}
    for i, code in enumerate(_blocks(path)):
        exec(compile(code, f"{path.name}[python block {i}]", "exec"), env)


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:4]
    assert head[0] == "```bash"
    assert head[1].startswith("make demo") and head[2].startswith("make test")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert [ln for ln in ci.splitlines() if ln and not ln.startswith(("#", "set ", "cd "))] == \
        ["make test"]

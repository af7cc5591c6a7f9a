"""The README's Python examples run as written."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("i,code", list(enumerate(_blocks(ROOT / "README.md"))))
def test_readme_python_blocks(i, code, capsys):
    exec(compile(code, f"README.md[python block {i}]", "exec"), {})


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:4]
    assert head[0] == "```bash"
    assert head[1].startswith("make demo") and head[2].startswith("make test")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert [ln for ln in ci.splitlines() if ln and not ln.startswith(("#", "set ", "cd "))] == \
        ["make test"]

"""Static checks on the Triton kernels for API differences between the triton releases we support
(3.6 on the GPU machines, 3.9 on the CPU ones) that the interpreter lane on 3.9 cannot see:

* ``tl.dot`` with an accumulator must pass ``out_dtype``: triton 3.6 defaults it to fp32 and
  asserts it equals the accumulator's dtype (int32 for int8, fp64 for fp64); 3.9 infers it.
* ``tl.make_block_ptr`` is gone in triton 3.9; ``libdevice.erf`` is broken in the interpreter.
``make compat`` (torch 2.11 + triton 3.6) is the full check."""
import ast
from pathlib import Path

import pytest

KERNELS = sorted((Path(__file__).resolve().parents[1] / "tilefuse" / "kernels").glob("*.py"))


def _calls(tree, attr):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == attr):
            yield node


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_dot_with_accumulator_names_out_dtype(path):
    tree = ast.parse(path.read_text())
    bad = []
    for call in _calls(tree, "dot"):
        kwargs = {k.arg for k in call.keywords}
        if (len(call.args) >= 3 or "acc" in kwargs) and "out_dtype" not in kwargs:
            bad.append(f"{path.name}:{call.lineno}")
    assert not bad, f"tl.dot with an accumulator but no out_dtype= (fails on triton 3.6): {bad}"


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_no_apis_missing_on_a_supported_triton(path):
    text = path.read_text()
    assert "make_block_ptr" not in text, "tl.make_block_ptr is gone in triton 3.9"
    assert "libdevice.erf" not in text, "libdevice.erf is broken in the interpreter: use tl.erf"

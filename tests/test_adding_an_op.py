"""docs/adding_an_op.md's walk-through, executed: its code blocks (in order, as one module) make
a working op; the registry guard flags its custom op until the entry claims it; the op matches an
fp64 torch reference in the interpreter, its eager fast path equals the custom-op path, and
``torch.compile(fullgraph=True)`` traces it."""
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fast_path_utils import assert_fast_equals_custom_op, compiled_targets
from test_registry import _custom_ops_created, problems
from tilefuse import registry
from tilefuse._backend import backend_for_device

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_an_op.md"

pytestmark = pytest.mark.skipif(backend_for_device("cpu") != "triton",
                                reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 3
    mod = types.ModuleType("tilefuse.fused.axpb")
    mod.__file__ = str(DOC)
    sys.modules[mod.__name__] = mod

    try:
        # one file: the kernel needs its source lines, so write it out for triton's inspect
        path = tmp_path_factory.mktemp("example") / "axpb.py"
        path.write_text("\n".join(blocks))
        code = compile(path.read_text(), str(path), "exec")
        exec(code, mod.__dict__)
        yield mod
    finally:
        sys.modules.pop(mod.__name__, None)


def test_guard_flags_the_new_custom_op_until_registered(example):
    made = _custom_ops_created() | {"example_axpb_act"}
    before = problems(registry.OPS, custom_ops=made)
    assert any("tilefuse::example_axpb_act" in m for m in before)
    after = problems(registry.OPS, custom_ops=made,
                     internal={**registry.INTERNAL_CUSTOM_OPS,
                               **{c: "test" for c in example.SPEC.custom_ops}})
    assert after == []
    assert example.SPEC.family in registry.FAMILIES
    assert example.SPEC.autocast in registry.AUTOCAST_POLICIES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "gelu", ("leaky_relu", 0.2)])
def test_example_op_matches_fp64(example, dtype, act):
    x = torch.randn(3, 1001, dtype=dtype, requires_grad=True)
    y = example.axpb_act(x, 2.0, -0.5, act)
    x64 = x.detach().double().requires_grad_(True)
    z = 2.0 * x64 - 0.5
    name, p = (act, 0.01) if isinstance(act, str) else (act or (None, 0.0))
    ref = {None: z, "gelu": F.gelu(z) if name == "gelu" else z,
           "leaky_relu": F.leaky_relu(z, p)}[name]
    tol = 4 * torch.finfo(dtype).eps * (1 + ref.abs())
    assert y.dtype == dtype
    assert bool(((y.double() - ref).abs() <= tol).all())
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(y, x, g.to(dtype))
    (gr,) = torch.autograd.grad(ref, x64, g)
    assert bool(((gx.double() - gr).abs() <= 8 * torch.finfo(dtype).eps * (1 + gr.abs())).all())
    with pytest.raises(TypeError, match="x"):
        example.axpb_act(torch.ones(3, dtype=torch.int32))


def test_example_fast_path_and_compile(example):
    x = torch.randn(4, 33)
    assert_fast_equals_custom_op(lambda t: example.axpb_act(t, 1.5, 0.25, "silu"), [x])
    targets, got, want = compiled_targets(lambda t: example.axpb_act(t, 1.5, 0.25, "silu"), [x])
    assert any("example_axpb_act" in t for t in targets)
    assert torch.equal(got, want)

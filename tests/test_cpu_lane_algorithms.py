"""The CPU lane runs the GPU's algorithms (issue 16 item 3).

* Every ``interpreter_enabled()`` branch left in ``tilefuse/kernels/`` is listed below with what
  it changes: tile sizes, launch options, or an interpreter capability (numpy has no bf16 dot).
  A new branch fails here until it is reviewed and listed (an algorithm choice must be a pure
  function of the problem and the device profile instead, e.g. ``sm_count``).
* The launch rules that depend on the device size (split reductions) use the SM count, so the
  interpreter's pseudo-device (``INTERPRETER_SMS``) takes the same split paths on small shapes:
  tested here for the conv weight gradient and the per-row quantizer's two-pass path.
"""
import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse._backend import backend_for_device
from tilefuse.kernels import INTERPRETER_SMS, sm_count

KERNELS = Path(__file__).resolve().parents[1] / "tilefuse" / "kernels"

# (file, function) -> what its interpreter branch changes (never the algorithm)
ALLOWED = {
    ("conv_fwd.py", "heuristic_config"): "tile sizes (few, large tiles)",
    ("conv_fwd.py", "acc_constexprs"): "bf16 operands upcast for tl.dot (numpy has no bf16)",
    ("cross_entropy.py", "_block"): "chunk size of the same chunked online softmax",
    ("cross_entropy.py", "_params"): "block size of the reduction kernel",
    ("dropout.py", "_block"): "block size of the same per-element Philox rule",
    ("dropout.py", "_launch_params"): "2-D tile size of the strided path",
    ("dropout.py", "_mixup_params"): "block size",
    ("fp8_matmul.py", "heuristic_config"): "tile sizes",
    ("int8_matmul.py", "heuristic_config"): "tile sizes",
    ("int8_matmul.py", "_launch_params"): "bf16 operands upcast for tl.dot in the interpreter",
    ("matmul.py", "heuristic_config"): "tile sizes (split-K / persistent choices take sms)",
    ("matmul.py", "_launch_params"): "bf16 upcast for tl.dot; num_warps of the DropConnect path",
    ("matmul_tma.py", "ensure_allocator"): "the interpreter needs no TMA allocator",
    ("norm.py", "_rows_per_program"): "row-chunk size of the same chunked statistics",
    ("norm_bn.py", "_tiles"): "tile sizes",
    ("norm_bn.py", "_split"): "split count: 2 slices, so the GPU's split + merge path always runs",
    ("norm_group.py", "_geometry"): "tile size",
    ("optim_table.py", "block_size"): "elements per program",
    ("quant.py", "quant_config"): "rows per program (ONE_TILE uses the same limit everywhere)",
}


def _branches():
    found = set()
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and getattr(node.func, "id", None)
                        == "interpreter_enabled" and fn.name != "interpreter_enabled"):
                    found.add((path.name, fn.name))
    return found


def test_every_interpreter_branch_is_reviewed():
    found = _branches()
    unknown = sorted(found - set(ALLOWED))
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"listed but gone (remove them): {stale}"
    assert not unknown, (f"interpreter_enabled() branches not reviewed: {unknown}; an algorithm "
                         f"choice must not depend on it (use the device profile, e.g. sm_count)")


interp = pytest.mark.skipif(backend_for_device("cpu") != "triton",
                            reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")


@interp
def test_conv_wgrad_split_reduction_runs_in_the_interpreter():
    from tilefuse.kernels import conv_bwd

    assert sm_count("cpu") == INTERPRETER_SMS
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    sig = (2 * 16 * 16, 4, 4, 1, (1, 1), (1, 1), (1, 1), torch.float64, False, False,
           INTERPRETER_SMS)
    assert conv_bwd._wgrad_params(sig)[1] > 1  # the GPU's split rule, on the pseudo-device
    y = tilefuse.ops.conv2d(x, w)
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, w, g)
    (ref,) = torch.autograd.grad(F.conv2d(x, w), w, g)
    torch.testing.assert_close(gw, ref, rtol=1e-12, atol=1e-12)
    assert conv_bwd._wgrad_split(10 ** 6, 1, 64, 1, 132) == 264  # an H100: 2 per SM


@interp
def test_quantizer_two_pass_rows_in_the_interpreter():
    from tilefuse.kernels import quant

    N = quant.MAX_ONE_TILE + 7
    assert quant.quant_config(3, N)["ONE_TILE"] is False
    x = torch.randn(3, N)
    q, s = tilefuse.ops.quantize_per_row(x)
    ref_s = x.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(s, ref_s)
    assert bool(((q.float() * s - x).abs() <= s / 2 + 1e-6).all())

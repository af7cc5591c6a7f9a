"""Shared checker for the norm test files: forward and backward of a fused op against an fp64
torch reference, with the tolerance tied to eager torch's error in the same dtype."""
from __future__ import annotations

import torch

from utils import assert_close_to_ref


def _leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(t.is_floating_point())


def check_fwd_bwd(fn, ref_fn, tensors: dict, grad: bool = True, factor: float = 4.0,
                  eager_dtype: torch.dtype | None = None):
    """``fn(**tensors)`` vs ``ref_fn(**fp64 copies)``; eager is ``ref_fn`` on the inputs' dtype
    (or on ``eager_dtype`` copies cast back, where torch's CPU kernels lack that dtype).
    Returns the fused output."""
    ours_in = {k: _leaf(v) for k, v in tensors.items()}
    ref_in = {k: _leaf(v, torch.float64) for k, v in tensors.items()}
    eager_in = {k: _leaf(v, eager_dtype) for k, v in tensors.items()}
    out = fn(**ours_in)
    ref = ref_fn(**ref_in)
    eager = ref_fn(**eager_in)
    x = tensors["x"]
    assert out.dtype == x.dtype, f"output dtype {out.dtype} != input dtype {x.dtype}"
    assert out.shape == x.shape
    assert_close_to_ref(out, ref, eager.to(out.dtype), factor=factor, name="forward")
    if not grad or out.numel() == 0:
        return out
    g = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    names = [k for k, v in ours_in.items() if v is not None and v.requires_grad]
    d_ours = torch.autograd.grad(out, [ours_in[k] for k in names], g)
    d_ref = torch.autograd.grad(ref, [ref_in[k] for k in names], g.double())
    d_eager = torch.autograd.grad(eager, [eager_in[k] for k in names], g.to(eager.dtype))
    for k, a, r, e in zip(names, d_ours, d_ref, d_eager):
        assert a.dtype == ours_in[k].dtype, f"grad {k}: dtype {a.dtype}"
        assert_close_to_ref(a, r, e.to(a.dtype), factor=factor, name=f"grad {k}")
    return out

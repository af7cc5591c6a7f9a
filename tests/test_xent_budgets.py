"""Cross-entropy memory-traffic and launch budgets (issue 18), counted in the interpreter with
tilefuse.bench.traffic: deterministic counts, not timings.

The LLM-head case (64 x 32000, label smoothing 0.1) scaled down: forward + backward move at most
1.15x the distinct bytes of (read the logits + write their gradient), in at most 4 launches
(Triton kernels plus torch ops other than views and allocations). No (R, V) tensor is stored in
forward: only the per-row log-sum-exp.
"""
import pytest
import torch

import tilefuse
from tilefuse.bench.traffic import count_traffic, nbytes

DISTINCT, LAUNCHES = 1.15, 4


def _fwd_bwd(logits, target, **kw):
    """Forward and backward counted together (distinct bytes: the logits backward re-reads are
    the addresses forward read); the incoming gradient is made outside."""
    x = logits.detach().clone().requires_grad_()
    shape = (logits.shape[0],) if kw.get("reduction") == "none" else ()
    g = torch.rand(shape).to(logits.dtype)
    with count_traffic() as t:
        loss = tilefuse.ops.cross_entropy(x, target, **kw)
        loss.backward(g)
    return t, x


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("R,V,dtype", [(16, 3000, torch.bfloat16), (8, 1000, torch.float32)])
def test_label_smoothing_budget(R, V, dtype, reduction):
    g = torch.Generator().manual_seed(R + V)
    logits = torch.randn(R, V, generator=g).to(dtype)
    target = torch.randint(0, V, (R,), generator=g)
    target[3] = -100
    t, x = _fwd_bwd(logits, target, label_smoothing=0.1, reduction=reduction)
    minimal = nbytes(logits, x.grad)  # read the logits + write the gradient
    assert t.launches <= LAUNCHES, (t.kernels, t.torch_ops)
    assert t.distinct_bytes <= DISTINCT * minimal, t.distinct_bytes / minimal
    # forward stores O(R) bytes for backward, never an (R, V) tensor
    x2 = logits.detach().clone().requires_grad_()
    with count_traffic() as fwd:
        tilefuse.ops.cross_entropy(x2, target, label_smoothing=0.1, reduction=reduction)
    assert fwd._written_bytes <= 64 * R


@pytest.mark.parametrize("kind", ["probs", "weight", "probs_weight"])
def test_soft_targets_and_weights_budget(kind):
    """Probability targets are read in forward and again in backward: the minimum is
    logits + targets + gradient."""
    R, V = 8, 2000
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(R, V, generator=g).to(torch.bfloat16)
    if kind.startswith("probs"):
        target = torch.softmax(torch.randn(R, V, generator=g), 1).to(torch.bfloat16)
    else:
        target = torch.randint(0, V, (R,), generator=g)
    w = torch.rand(V, generator=g) if kind.endswith("weight") else None
    t, x = _fwd_bwd(logits, target, label_smoothing=0.1, weight=w)
    minimal = nbytes(logits, x.grad, target if target.is_floating_point() else None, w)
    assert t.launches <= LAUNCHES, (t.kernels, t.torch_ops)
    assert t.distinct_bytes <= DISTINCT * minimal, t.distinct_bytes / minimal


def test_inference_reads_logits_once():
    logits = torch.randn(16, 3000).to(torch.bfloat16)
    target = torch.randint(0, 3000, (16,))
    with torch.no_grad(), count_traffic() as t:
        tilefuse.ops.cross_entropy(logits, target, label_smoothing=0.1)
    assert t.launches == 2 and t.distinct_bytes <= 1.01 * nbytes(logits) + 1024

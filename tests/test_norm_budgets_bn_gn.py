"""BatchNorm / GroupNorm memory-traffic and launch budgets (issue 17), counted in the interpreter
with tilefuse.bench.traffic: deterministic counts, not timings.

Budgets per call, forward and backward: distinct bytes <= 1.15x the minimal traffic (each input
read once, each output written once, the running stats read and written), issued bytes <= 2.05x
(the statistics pass reads x twice, from cache on a GPU), at most 3 launches (Triton kernels plus
torch ops other than views and allocations): BatchNorm training is statistics, finalize (merge,
running stats, num_batches_tracked) and apply; its backward a reduction and an apply (one
launch each way when the whole problem fits one tile).
"""
import pytest
import torch

import tilefuse
from tilefuse.bench.traffic import count_traffic, nbytes

DISTINCT, ISSUED, LAUNCHES = 1.15, 2.05, 3


def _check(t, minimal, launches=LAUNCHES):
    assert t.launches <= launches, (t.kernels, t.torch_ops)
    assert t.distinct_bytes <= DISTINCT * minimal, t.distinct_bytes / minimal
    assert t.issued_bytes <= ISSUED * minimal, t.issued_bytes / minimal


def _bn_module(C, dtype, act, momentum):
    m = tilefuse.nn.BatchNormAct2d(C, momentum=momentum, activation=act)
    with torch.no_grad():
        m.weight.normal_(), m.bias.normal_()
    return m


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape,cl,residual", [
    ((8, 16, 32, 32), False, False),   # the issue's case (NCHW)
    ((4, 8, 7, 9), False, True),       # odd spatial size, residual
    ((4, 8, 6, 6), True, False),       # channels_last
    ((256, 24, 1, 1), False, False),   # S = 1
])
def test_batch_norm_train_budgets(shape, cl, residual, momentum):
    torch.manual_seed(0)
    C = shape[1]
    m = _bn_module(C, torch.bfloat16, "relu", momentum)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    r = torch.randn(*shape, dtype=torch.bfloat16) if residual else None
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    stats = (m.running_mean, m.running_var, m.num_batches_tracked)
    ref = torch.nn.BatchNorm2d(C, momentum=momentum)
    ref.load_state_dict(m.state_dict())
    import tilefuse.kernels.norm_bn as kb

    small = kb._small(shape[0] * shape[2] * shape[3], C) is not None  # (fits one tile)
    with count_traffic() as fwd:
        y = m(x, residual=r)
    # stats, finalize, apply; one program when the problem fits one tile
    assert fwd.kernels == (1 if small else 3), (fwd.kernels, fwd.torch_ops)
    _check(fwd, nbytes(x, r, m.weight, m.bias, y, *stats, *stats))
    z = ref(x.detach().float()) + (r.float() if residual else 0)
    torch.testing.assert_close(y.float(), torch.relu(z), atol=0.05, rtol=0.02)
    for k, v in ref.state_dict().items():  # running stats and the counter, updated in-kernel
        torch.testing.assert_close(m.state_dict()[k], v, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    with count_traffic() as bwd:
        y.backward(g)
    assert bwd.launches <= (1 if small else 2), (bwd.kernels, bwd.torch_ops)
    # (the backward re-reads the residual for the activation's derivative at z)
    _check(bwd, nbytes(g, x, r, m.weight, m.bias, x.grad, m.weight.grad, m.bias.grad), 2)


def test_batch_norm_eval_budget():
    m = _bn_module(8, torch.float32, "silu", 0.1).eval()
    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad(), count_traffic() as t:
        y = m(x)
    assert t.launches == 1
    _check(t, nbytes(x, m.weight, m.bias, m.running_mean, m.running_var, y))


def test_batch_norm_nchw_walks_samples_without_division():
    """NCHW with several samples: the kernels walk (n, run of s) (no per-element division); the
    collapsible layouts (channels_last, N == 1, S == 1) are one run."""
    import tilefuse.kernels.norm_bn as kb

    x = torch.randn(3, 4, 5, 5).reshape(3, 4, 25)
    assert kb._geometry(3, 25, x) == (3, 25)
    cl = torch.randn(3, 4, 5, 5).to(memory_format=torch.channels_last).reshape(3, 4, 25)
    assert kb._geometry(3, 25, cl) == (1, 75)
    assert kb._geometry(1, 25, x[:1]) == (1, 25)
    assert kb._geometry(3, 1, torch.randn(3, 4, 1)) == (1, 3)


@pytest.mark.parametrize("shape,G,cl,tile", [
    ((2, 64, 32, 32), 32, False, None),   # the issue's case
    ((2, 8, 12, 10), 2, True, None),      # channels_last
    ((1, 8, 24, 24), 2, False, 256),      # batch 1: S split across the statistics grid
])
def test_group_norm_budgets(shape, G, cl, tile, monkeypatch):
    import tilefuse.kernels.norm_group as kg

    if tile or cl:  # the split statistics / channels_last kernels, not the one-launch path
        monkeypatch.setattr(kg, "SMALL_TILE", 0)
        tilefuse.kernels.clear_launch_caches()  # (no launch bound before the patch)
    if tile:
        monkeypatch.setattr(kg, "INTERP_TILE", tile)
        assert kg._geometry(shape[0], shape[1], shape[2] * shape[3], G,
                            torch.device("cpu"))[1] > 1
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(*shape, dtype=torch.bfloat16)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(C, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(C, dtype=torch.bfloat16, requires_grad=True)
    with count_traffic() as fwd:
        y = tilefuse.ops.group_norm_act(x, G, w, b, activation="silu")
    _check(fwd, nbytes(x, w, b, y))
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.detach().float(), G,
                                                                  w.detach().float(),
                                                                  b.detach().float()))
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)
    g = torch.randn_like(y)
    with count_traffic() as bwd:
        y.backward(g)
    _check(bwd, nbytes(g, x, w, b, x.grad, w.grad, b.grad))
    assert w.grad.dtype == torch.bfloat16  # written in the parameters' dtype (no cast op)

"""tilefuse.prune on top of torch.nn.utils.prune: sparsity report, 2:4 pattern."""
import pytest
import torch

import tilefuse
from tilefuse.prune import SemiStructured24, is_2to4_sparse


def _net():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 6),
                               torch.nn.Linear(6, 4))


def test_l1_unstructured_per_layer_and_copy():
    net = _net()
    pruned, rep = tilefuse.prune(net, 0.3, kind="l1_unstructured")
    assert (net[0].weight != 0).all()                      # the original is untouched
    assert set(rep.layer_sparsity) == {"0", "2", "3"}
    for name, sp in rep.layer_sparsity.items():
        w = getattr(pruned, name).weight
        assert sp == pytest.approx(round(0.3 * w.numel()) / w.numel())
        assert "weight_orig" not in dict(getattr(pruned, name).named_parameters())
    assert 0.29 < rep.sparsity < 0.31 and 0 < rep.model_sparsity < rep.sparsity
    # the surviving weights are the largest in magnitude
    w0, p0 = net[0].weight.abs(), pruned[0].weight
    assert w0[p0 == 0].max() <= w0[p0 != 0].min()
    assert "sparsity" in str(rep)


def test_global_and_not_permanent():
    net = _net()
    pruned, rep = tilefuse.prune(net, 0.5, kind="global_l1_unstructured", skip=("3",),
                                 inplace=True, permanent=False)
    assert pruned is net and "3 (skip)" in rep.skipped
    assert rep.sparsity == pytest.approx(0.5, abs=1e-3)
    sd = net.state_dict()
    assert "0.weight_orig" in sd and "0.weight_mask" in sd and "3.weight" in sd
    total = sum(p.numel() for p in net.parameters())
    zeros = int((net[0].weight == 0).sum()) + int((net[2].weight == 0).sum())
    assert rep.model_sparsity == pytest.approx(zeros / total)


def test_2to4_pattern():
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 6),
                              torch.nn.Linear(6, 3), torch.nn.Conv2d(4, 4, 1))
    pruned, rep = tilefuse.prune(net, kind="2:4")
    for i in (0, 1):
        assert is_2to4_sparse(pruned[i].weight) and rep.layer_sparsity[str(i)] == 0.5
        groups = net[i].weight.detach().abs().reshape(-1, 4)
        kept = pruned[i].weight.detach().abs().reshape(-1, 4).sum(1)
        assert torch.allclose(kept, groups.topk(2, dim=1).values.sum(1))
    assert rep.sparsity == 0.5 and not is_2to4_sparse(net[0].weight)
    assert any(s.startswith("2 (in_features 6") for s in rep.skipped)
    assert any(s.startswith("3 (2:4 applies to Linear") for s in rep.skipped)
    # it is a torch.nn.utils.prune method: masks compose with torch's API
    lin = torch.nn.Linear(8, 4)
    SemiStructured24.apply(lin, "weight")
    assert hasattr(lin, "weight_mask") and is_2to4_sparse(lin.weight)


def test_prune_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        tilefuse.prune(_net(), 0.5, kind="4:8")
    with pytest.raises(ValueError, match="amount"):
        tilefuse.prune(_net(), 0.3, kind="2:4")
    with pytest.raises(ValueError, match="amount"):
        tilefuse.prune(_net(), 1.5)
    with pytest.raises(TypeError, match="amount"):
        tilefuse.prune(_net())
    with pytest.raises(TypeError, match="model"):
        tilefuse.prune("net", 0.5)


@pytest.mark.cuda
def test_2to4_to_semi_structured_on_gpu():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparsity needs sm80+")
    lin = torch.nn.Linear(128, 128).half().cuda()
    pruned, _ = tilefuse.prune(lin, kind="2:4")
    sparse = torch.sparse.to_sparse_semi_structured(pruned.weight.detach())
    x = torch.randn(128, 64, device="cuda", dtype=torch.float16)
    assert torch.allclose(sparse @ x, pruned.weight.detach() @ x, atol=1e-2, rtol=1e-2)

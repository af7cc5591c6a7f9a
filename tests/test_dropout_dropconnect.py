"""DropConnect inside the matmul kernel: forward equals x @ (W * keep / (1-p))^T, backward uses
the same regenerated mask; eval is the plain fused linear."""
import pytest
import torch

import tilefuse
from tilefuse.fused.dropout import dropconnect_mm

P = 0.4


def _masked_weight(w, seed):
    """(W * keep / (1-p)) recovered by running the kernel on an identity input."""
    N, K = w.shape
    eye = torch.eye(K, device=w.device, dtype=w.dtype)
    return dropconnect_mm(eye, w.t(), seed, P, 1, K).t()  # (N, K)


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_forward_backward_mask(device, monkeypatch, backend):
    if backend == "torch":
        monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    N, K = 19, 23
    w = torch.randn(N, K, device=device, requires_grad=True)
    x = torch.randn(5, K, device=device, requires_grad=True)
    seed = torch.tensor(1234, device=device)
    wm = _masked_weight(w.detach(), seed)
    keep = wm != 0
    assert 0.4 < keep.float().mean().item() < 0.8
    assert torch.allclose(wm[keep], w.detach()[keep] / (1 - P), atol=1e-5)
    y = dropconnect_mm(x, w.t(), seed, P, 1, K)
    assert torch.allclose(y, x.detach() @ wm.t(), atol=1e-4)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    assert torch.allclose(gx, g @ wm, atol=1e-4)
    assert torch.allclose(gw, (g.t() @ x.detach()) * keep / (1 - P), atol=1e-4)


def test_linear_module(device):
    m = tilefuse.nn.Linear(12, 7, dropconnect=0.5).to(device)
    ref = torch.nn.Linear(12, 7).to(device)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 12, device=device)
    torch.manual_seed(0)
    a = m(x)
    b = m(x)
    assert a.shape == (2, 3, 7) and not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(m(x), a)
    a.sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None
    assert (m.weight.grad == 0).any()  # dropped weights get no gradient
    m.eval()
    assert torch.allclose(m(x), ref(x), atol=1e-5)
    assert "dropconnect=0.5" in repr(m)
    with pytest.raises(ValueError, match="dropconnect"):
        tilefuse.nn.Linear(4, 4, dropconnect=2.0)


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_fused_bias_activation_grads(device, monkeypatch, backend):
    from tilefuse.fused.dropout import draw_seed
    from tilefuse.ops import dropconnect_linear

    if backend == "torch":
        monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    N, K = 9, 14
    w = torch.randn(N, K, device=device, requires_grad=True)
    b = torch.randn(N, device=device, requires_grad=True)
    x = torch.randn(2, 3, K, device=device, requires_grad=True)
    torch.manual_seed(5)
    keep = _masked_weight(w.detach(), draw_seed(device)) != 0
    torch.manual_seed(5)
    y = dropconnect_linear(x, w, b, p=P, activation="gelu")
    ref = torch.nn.functional.gelu(x @ (w * keep / (1 - P)).t() + b)
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    exp = torch.autograd.grad(ref, (x, w, b), g)
    for a, e in zip(got, exp):
        assert torch.allclose(a, e, atol=1e-4)


def test_seed_drawn_on_device_and_saved(device, monkeypatch):
    import tilefuse.fused.dropout as fd

    seeds = []
    real = fd.draw_seed
    monkeypatch.setattr(fd, "draw_seed", lambda dev=None: seeds.append(real(dev)) or seeds[-1])
    w = torch.randn(6, 10, device=device, requires_grad=True)
    y = fd.dropconnect_linear(torch.randn(3, 10, device=device), w, p=0.5)
    assert len(seeds) == 1 and seeds[0].device == w.device
    y.sum().backward()
    assert w.grad is not None
    # a caller-supplied seed on another device is moved to the data's device
    cpu_seed = torch.tensor(77)
    a = dropconnect_mm(torch.eye(10, device=device), w.detach().t(), cpu_seed, P, 1, 10)
    b = dropconnect_mm(torch.eye(10, device=device), w.detach().t(), cpu_seed.to(device), P, 1,
                       10)
    assert torch.equal(a, b)

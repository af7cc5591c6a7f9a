"""mixup, cutout, DropBlock and the dropout schedule."""
import math

import pytest
import torch

import tilefuse
from tilefuse import regularize as R


def test_mixup(device):
    x = torch.randn(8, 3, 4, 4, device=device)
    y = torch.randint(0, 5, (8,), device=device)
    torch.manual_seed(11)
    xm, ym = R.mixup(x, y, alpha=0.4, num_classes=5)
    assert xm.shape == x.shape and ym.shape == (8, 5)
    assert torch.allclose(ym.sum(1), torch.ones(8, device=device))
    # each mixed target is lam*onehot(y) + (1-lam)*onehot(y[perm]) with one lam for the batch
    lam = ym.max(1).values.min().item()
    assert 0.5 - 1e-6 <= max(lam, 1 - lam) <= 1.0
    torch.manual_seed(11)
    xm2, ym2 = R.mixup(x, y, alpha=0.4, num_classes=5)
    assert torch.equal(xm, xm2) and torch.equal(ym, ym2)
    soft = torch.softmax(torch.randn(8, 5, device=device), 1)
    _, ys = R.mixup(x, soft, alpha=1.0)
    assert torch.allclose(ys.sum(1), torch.ones(8, device=device))
    with pytest.raises(ValueError, match="num_classes"):
        R.mixup(x, y, 0.4)
    with pytest.raises(ValueError, match="alpha"):
        R.mixup(x, y, 0.0, num_classes=5)
    with pytest.raises(ValueError, match="batch"):
        R.mixup(x, y[:3], 0.4, num_classes=5)


def test_cutout(device):
    x = torch.ones(6, 2, 9, 11, device=device)
    y = R.cutout(x, size=4)
    assert y.shape == x.shape
    for img in y:
        zero = img[0] == 0
        assert torch.equal(zero, img[1] == 0)  # same square across channels
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        n = int(zero.sum())
        assert 0 < n <= 16 and n == len(rows) * len(cols)  # one clipped rectangle
    cl = R.cutout(x.to(memory_format=torch.channels_last), 3)
    assert cl.shape == x.shape
    assert torch.equal(R.cutout(x, 4, p=0.0), x)
    with pytest.raises(ValueError, match="x"):
        R.cutout(torch.ones(2, 3, 4, device=device), 2)
    with pytest.raises(ValueError, match="size"):
        R.cutout(x, -1)


def test_drop_block(device):
    x = torch.ones(4, 8, 16, 16, device=device)
    m = tilefuse.nn.DropBlock2d(p=0.2, block_size=3)
    y = m(x)
    dropped = (y == 0).float().mean().item()
    assert 0.1 < dropped < 0.3
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, x.numel() / (y != 0).sum().item()),
                          rtol=1e-4)
    assert m.eval()(x) is x
    assert torch.equal(R.drop_block2d(x, 0.0, 3), x)
    with pytest.raises(ValueError, match="block_size"):
        tilefuse.nn.DropBlock2d(0.1, 0)


def test_schedule():
    assert R.dropout_schedule(0, 0.3, 10) == 0.0
    assert math.isclose(R.dropout_schedule(5, 0.3, 10), 0.15)
    assert R.dropout_schedule(50, 0.3, 10) == 0.3
    assert math.isclose(R.dropout_schedule(5, 0.3, 10, kind="cosine"), 0.15)
    m = R.ScheduledDropout(0.2, warmup_steps=4, p_start=0.1)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.1
    for _ in range(10):
        m.step()
    assert m.p == 0.2
    with pytest.raises(ValueError, match="kind"):
        R.dropout_schedule(1, 0.2, 4, kind="exp")


def test_mixup_kernel_layouts_and_grad(device):
    from tilefuse.fused.dropout import mixup_op

    perm = torch.tensor([2, 0, 3, 1, 4], device=device)
    for x in (torch.randn(5, 3, 4, 6, device=device),
              torch.randn(5, 3, 4, 6, device=device).to(memory_format=torch.channels_last),
              torch.randn(5, 7, 9, device=device)[:, ::2].transpose(1, 2)):
        x = x.requires_grad_()
        out = mixup_op(x, perm, 0.3)
        ref = torch.lerp(x.detach()[perm], x.detach(), 0.3)
        assert torch.allclose(out, ref, atol=1e-6) and out.stride() == torch.empty_like(x).stride()
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, g)
        xr = x.detach().requires_grad_()
        (gr,) = torch.autograd.grad(torch.lerp(xr[perm], xr, 0.3), xr, g)
        assert torch.allclose(gx, gr, atol=1e-6)
    h = torch.randn(5, 8, device=device, dtype=torch.bfloat16)
    assert torch.allclose(mixup_op(h, perm, 0.5).float(), torch.lerp(h[perm], h, 0.5).float(),
                          atol=1e-2)

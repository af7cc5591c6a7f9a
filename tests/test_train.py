"""tilefuse.train.step / fit: the loss falls and tracks eager torch; AMP, clipping, checkpointing
and bad arguments."""
import pytest
import torch
import torch.nn as nn

import tilefuse
from tilefuse import train


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(),
                         nn.Linear(16, 3))


def _data(steps, n=16):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, generator=g)
    for _ in range(steps):
        x = torch.randn(n, 8, generator=g)
        yield x, (x @ w).argmax(1)


def test_loss_falls_and_tracks_eager():
    """Patched model (Triton kernels in the interpreter) vs the eager model, same init."""
    ref = _mlp()
    fused = tilefuse.patch(ref)  # a deep copy with identical weights
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.5, momentum=0.9)
    lr, lf = [], []
    batch = next(_data(1, n=32))
    for _ in range(15):
        lr.append(train.step(ref, batch, opt_r).loss)
        lf.append(train.step(fused, batch, opt_f, grad_clip=100.0).loss)
    assert sum(lf[-3:]) < 0.5 * sum(lf[:3])
    for a, b in zip(lr, lf):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a))


def test_amp_scaler_clip_monitor_and_skip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    seen = []
    batch = next(_data(1))
    r = train.step(model, batch, opt, scaler=scaler, amp_dtype=torch.bfloat16, grad_clip=0.5,
                   monitor=seen.append)
    assert not r.skipped and r.scale == 2.0 ** 8 and seen == [r.grad_norm] and r.grad_norm > 0
    # an inf gradient: the scaler skips the step and lowers the scale
    before = [p.detach().clone() for p in model.parameters()]
    bad = (batch[0] * float("inf"), batch[1])
    r = train.step(model, bad, opt, scaler=scaler)
    assert r.skipped
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p, q)
    # without a scaler a non-finite grad norm also skips
    assert train.step(model, bad, opt).skipped


def test_checkpoint_and_dict_batches_and_fit(capsys):
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return self.net(x)

    a, b = Wrapped(), Wrapped()
    b.load_state_dict(a.state_dict())
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    x, y = next(_data(1))
    ra = train.step(a, {"x": x, "labels": y}, oa)
    rb = train.step(b, (x, y), ob, checkpoint=True)  # whole-forward recompute
    assert abs(ra.loss - rb.loss) < 1e-6
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    losses = train.fit(b, _data(5), ob, total=5, desc="t")
    assert len(losses) == 5


def test_bad_arguments():
    m, opt = nn.Linear(8, 3), None
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    batch = next(_data(1))
    with pytest.raises(TypeError, match="model"):
        train.step("m", batch, opt)
    with pytest.raises(ValueError, match="amp_dtype"):
        train.step(m, batch, opt, amp_dtype=torch.float64)
    with pytest.raises(ValueError, match="grad_clip"):
        train.step(m, batch, opt, grad_clip=0.0)
    with pytest.raises(TypeError, match="batch"):
        train.step(m, torch.randn(3, 8), opt)
    with pytest.raises(ValueError, match="batch"):
        train.step(m, (torch.randn(3, 8),), opt)


def test_amp_bf16_on_patched_models_interpreter():
    """Fused modules under autocast (the kernels run in the interpreter): finite loss, a step;
    then a checkpointed fp32 step. (A ResNet under bf16 autocast is left out: see the norm
    family's open question about intermittent NaN gradients of batch_norm_act in bf16.)"""
    import tilefuse.models as M

    model = M.text_classifier(vocab_size=32, dim=16, depth=1, heads=2, ffn=32)
    batch = (torch.randint(0, 32, (2, 5)), torch.tensor([0, 1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = next(model.parameters()).detach().clone()
    r = train.step(model, batch, opt, amp_dtype=torch.bfloat16)
    assert torch.isfinite(torch.tensor(r.loss)) and not r.skipped
    assert not torch.equal(before, next(model.parameters()))
    resnet = M.resnet18(3, width=0.0625)
    opt = torch.optim.SGD(resnet.parameters(), lr=0.01)
    r = train.step(resnet, (torch.randn(2, 3, 8, 8), torch.tensor([0, 2])), opt, checkpoint=True)
    assert not r.skipped and resnet.gradient_checkpointing

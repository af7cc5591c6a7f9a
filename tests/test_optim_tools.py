"""Grad clipping, fused max_grad_norm, GradScaler (AMP) interplay, GradNormMonitor, schedules."""
import math

import pytest
import torch

import tilefuse.optim as tfo
from utils import tiny_data, tiny_model


def _grads_like(shapes, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


@pytest.mark.parametrize("norm_type", [2.0, 1, math.inf, "inf", 3.0])
def test_clip_grad_norm_matches_torch(norm_type):
    shapes = [(17, 5), (3,), (1, 1), (0, 4), (4099,)]  # 4099: several chunks in one tensor
    pa = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    pb = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p, q, g in zip(pa, pb, _grads_like(shapes)):
        p.grad, q.grad = g.clone(), g.clone()
    pa[0].grad = pa[0].grad.t().contiguous().t()  # a column-major (dense, non-contiguous) grad
    nt = math.inf if norm_type == "inf" else norm_type
    na = tfo.clip_grad_norm_(pa, 0.5, norm_type)
    # torch cannot take the inf-norm of an empty tensor; ours skips it
    nb = torch.nn.utils.clip_grad_norm_([q for q in pb if q.numel()] if nt == math.inf else pb,
                                        0.5, nt)
    torch.testing.assert_close(na, nb, atol=1e-6, rtol=1e-5)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-5)


def test_clip_grad_norm_edge_cases():
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.full((5,), 0.1)
    n = tfo.clip_grad_norm_(p, 10.0)  # below max_norm: grads untouched
    assert torch.equal(p.grad, torch.full((5,), 0.1)) and abs(n.item() - 0.1 * 5 ** 0.5) < 1e-6
    assert tfo.clip_grad_norm_([torch.nn.Parameter(torch.zeros(2))], 1.0).item() == 0.0
    p.grad[1] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        tfo.clip_grad_norm_(p, 1.0, error_if_nonfinite=True)
    with pytest.raises(TypeError, match="max_norm"):
        tfo.clip_grad_norm_(p, "1.0")
    with pytest.raises(TypeError, match="norm_type"):
        tfo.clip_grad_norm_(p, 1.0, norm_type=None)


def test_step_max_grad_norm_fused():
    x, y = tiny_data()
    a, b = tiny_model(), tiny_model()
    oa, ob = tfo.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    for _ in range(4):
        for m in (a, b):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        oa.step(max_grad_norm=0.05)
        norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
        ob.step()
        torch.testing.assert_close(oa.last_grad_norm, norm, atol=1e-6, rtol=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="max_grad_norm"):
        oa.step(max_grad_norm=-1.0)


def _no_host_read(self):
    raise AssertionError("unexpected host read (.item()) in the optimizer step")


@pytest.mark.parametrize("name,kw,unscale_first", [
    ("SGD", dict(lr=0.05, momentum=0.9), False),   # no step counter: skip on device, no sync
    ("Adam", dict(lr=1e-2), True),                 # user unscales (e.g. to clip) first
    ("AdamW", dict(lr=1e-2), "clip"),              # fused step(max_grad_norm=) under AMP
])
def test_grad_scaler_unscale_and_inf_skip(name, kw, unscale_first, monkeypatch):
    x, y = tiny_data()
    a, b = tiny_model(), tiny_model()
    oa, ob = getattr(tfo, name)(a.parameters(), **kw), getattr(torch.optim, name)(b.parameters(),
                                                                                 **kw)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=100)
               for _ in range(2)]
    for step in range(6):
        for m, opt, sc in ((a, oa, scalers[0]), (b, ob, scalers[1])):
            opt.zero_grad()
            sc.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if step == 2:
                m[0].weight.grad[0, 0] = float("inf")
            if unscale_first == "clip":
                if opt is oa:
                    sc.step(opt, max_grad_norm=0.05)
                else:
                    sc.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
                    sc.step(opt)
                sc.update()
                continue
            if unscale_first:
                sc.unscale_(opt)
            if opt is oa and name == "SGD":  # the inf check happens on device: no .item()
                with monkeypatch.context() as mp:
                    mp.setattr(torch.Tensor, "item", _no_host_read)
                    sc.step(opt)
            else:
                sc.step(opt)
            sc.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0 ** 10
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    if name != "SGD":
        assert oa.state[a[0].weight]["step"].item() == ob.state[b[0].weight]["step"].item() == 5


def test_grad_norm_monitor_flags_layers():
    x, y = tiny_data()
    model = tiny_model()
    model.register_parameter("frozen_like", torch.nn.Parameter(torch.zeros(2)))  # never gets grad
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[0].bias.grad.zero_()
    model[2].weight.grad.mul_(1e6)
    monitor = tfo.GradNormMonitor(model, explode_threshold=100.0)
    report = monitor()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert abs(report.norms[name] - p.grad.norm().item()) <= 1e-5 * max(1, p.grad.norm())
    assert report.vanishing == ["0.bias"] and report.exploding == ["2.weight"]
    assert report.no_grad == ["frozen_like"]
    text = str(report)
    assert "VANISHING" in text and "EXPLODING" in text and "0.weight" in text
    logged = report.as_dict()
    assert set(logged) == {"grad_norm/0.weight", "grad_norm/0.bias", "grad_norm/2.weight",
                           "grad_norm/total"}
    with pytest.raises(ValueError, match="explode_threshold"):
        tfo.GradNormMonitor(model, explode_threshold=-1.0)


def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _opt(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_schedules_match_torch_and_formulas():
    o1, o2 = _opt(), _opt()
    ours = _lrs(tfo.one_cycle(o1, 30, pct_start=0.3), o1, 30)
    ref = _lrs(torch.optim.lr_scheduler.OneCycleLR(o2, max_lr=0.1, total_steps=30, pct_start=0.3,
                                                   cycle_momentum=False), o2, 30)
    assert max(abs(u - v) for u, v in zip(ours, ref)) < 1e-9
    o1, o2 = _opt(), _opt()
    assert _lrs(tfo.step_decay(o1, 4, 0.5), o1, 12) == pytest.approx(
        _lrs(torch.optim.lr_scheduler.StepLR(o2, 4, 0.5), o2, 12))
    f = tfo.warmup_cosine_lambda(10, 110, min_lr_ratio=0.1)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) == f(500)
    g = tfo.inverse_sqrt_warmup_lambda(4)
    assert g(3) == pytest.approx(1.0) and g(0) == pytest.approx(0.25)
    assert g(15) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        tfo.warmup_cosine_lambda(20, 10)
    with pytest.raises(ValueError, match="pct_start"):
        tfo.one_cycle_lambda(10, pct_start=1.5)
    with pytest.raises(ValueError, match="gamma"):
        tfo.step_decay_lambda(3, gamma=0.0)


@pytest.mark.cuda
def test_cuda_clip_and_monitor_and_scaler():
    """Compiled norm/scale kernels and the AMP path on GPU (200 tensors, multi-chunk)."""
    torch.manual_seed(0)
    shapes = [(513, 33), (4097,), (7,)] * 66 + [(1,), (3, 3)]
    pa = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    for p, q in zip(pa, pb):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    norms = tfo.GradNormMonitor(pa).norms()[1]
    torch.testing.assert_close(norms, torch.stack([p.grad.norm() for p in pb]), rtol=1e-5,
                               atol=1e-6)
    for nt in (2.0, math.inf):
        torch.testing.assert_close(tfo.clip_grad_norm_(pa, 1.0, nt),
                                   torch.nn.utils.clip_grad_norm_(pb, 1.0, nt), rtol=1e-5,
                                   atol=1e-6)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    oa, ob = tfo.SGD(pa, lr=0.1, momentum=0.9), torch.optim.SGD(pb, lr=0.1, momentum=0.9)
    sa, sb = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    oa.zero_grad()
    ob.zero_grad()
    for step in range(3):
        for ps, opt, sc in ((pa, oa, sa), (pb, ob, sb)):
            sc.scale(sum((p * p).sum() for p in ps[:6])).backward()
            if step == 1:
                ps[0].grad[0, 0] = float("nan")
            sc.step(opt)
            sc.update()
            opt.zero_grad()
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [32, 17])
def test_clip_grad_norm_aligned_and_unaligned_offsets(offset):
    """Gradients carved from one flat buffer at a 16-element multiple (aligned hint, unmasked
    full chunks) or an odd offset (no hint): the same norm and clipped grads as torch."""
    from tilefuse.optim.clip import clip_grad_norm_

    torch.manual_seed(0)
    flat = torch.randn(offset + 5000)
    ps = [torch.nn.Parameter(torch.zeros(offset)), torch.nn.Parameter(torch.zeros(5000))]
    ps[0].grad, ps[1].grad = flat[:offset].clone(), flat[offset:].clone()
    refs = [torch.nn.Parameter(torch.zeros_like(p)) for p in ps]
    for p, r in zip(ps, refs):
        r.grad = p.grad.clone()
    grads = torch.cat([flat[:offset], flat[offset:]])
    ps[0].grad, ps[1].grad = grads[:offset], grads[offset:]
    norm = clip_grad_norm_(ps, 1.0)
    ref = torch.nn.utils.clip_grad_norm_(refs, 1.0)
    torch.testing.assert_close(norm, ref)
    for p, r in zip(ps, refs):
        torch.testing.assert_close(p.grad, r.grad)

"""Fused optimizers: trajectories against torch.optim (interpreter lane), param groups, state_dict
interchange, layouts, dtypes and bad hyper-parameters."""
import copy

import pytest
import torch

import tilefuse.optim as tfo
from utils import assert_close_to_ref, steps_in_lockstep, tiny_data, tiny_model
from tilefuse.kernels import optim as K

STEPS = 20


def _train(model, opt, steps, x, y, sched=None):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _assert_same(a, b, atol=2e-6, rtol=1e-5):
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=rtol)


def _assert_same_state(oa, ob, atol=1e-5, rtol=1e-4):
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            torch.testing.assert_close(sa[k][name], sb[k][name], atol=atol, rtol=rtol)


CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.8, 0.99))),
    ("Adam", dict(lr=1e-2, maximize=True, decoupled_weight_decay=True, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, amsgrad=True, weight_decay=0.1, eps=1e-6)),
    ("RMSprop", dict(lr=1e-2, centered=True, momentum=0.5, weight_decay=1e-2, alpha=0.9)),
    ("RMSprop", dict(lr=1e-3, maximize=True)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-2,
                     maximize=True)),
]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_trajectory_matches_torch(name, kw):
    x, y = tiny_data()
    a, b = tiny_model(), tiny_model()
    oa, ob = getattr(tfo, name)(a.parameters(), **kw), getattr(torch.optim, name)(b.parameters(),
                                                                                 **kw)
    assert isinstance(oa, torch.optim.Optimizer) and isinstance(oa, getattr(torch.optim, name))
    _train(a, oa, STEPS, x, y)
    _train(b, ob, STEPS, x, y)
    _assert_same(a, b)
    _assert_same_state(oa, ob)


def _lion_reference(params, grads_seq, lr, betas, wd, maximize=False):
    params = [p.detach().clone().double() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    for grads in grads_seq:
        for p, m, g in zip(params, ms, grads):
            g = -g.double() if maximize else g.double()
            c = betas[0] * m + (1 - betas[0]) * g
            p.mul_(1 - lr * wd).add_(torch.sign(c), alpha=-lr)
            m.mul_(betas[1]).add_(g, alpha=1 - betas[1])
    return params


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1,
                                                    maximize=True)])
def test_lion_matches_paper_reference(kw):
    model = tiny_model()
    x, y = tiny_data()
    opt = tfo.Lion(model.parameters(), **kw)
    assert opt.defaults["betas"] == kw.get("betas", (0.9, 0.99))
    start = [p.detach().clone() for p in model.parameters()]
    grads_seq = []
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads_seq.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    ref = _lion_reference(start, grads_seq, kw["lr"], kw.get("betas", (0.9, 0.99)),
                          kw.get("weight_decay", 0.0), kw.get("maximize", False))
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.double(), r, atol=1e-6, rtol=1e-5)


def test_param_groups_one_launch_and_none_grads(monkeypatch):
    """Discriminative lrs: two groups with the same flags share one launch; None grads skipped."""
    calls = []
    real = K.launch_update
    monkeypatch.setattr(K, "launch_update", lambda *a, **k: (calls.append(1), real(*a, **k)))
    x, y = tiny_data()
    a, b = tiny_model(), tiny_model()
    unused_a = torch.nn.Parameter(torch.ones(3))
    unused_b = torch.nn.Parameter(torch.ones(3))

    def groups(m, unused):
        return [{"params": list(m[0].parameters()), "lr": 1e-3},
                {"params": list(m[2].parameters()) + [unused], "lr": 1e-2, "weight_decay": 0.5}]
    oa, ob = tfo.AdamW(groups(a, unused_a)), torch.optim.AdamW(groups(b, unused_b))
    _train(a, oa, 5, x, y)
    _train(b, ob, 5, x, y)
    assert len(calls) == 5
    _assert_same(a, b)
    assert unused_a not in oa.state and torch.equal(unused_a, torch.ones(3))


def test_scheduler_changes_lr_every_step():
    x, y = tiny_data()
    a, b = tiny_model(), tiny_model()
    oa, ob = tfo.AdamW(a.parameters(), lr=3e-2), torch.optim.AdamW(b.parameters(), lr=3e-2)
    sa, sb = tfo.warmup_cosine(oa, 5, STEPS), tfo.warmup_cosine(ob, 5, STEPS)
    _train(a, oa, STEPS, x, y, sa)
    _train(b, ob, STEPS, x, y, sb)
    _assert_same(a, b)
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]


@pytest.mark.parametrize("name,kw", [("AdamW", dict(lr=1e-2, amsgrad=True)),
                                     ("SGD", dict(lr=0.05, momentum=0.9))])
def test_state_dict_interchange(name, kw):
    """torch state -> ours -> continue, and ours -> torch -> continue, same trajectory."""
    x, y = tiny_data()
    ref, m1 = tiny_model(), tiny_model()
    oref = getattr(torch.optim, name)(ref.parameters(), **kw)
    o1 = getattr(torch.optim, name)(m1.parameters(), **kw)
    _train(ref, oref, 12, x, y)
    _train(m1, o1, 4, x, y)
    m2 = copy.deepcopy(m1)
    o2 = getattr(tfo, name)(m2.parameters(), **kw)
    o2.load_state_dict(o1.state_dict())
    _train(m2, o2, 4, x, y)
    m3 = copy.deepcopy(m2)
    o3 = getattr(torch.optim, name)(m3.parameters(), **kw)
    o3.load_state_dict(o2.state_dict())
    _train(m3, o3, 4, x, y)
    _assert_same(m3, ref)
    _assert_same_state(o3, oref)


def test_layouts_mixed_dtypes_and_empty():
    """Transposed (dense) and sliced (non-dense) params, an fp64 param and an empty param in one
    optimizer: buckets by dtype, strided copy only for the non-dense one."""
    torch.manual_seed(0)
    base = [torch.randn(5, 7).t(), torch.randn(6, 10)[:, ::3], torch.randn(4, dtype=torch.float64),
            torch.randn(0, 3), torch.randn(1), torch.randn(4099)]  # 4099: several chunks
    pa = [torch.nn.Parameter(t.clone(memory_format=torch.preserve_format)) for t in base]
    pa[1] = torch.nn.Parameter(base[1])  # keep the non-dense view itself
    pb = [torch.nn.Parameter(t.detach().clone()) for t in base]
    assert not pa[0].is_contiguous() and not pa[1].is_contiguous()
    oa = tfo.Adam(pa, lr=1e-2, weight_decay=0.1)
    ob = torch.optim.Adam(pb, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        for p, q in zip(pa, pb):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.grad = grad.clone() if p is not pa[0] else grad.t().contiguous().t()
            q.grad = grad.clone()
        oa.step()
        ob.step()
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    assert oa.state[pa[3]]["step"].item() == 6


def test_master_weights_bf16():
    """bf16 params with fp32 master copy: the master follows fp32 torch Adam on the same grads."""
    torch.manual_seed(0)
    w = torch.randn(33, 5)
    p = torch.nn.Parameter(w.to(torch.bfloat16))
    q = torch.nn.Parameter(p.detach().float())
    oa = tfo.Adam([p], lr=1e-2, master_weights=True)
    ob = torch.optim.Adam([q], lr=1e-2)
    g = torch.Generator().manual_seed(4)
    for _ in range(8):
        grad = torch.randn(33, 5, generator=g).to(torch.bfloat16)
        p.grad, q.grad = grad, grad.float()
        oa.step()
        ob.step()
    master = oa.state[p]["master_param"]
    assert master.dtype == torch.float32 and oa.state[p]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(master, q.detach(), atol=2e-6, rtol=1e-5)
    # the param is the master rounded to bf16 (within 1 ulp: the interpreter truncates the cast)
    torch.testing.assert_close(p.detach().float(), master, atol=1e-6, rtol=2 ** -7)


def test_master_weights_torch_path_matches(monkeypatch):
    """The torch reference path steps the fp32 master too (then rounds into the param)."""
    torch.manual_seed(0)
    w = torch.randn(4, 9)
    ps = [torch.nn.Parameter(w.to(torch.bfloat16)) for _ in range(2)]
    opts = [tfo.AdamW([p], lr=1e-2, master_weights=True) for p in ps]
    g = torch.Generator().manual_seed(6)
    for _ in range(4):
        grad = torch.randn(4, 9, generator=g).to(torch.bfloat16)
        ps[0].grad, ps[1].grad = grad, grad.clone()
        opts[0].step()
        monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
        opts[1].step()
        monkeypatch.delenv("TILEFUSE_BACKEND")
    m0, m1 = (o.state[p]["master_param"] for o, p in zip(opts, ps))
    torch.testing.assert_close(m0, m1, atol=2e-6, rtol=1e-5)
    assert ps[1].dtype == torch.bfloat16 and torch.equal(ps[1].detach(), m1.to(torch.bfloat16))
    assert opts[1].state[ps[1]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_params_accuracy_vs_fp64(dtype):
    """Low-precision params (no master copy): the fused update computes in fp32 and rounds once,
    so its error vs an fp64 run is no worse than torch's own in the same dtype."""
    torch.manual_seed(0)
    w = torch.randn(67)
    ps = {d: torch.nn.Parameter(w.to(dtype).to(d)) for d in (dtype, torch.float64)}
    eager = torch.nn.Parameter(w.to(dtype))
    ours = tfo.AdamW([ps[dtype]], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([ps[torch.float64]], lr=1e-2, weight_decay=0.1)
    teager = torch.optim.AdamW([eager], lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        grad = torch.randn(67, generator=g).to(dtype)
        ps[dtype].grad, eager.grad = grad, grad.clone()
        ps[torch.float64].grad = grad.double()
        for o in (ours, ref, teager):
            o.step()
    assert ours.state[ps[dtype]]["exp_avg"].dtype == dtype
    assert_close_to_ref(ps[dtype].detach(), ps[torch.float64].detach(), eager.detach(),
                        factor=1.5, name="param")


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion"])
def test_bad_hyperparameters_raise_like_torch(name):
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        getattr(tfo, name)(p, lr=-1.0)
    if name in ("Adam", "AdamW", "Lion"):
        for betas in ((1.0, 0.9), (0.9, -0.1)):
            with pytest.raises(ValueError, match="Invalid beta parameter"):
                getattr(tfo, name)(p, betas=betas)


def test_sparse_grads_follow_torch():
    emb_a = torch.nn.Embedding(10, 3, sparse=True)
    emb_b = copy.deepcopy(emb_a)
    oa, ob = tfo.SGD(emb_a.parameters(), lr=0.1), torch.optim.SGD(emb_b.parameters(), lr=0.1)
    idx = torch.tensor([1, 4, 4])
    for emb, opt in ((emb_a, oa), (emb_b, ob)):
        emb(idx).sum().backward()
        opt.step()
    torch.testing.assert_close(emb_a.weight, emb_b.weight)
    with pytest.raises(RuntimeError, match="sparse"):
        tfo.Adam(emb_a.parameters()).step()


def test_torch_backend_path_matches(monkeypatch):
    """TILEFUSE_BACKEND=torch runs the reference step (torch's own for torch-named classes)."""
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    x, y = tiny_data()
    a, b = tiny_model(), tiny_model()
    oa, ob = tfo.Lion(a.parameters(), lr=1e-2), tfo.Adam(b.parameters(), lr=1e-2)
    _train(a, oa, 3, x, y)
    _train(b, ob, 3, x, y)
    monkeypatch.delenv("TILEFUSE_BACKEND")
    c = tiny_model()
    oc = tfo.Lion(c.parameters(), lr=1e-2)
    _train(c, oc, 3, x, y)
    _assert_same(a, c)


@pytest.mark.cuda
@pytest.mark.parametrize("name,kw", [("AdamW", dict(lr=1e-3, amsgrad=True)),
                                     ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
                                     ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5)),
                                     ("Adagrad", dict(lr=1e-2, lr_decay=1e-3))])
def test_cuda_trajectory_matches_torch(name, kw):
    """Compiled kernels on GPU: 20 steps over 40 tensors (several chunks each) vs torch."""
    torch.manual_seed(0)
    shapes = [(300, 70), (70,), (5, 3, 3), (4097,)] * 10
    pa = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    oa, ob = getattr(tfo, name)(pa, **kw), getattr(torch.optim, name)(pb, **kw)
    steps_in_lockstep(pa, pb, oa, ob, n=STEPS)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "RMSprop"])
def test_aligned_tail_loads_ignore_neighbours(name):
    """ALIGNED buckets load a tensor's last chunk in whole 16-byte groups (128-bit tail loads):
    the lanes past its end read the neighbouring memory. Params and grads that are views of one
    buffer at 16-element offsets with odd sizes, NaN between them: the update still matches
    torch (no NaN leaks in) and the NaN gaps are never written."""
    torch.manual_seed(0)
    sizes, stride = (5, 19, 3, 33), 48
    flat_p = torch.full((stride * len(sizes),), float("nan"))
    flat_g = torch.full_like(flat_p, float("nan"))
    pa, pb = [], []
    for i, n in enumerate(sizes):
        v = flat_p[i * stride:i * stride + n]
        v.copy_(torch.randn(n))
        pa.append(torch.nn.Parameter(v))
        pb.append(torch.nn.Parameter(v.detach().clone()))
    kw = dict(lr=1e-2, momentum=0.9) if name != "AdamW" else dict(lr=1e-2, weight_decay=0.1)
    oa, ob = getattr(tfo, name)(pa, **kw), getattr(torch.optim, name)(pb, **kw)
    for _ in range(3):
        for i, (p, q) in enumerate(zip(pa, pb)):
            g = flat_g[i * stride:i * stride + p.numel()]
            g.copy_(torch.randn(p.numel()))
            p.grad, q.grad = g, g.clone()
        oa.step()
        ob.step()
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)  # as _assert_same
    gaps = torch.ones_like(flat_p, dtype=torch.bool)
    for i, n in enumerate(sizes):
        gaps[i * stride:i * stride + n] = False
    assert flat_p[gaps].isnan().all()

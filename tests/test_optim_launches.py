"""Host side of the fused optimizer step: launches per step, the cached plan and what rebuilds it.

After the first step, one step of a param group is at most 3 launches in total, counting Triton
kernels and torch ops (allocations and views are free); on the CPU lane it is 1 kernel and 0 ops.
The plan (tables, scalar rows) is reused across steps, follows LR schedulers without a rebuild,
and is rebuilt when the param set, a gradient's presence / layout, a param's storage or the state
change -- each checked here against torch doing the same thing."""
import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tilefuse.optim as tfo
from tilefuse.kernels import optim as K
from utils import steps_in_lockstep

# allocations, aliases and the profiler markers torch's Optimizer.step wrapper records
_FREE = ("empty", "_reshape_alias", "lift_fresh", "detach", "alias", "_record_function")


class _Ops(TorchDispatchMode):
    """Records the torch ops run outside Triton launches (allocations and views are free)."""

    def __init__(self):
        super().__init__()
        self.kernels, self.ops, self.inside = 0, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside and not func.is_view and not name.startswith(_FREE):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches(monkeypatch):
    """Yields an object with ``kernels`` (Triton launches) and ``ops`` (other torch ops)."""
    mode = _Ops()
    cls = type(K.adam_kernel)  # InterpretedFunction in the CPU lane, JITFunction on a GPU
    real = cls.run

    def run(kernel, *args, **kwargs):
        mode.kernels += 1
        mode.inside += 1
        try:
            return real(kernel, *args, **kwargs)
        finally:
            mode.inside -= 1
    with monkeypatch.context() as mp:
        mp.setattr(cls, "run", run)
        with mode:
            yield mode


def _no_item(self):
    raise AssertionError("host read (.item()) in the optimizer step")


OPTIMIZERS = [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("RMSprop", dict(lr=1e-2, centered=True, momentum=0.5)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
]


def _params(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (1,), (4, 2, 2)]
    return [torch.nn.Parameter(torch.randn(shapes[i % 4], generator=g)) for i in range(n)]


def _set_grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("name,kw", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp"])
def test_one_group_step_is_at_most_3_launches(name, kw, amp, monkeypatch):
    """Also under GradScaler (grad_scale + found_inf on the device): no host read, no extra op."""
    ps = _params()
    opt = getattr(tfo, name)(ps, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)  # lr changes every step
    for step in range(4):
        _set_grads(ps, step)  # new gradient tensors every step, as zero_grad(set_to_none=True)
        if amp:
            opt.grad_scale = torch.tensor(4.0)
            opt.found_inf = torch.tensor(float(step == 3))
        if step < 2:  # the first steps build the plan (SGD: its first momentum step too)
            opt.step()
        else:
            with monkeypatch.context() as mp:
                mp.setattr(torch.Tensor, "item", _no_item)
                with count_launches(mp) as count:
                    opt.step()
            assert count.kernels == 1, count.kernels
            assert count.kernels + len(count.ops) <= 3, count.ops
            assert count.ops == [], count.ops  # on the CPU the kernel reads the host table
        sched.step()


def test_two_groups_share_one_launch_and_follow_schedulers(monkeypatch):
    """Two groups (different lr / weight decay), a scheduler per step: one launch per step, the
    plan is reused (no rebuild) and the trajectory is torch's."""
    pa, pb = _params(8), _params(8)

    def groups(ps):
        return [{"params": ps[:4], "lr": 1e-2}, {"params": ps[4:], "lr": 3e-2, "weight_decay": 0.5}]
    oa, ob = tfo.AdamW(groups(pa)), torch.optim.AdamW(groups(pb))
    sa = tfo.warmup_cosine(oa, 2, 8)
    sb = tfo.warmup_cosine(ob, 2, 8)
    plans = []
    for step in range(8):
        _set_grads(pa, step)
        _set_grads(pb, step)
        with count_launches(monkeypatch) as count:
            oa.step()
        ob.step()
        sa.step()
        sb.step()
        plans.append(oa._tf_plan)
        assert count.kernels == 1
    assert all(p is plans[0] for p in plans)  # built once
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)


def test_betas_and_lr_from_one_cycle_follow_without_rebuild():
    """OneCycleLR(cycle_momentum=True) rewrites lr and betas[0] before every step: the scalar rows
    follow (bias corrections from the current beta1, as torch), the plan stays."""
    pa, pb = _params(), _params()
    oa, ob = tfo.Adam(pa, lr=1e-2), torch.optim.Adam(pb, lr=1e-2)
    sa, sb = (torch.optim.lr_scheduler.OneCycleLR(o, max_lr=5e-2, total_steps=10, base_momentum=0.8)
              for o in (oa, ob))
    plans = set()
    for step in range(8):
        _set_grads(pa, step)
        _set_grads(pb, step)
        oa.step()
        ob.step()
        sa.step()
        sb.step()
        plans.add(id(oa._tf_plan))
    assert len(plans) == 1 and oa.param_groups[0]["betas"][0] != 0.9
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)


def _lockstep(oa, ob, pa, pb, steps, seed, edit=None):
    """``steps`` steps of both optimizers on the same gradients; ``edit(opt, params)`` is applied
    to both before the first; returns whether ``oa`` kept its plan."""
    if edit is not None:
        edit(oa, pa)
        edit(ob, pb)
    plan = oa.__dict__.get("_tf_plan")
    steps_in_lockstep(pa, pb, oa, ob, n=steps, seed=seed)
    return oa._tf_plan is plan


def _pair(name="AdamW", n=6, **kw):
    pa, pb = _params(n), _params(n)
    kw = kw or dict(lr=1e-2, weight_decay=0.1)
    return getattr(tfo, name)(pa, **kw), getattr(torch.optim, name)(pb, **kw), pa, pb


def _assert_same(oa, ob, pa, pb):
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            torch.testing.assert_close(sa[k][name], sb[k][name], atol=1e-5, rtol=1e-4)


STATELESS = dict(lr=0.1)  # SGD without momentum: params without any state entry


@pytest.mark.parametrize("name,kw", [("AdamW", {}), ("SGD", STATELESS)], ids=["AdamW", "SGD"])
def test_plan_kept_while_nothing_changes(name, kw):
    oa, ob, pa, pb = _pair(name, **kw)
    _lockstep(oa, ob, pa, pb, 2, seed=1)
    assert _lockstep(oa, ob, pa, pb, 3, seed=2)
    _assert_same(oa, ob, pa, pb)


def _add_group(opt, ps):
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 9))
    ps.append(extra)
    opt.add_param_group({"params": [extra], "lr": 5e-2})


def _grad_none(opt, ps):
    ps[1].grad = None  # stays None: steps_in_lockstep sets grads only for the params it gets


def _replace_state(opt, ps):
    st = opt.state[ps[0]]
    st["exp_avg"] = st["exp_avg"] * 0.5  # a new tensor in the state
    del opt.state[ps[2]]                  # a param's state dropped: torch starts it afresh


def _new_storage(opt, ps):
    ps[3].data = ps[3].data.clone()       # same Parameter, new storage


def _swap_param(opt, ps):
    new = torch.nn.Parameter(ps[2].detach() * 2)
    opt.state.pop(ps[2], None)  # (torch's state_dict() needs every state key in a group)
    opt.param_groups[0]["params"][2] = ps[2] = new  # same list, same length, a new param


def _load_state(opt, ps):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


@pytest.mark.parametrize("edit", [_add_group, _replace_state, _new_storage, _swap_param,
                                  _load_state],
                         ids=["add_param_group", "replaced_state", "new_storage", "swapped_param",
                              "load_state"])
def test_changes_rebuild_the_plan(edit):
    oa, ob, pa, pb = _pair()
    _lockstep(oa, ob, pa, pb, 2, seed=1)
    assert not _lockstep(oa, ob, pa, pb, 1, seed=2, edit=edit)
    assert _lockstep(oa, ob, pa, pb, 2, seed=3)  # stable again after the rebuild
    _assert_same(oa, ob, pa, pb)


def test_swapped_param_without_state_rebuilds():
    oa, ob, pa, pb = _pair("SGD", **STATELESS)
    _lockstep(oa, ob, pa, pb, 2, seed=1)
    assert not _lockstep(oa, ob, pa, pb, 1, seed=2, edit=_swap_param)
    _assert_same(oa, ob, pa, pb)


def test_grad_none_skips_the_param_and_its_step():
    oa, ob, pa, pb = _pair()
    _lockstep(oa, ob, pa, pb, 2, seed=1)
    held = pa.pop(1), pb.pop(1)  # no gradient from now on
    for p in held:
        p.grad = None
    before = held[0].detach().clone()
    _lockstep(oa, ob, pa, pb, 3, seed=2)
    assert torch.equal(held[0], before) and torch.equal(held[0], held[1])
    assert oa.state[held[0]]["step"].item() == ob.state[held[1]]["step"].item() == 2
    pa.insert(1, held[0])
    pb.insert(1, held[1])
    _lockstep(oa, ob, pa, pb, 2, seed=3)  # the gradient comes back: updated again
    _assert_same(oa, ob, pa, pb)


def test_grad_layout_change_takes_the_copy_path():
    """A transposed gradient for a contiguous param: the plan is rebuilt with a copy item."""
    oa, ob, pa, pb = _pair("Adam", n=4, lr=1e-2)
    _lockstep(oa, ob, pa, pb, 2, seed=1)
    g = torch.randn(3, 5)
    pa[0].grad, pb[0].grad = g.t(), g.t().contiguous()  # same values, column-major for ours
    for p, q in zip(pa[1:], pb[1:]):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    oa.step()
    ob.step()
    _assert_same(oa, ob, pa, pb)


@pytest.mark.parametrize("name,kw", OPTIMIZERS[:2] + OPTIMIZERS[3:5],
                         ids=[n for n, _ in OPTIMIZERS[:2] + OPTIMIZERS[3:5]])
def test_found_inf_skips_on_device_and_keeps_the_step(name, kw, monkeypatch):
    """The step counter stays put on a skipped step (no host read): later steps match torch."""
    oa, ob, pa, pb = _pair(name, n=4, **kw)
    for step in range(5):
        _set_grads(pa, step)
        _set_grads(pb, step)
        oa.found_inf = torch.tensor(1.0 if step == 2 else 0.0)
        with monkeypatch.context() as mp:
            mp.setattr(torch.Tensor, "item", _no_item)
            oa.step()
        if step != 2:
            ob.step()
    del oa.found_inf
    _assert_same(oa, ob, pa, pb)


@pytest.mark.parametrize("offset,aligned", [(32, True), (17, False)])
def test_alignment_hint_only_for_aligned_offsets(offset, aligned, monkeypatch):
    """Params carved from one flat buffer: at 16-element multiples the table is ``aligned``
    (the kernels hint tl.multiple_of and vectorize), at an odd offset it is not; both match
    torch's AdamW. Chunks both full (unmasked) and partial (masked tail) run."""
    seen = []
    run = K.launch_update

    def spy(kernel, table, *a, **kw):
        seen.append(table.aligned)
        return run(kernel, table, *a, **kw)

    monkeypatch.setattr(K, "launch_update", spy)
    flat = torch.randn(offset + 40)
    ps = [torch.nn.Parameter(flat[:offset]), torch.nn.Parameter(flat[offset:offset + 40])]
    refs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = tfo.AdamW(ps, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(refs, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        for p, r in zip(ps, refs):
            g = torch.randn_like(p)
            p.grad, r.grad = g.clone(), g
        opt.step()
        ref.step()
    assert seen and all(s is aligned for s in seen)
    for p, r in zip(ps, refs):  # (1 ulp from torch's CPU loop, as before the hint)
        torch.testing.assert_close(p, r)

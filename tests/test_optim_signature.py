"""Constructor signatures of the torch-named optimizers mirror torch's, and the torch options the
fused step cannot honour itself (foreach, fused, differentiable, capturable) behave as in torch."""
import inspect

import pytest
import torch

import tilefuse.optim as tfo
import tilefuse.optim.optimizers as optimizers
from utils import steps_in_lockstep
from tilefuse._backend import backend_for_device

NAMES = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"]
# keywords of torch 2.13 that an older installed torch may lack (accepted, not forwarded)
NEWER = {"Adam": {"decoupled_weight_decay"}}


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_torch_plus_master_weights(name):
    ours = inspect.signature(getattr(tfo, name))
    ref = inspect.signature(getattr(torch.optim, name))
    params = list(ours.parameters.values())
    last = params[-1]
    assert (last.name, last.kind, last.default) == (
        "master_weights", inspect.Parameter.KEYWORD_ONLY, False)
    extra = set(ours.parameters) - set(ref.parameters) - {"master_weights"}
    assert extra <= NEWER.get(name, set()), extra  # empty on torch 2.13
    # same names, order, kinds and defaults as the running torch's class (annotations are
    # spelled as torch 2.13 spells them; other torch versions may write them differently)
    def shape(ps):
        return [(p.name, p.kind, p.default) for p in ps]

    assert shape(p for p in params[:-1] if p.name in ref.parameters) == \
        shape(ref.parameters.values())
    # the __init__ itself (help(), IDEs) shows it too, after self
    init = list(inspect.signature(getattr(tfo, name).__init__).parameters.values())
    assert init[0].name == "self" and init[1:] == params


@pytest.mark.parametrize("name", NAMES)
def test_positional_arguments_follow_torch(name):
    """Positional arguments land where torch puts them."""
    ref = inspect.signature(getattr(torch.optim, name))
    positional = [p for p in ref.parameters.values()
                  if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "params"]
    values = {"lr": 0.5, "betas": (0.8, 0.9), "eps": 1e-5, "weight_decay": 0.25, "amsgrad": True,
              "momentum": 0.5, "dampening": 0.125, "nesterov": False, "alpha": 0.75,
              "centered": True, "capturable": False, "foreach": False, "maximize": True,
              "differentiable": False, "lr_decay": 0.5, "initial_accumulator_value": 0.5}
    args = [values[p.name] for p in positional]
    opt = getattr(tfo, name)([torch.nn.Parameter(torch.zeros(2))], *args)
    group = opt.param_groups[0]
    for p, v in zip(positional, args):
        assert group[p.name] == v, p.name


def test_keyword_missing_from_older_torch(monkeypatch):
    """On a torch whose class lacks a newer keyword, its default is dropped, a non-default value
    raises a ValueError naming it."""
    real = torch.optim.Adam.__init__
    seen = {}

    def old_init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None):
        seen.update(lr=lr, maximize=maximize)
        real(self, params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
             maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused)

    monkeypatch.setattr(torch.optim.Adam, "__init__", old_init)
    optimizers._init_params.cache_clear()
    try:
        p = [torch.nn.Parameter(torch.zeros(2))]
        tfo.Adam(p, 0.5, maximize=True, decoupled_weight_decay=False)
        assert seen == dict(lr=0.5, maximize=True)
        with pytest.raises(ValueError, match="decoupled_weight_decay=True"):
            tfo.Adam(p, decoupled_weight_decay=True)
    finally:
        optimizers._init_params.cache_clear()


def _pair(name, **kw):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(37))
    b = torch.nn.Parameter(a.detach().clone())
    return a, b, getattr(tfo, name)([a], lr=1e-2, **kw), getattr(torch.optim, name)([b], lr=1e-2,
                                                                                      **kw)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("option", [dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_fused_and_foreach_accepted(name, option):
    """``fused``/``foreach`` pick torch's implementation; ours is fused anyway: same result (torch's
    TypeError where its class has no such keyword)."""
    if next(iter(option)) not in inspect.signature(getattr(torch.optim, name)).parameters:
        with pytest.raises(TypeError, match=next(iter(option))):
            getattr(tfo, name)([torch.nn.Parameter(torch.zeros(2))], **option)
        return
    a, b, oa, ob = _pair(name, **option)
    steps_in_lockstep([a], [b], oa, ob)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_matches_torch(name):
    """differentiable=True runs torch's own step: the update is differentiable, as in torch."""
    outs = []
    for mod in (tfo, torch.optim):
        torch.manual_seed(0)
        w = torch.randn(6, dtype=torch.float64, requires_grad=True)
        p = w * 1.5  # non-leaf param, as the differentiable use case needs
        opt = getattr(mod, name)([p], lr=0.1, differentiable=True)
        for _ in range(2):
            p.grad = torch.full_like(p, 0.3)
            opt.step()
        outs.append((p.detach().clone(), torch.autograd.grad((p * p).sum(), w)[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_capturable_on_cpu(name):
    """torch has no capturable mode on the CPU (its step raises). The interpreter lane keeps the
    fused step (same values as torch's non-capturable step); the plain torch path raises as
    torch does."""
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.ones(5)
    opt = getattr(tfo, name)([p], capturable=True)
    if backend_for_device("cpu") == "torch":
        with pytest.raises(AssertionError, match="capturable"):
            opt.step()
        return
    a, b, oa, _ = _pair(name, capturable=True)
    ob = getattr(torch.optim, name)([b], lr=1e-2)
    steps_in_lockstep([a], [b], oa, ob)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_cuda_capturable_runs_torch_step(name):
    """capturable=True on the GPU runs torch's own (capturable) step: device step counters."""
    torch.manual_seed(0)
    pa = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(30, 7), (7,)]]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    oa = getattr(tfo, name)(pa, lr=1e-2, capturable=True)
    ob = getattr(torch.optim, name)(pb, lr=1e-2, capturable=True)
    steps_in_lockstep(pa, pb, oa, ob, n=5)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q)
        assert oa.state[p]["step"].device.type == "cuda"

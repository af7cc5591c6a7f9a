"""Randomized (hypothesis) differential tests of tilefuse under the two PyTorch execution modes
the other fuzzers do not cover:

* ``tilefuse.patch`` under ``torch.autocast("cpu", dtype=torch.bfloat16)``: the patched model's
  output (same dtype as the unpatched model's under the same autocast), its parameter gradients
  and BN running statistics vs an fp64 run, within a tolerance tied to the *unpatched* autocast
  model's own error against fp64.
* ``torch.compile(fullgraph=True)`` of ``tilefuse.nn`` modules (Linear with an activation,
  LayerNormAct / RMSNormAct, BatchNormAct2d in train and eval, GroupNormAct, Dropout in eval,
  DepthwiseConv2d): compiled == eager (output, input and parameter gradients, running stats).
  The fast lane compiles with ``backend="aot_eager"`` (dynamo + AOT autograd: the graph capture,
  fake tensors and autograd registrations of the custom ops); the slow lane with inductor, whose
  first compile in a fresh process takes ~25 s on a 2-core CPU (cold caches), over the fast
  lane's budget.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402
from fuzz_models import ACTS, random_model, randomize  # noqa: E402
from fuzz_utils import check, eps, fuzz, randn, seed  # noqa: E402

import tilefuse  # noqa: E402
from tilefuse._backend import backend_for_device  # noqa: E402

pytestmark = pytest.mark.skipif(backend_for_device("cpu") != "triton",
                                reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")


def _amp():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _amp_check(name, got, ref64, eager):
    """``check`` with the floor of its tolerance at 2 bf16 ulps of the magnitude even for fp32
    tensors (gradients, running statistics): they are sums of bf16-rounded activations, and a
    few-element average (a running mean per channel) can have an eager error that is small by
    luck, so 4x eager's error alone is not a bound there."""
    check(name, got, ref64, eager, cond=eps(torch.bfloat16) / eps(got.dtype))


# --------------------------------------------------------------------------------------------
# patch under autocast
# --------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:tilefuse.*patched in eval mode")
@fuzz(4, 100)
def test_fuzz_patch_under_autocast(data):
    g = seed(data)
    model, x = random_model(data, g)
    train = data.draw(st.booleans(), label="train")
    model.train(train)
    ref64 = copy.deepcopy(model).double()
    plain = copy.deepcopy(model)
    fused = tilefuse.patch(model)
    xp, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with _amp():
        yp = plain(xp)
        yf = fused(xf)
    x64 = x.double().requires_grad_(True)
    y64 = ref64(x64)
    assert yf.dtype == yp.dtype, f"patched output {yf.dtype}, unpatched {yp.dtype}"
    _amp_check("patched forward under autocast", yf, y64, yp)
    if not train:
        return
    dy = randn(g, yf.shape, yf.dtype)
    names = [n for n, _ in plain.named_parameters()]
    assert names == [n for n, _ in fused.named_parameters()]
    gp = torch.autograd.grad(yp, [xp] + list(plain.parameters()), dy)
    gf = torch.autograd.grad(yf, [xf] + list(fused.parameters()), dy)
    g64 = torch.autograd.grad(y64, [x64] + list(ref64.parameters()), dy.double())
    for n, a, b, e in zip(["input"] + names, gf, g64, gp):
        _amp_check(f"patched grad {n} under autocast", a, b, e)
    sp, sf, s64 = plain.state_dict(), fused.state_dict(), ref64.state_dict()
    for k in sp:
        if "running" in k:   # BN statistics: updated from the autocast activations
            _amp_check(f"patched {k} under autocast", sf[k], s64[k], sp[k])
        elif not sp[k].is_floating_point():
            assert torch.equal(sf[k], sp[k]), k


# --------------------------------------------------------------------------------------------
# torch.compile of tilefuse.nn modules
# --------------------------------------------------------------------------------------------
def _compile_case(data, g):
    """(tilefuse module, input shape, train) drawn from the module families."""
    which = data.draw(st.sampled_from(["linear", "ln", "rms", "bn2d", "gn", "dropout", "dw"]),
                      label="module")
    act = data.draw(st.sampled_from(ACTS), label="act")[0]
    if which == "linear":
        K, N = data.draw(st.sampled_from([(8, 4), (5, 9), (16, 16)]), label="K,N")
        bias = data.draw(st.booleans(), label="bias")
        return tilefuse.nn.Linear(K, N, bias=bias, activation=act), (3, K), True
    if which in ("ln", "rms"):
        D = data.draw(st.sampled_from([4, 7, 16]), label="D")
        cls = tilefuse.nn.LayerNormAct if which == "ln" else tilefuse.nn.RMSNormAct
        return cls(D, activation=act), (2, 3, D), True
    if which == "bn2d":
        train = data.draw(st.booleans(), label="train")
        m = tilefuse.nn.BatchNormAct2d(4, activation=act,
                                       momentum=data.draw(st.sampled_from([0.1, None]),
                                                          label="momentum"))
        return m, (3, 4, 3, 2), train
    if which == "gn":
        G = data.draw(st.sampled_from([1, 2, 4]), label="G")
        return tilefuse.nn.GroupNormAct(G, 4, activation=act), (2, 4, 3, 3), True
    if which == "dropout":
        return tilefuse.nn.Dropout(data.draw(st.sampled_from([0.1, 0.5]), label="p")), \
            (4, 5), False
    k = data.draw(st.sampled_from([1, 3]), label="k")
    mult = data.draw(st.sampled_from([1, 2]), label="multiplier")
    return tilefuse.nn.DepthwiseConv2d(3, 3 * mult, k, padding=k // 2, activation=act), \
        (2, 3, 5, 4), True


def _same(name, a, b):
    """Compiled vs eager: the same custom ops run the same kernels, glue may be fused
    differently (inductor): a couple of ulps of the magnitude."""
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    lim = 4 * eps(a.dtype) * max(1.0, b.detach().abs().max().item())
    err = (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0
    assert err <= lim, f"{name}: compiled vs eager max error {err:.3e} > {lim:.3e}"


@fuzz(2, 40, fast_kw=dict(backend="aot_eager"), slow_kw=dict(backend="inductor"))
def test_fuzz_compile_modules(data, backend):
    g = seed(data)
    eager, shape, train = _compile_case(data, g)
    randomize(eager, g)
    eager.train(train)
    torch._dynamo.reset()   # a fresh cache per example: no recompile limit across examples
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True, backend=backend)
    for step in range(2):   # the second call reuses the graph (BN: updated running stats)
        x = randn(g, shape)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = eager(xe), compiled(xc)
        _same(f"{type(eager).__name__} forward {step}", yc, ye)
        if not ye.requires_grad:   # Dropout in eval: the input itself
            continue
        dy = randn(g, ye.shape)
        ge = torch.autograd.grad(ye, [xe] + list(eager.parameters()), dy)
        gc = torch.autograd.grad(yc, [xc] + list(compiled_mod.parameters()), dy)
        for i, (a, b) in enumerate(zip(gc, ge)):
            _same(f"{type(eager).__name__} grad {i} step {step}", a, b)
    for (k, a), b in zip(compiled_mod.state_dict().items(), eager.state_dict().values()):
        if a.is_floating_point():
            _same(f"state {k}", a, b)
        else:
            assert torch.equal(a, b), k
    if isinstance(eager, nn.Dropout):   # eval: identity, compiled too
        x = randn(g, shape)
        assert torch.equal(compiled(x), x)

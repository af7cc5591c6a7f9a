"""Randomized (hypothesis) differential tests of the inference transforms:

* ``Int8Conv1x1`` / ``Int8Linear`` (``Int8Conv2d``: tests/test_int8_conv.py): against an fp64
  reference built from the *same* int8 operands (the int8 weight, and in W8A8 the quantized
  activation, itself checked against an fp64 quantizer): W8A8's integer accumulation is exact
  (a one-step error is ~1e-5 relative, the tolerance a few fp32 ulps tied to eager torch
  computing the same epilogue), weight-only
  matches the dequantized float layer within eager torch's own error.
* ``tilefuse.quantize`` on random small MLPs / CNNs (optionally ``tilefuse.patch``-ed first):
  which modules are replaced or skipped, every int8 layer vs its fp64 reference, weight-only
  end to end vs the float model with dequantized weights, the report's sizes (real
  ``torch.save`` bytes), deviations and argmax agreement recomputed, the original untouched.
* ``fold_batchnorm`` / ``fuse_conv_bn_eval``: folded conv == ``bn(conv(x))`` in eval vs fp64 for
  random shapes, groups (depthwise included), bias / no bias, affine / non-affine BN.

Lanes as in test_fuzz_modules.py: a few deterministic examples by default, many under ``-m slow``.
"""
from __future__ import annotations

import copy
import fnmatch
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402
from fuzz_models import ACTS, random_model, randomize  # noqa: E402
from fuzz_utils import check, fuzz, randn, seed  # noqa: E402

import tilefuse  # noqa: E402
from tilefuse._backend import backend_for_device  # noqa: E402
from tilefuse.activations import activation_module  # noqa: E402
from tilefuse.nn import (Int8Conv1x1, Int8Conv2d, Int8Linear, fold_batchnorm,  # noqa: E402
                         fuse_conv_bn_eval)

pytestmark = pytest.mark.skipif(backend_for_device("cpu") != "triton",
                                reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")


# --------------------------------------------------------------------------------------------
# int8 references
# --------------------------------------------------------------------------------------------
def _quantize_rows64(x):
    """The documented quantizer in fp64: scale = absmax / 127, q = round-half-away(x / scale)."""
    x = x.double()
    amax = x.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 127, 1.0)
    v = x / s
    return torch.where(v >= 0, torch.floor(v + 0.5), torch.ceil(v - 0.5)).clamp(-127, 127), s


def check_int8_layer(name, q: Int8Linear, x, out):
    """``out`` = ``q(x)`` vs fp64 from the same int8 operands (W8A8: the exact int64 product of
    the quantized activation and weight), tolerance tied to eager torch on the same epilogue."""
    assert out.dtype == x.dtype and out.shape == x.shape[:-1] + (q.out_features,)
    act = activation_module(q.activation, q.act_param)
    w, ws = q.weight, q.weight_scale
    b64 = q.bias.double() if q.bias is not None else 0.0
    b32 = q.bias.float() if q.bias is not None else 0.0
    if q.mode == "w8a8":
        qx, sx = tilefuse.ops.quantize_per_row(x)
        q64, s64 = _quantize_rows64(x)
        assert (qx.double() - q64).abs().max().item() <= 1, f"{name}: activation quantizer"
        torch.testing.assert_close(sx.double(), s64, rtol=1e-6, atol=0)
        acc = qx.long() @ w.long().t()   # exact
        ref = act(acc.double() * sx.double() * ws.double() + b64)
        eager = act(acc.float() * sx * ws + b32).to(x.dtype)
        check(f"{name} w8a8", out, ref, eager)
    else:
        wd = w.double() * ws.double()[:, None]
        ref = act(F.linear(x.double(), wd, q.bias.double() if q.bias is not None else None))
        eager = act(F.linear(x, wd.to(x.dtype), q.bias.to(x.dtype) if q.bias is not None
                             else None))
        check(f"{name} weight_only", out, ref, eager, n_reduce=q.in_features)


def _conv_layout(x, kind):
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "step":
        return torch.stack([x, torch.zeros_like(x)], -1)[..., 0]
    return x


@fuzz(4, 150)
def test_fuzz_int8_conv1x1(data):
    g = seed(data)
    ndim = data.draw(st.sampled_from([1, 2]), label="ndim")
    cin = data.draw(st.sampled_from([1, 3, 8, 17]), label="Cin")
    cout = data.draw(st.sampled_from([1, 4, 9]), label="Cout")
    bias = data.draw(st.booleans(), label="bias")
    mode = data.draw(st.sampled_from(["w8a8", "weight_only"]), label="mode")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16,
                                       torch.float16]), label="x dtype")
    k = data.draw(st.sampled_from([1, 1, 1, 3]), label="kernel")
    stride = data.draw(st.sampled_from([1, 1, 2]), label="stride")
    padding = data.draw(st.sampled_from([0, 0, 1]), label="padding")
    groups = data.draw(st.sampled_from([1, 1, cin]), label="groups")
    lay = data.draw(st.sampled_from(["contig", "channels_last", "step"]), label="layout")
    cls = nn.Conv1d if ndim == 1 else nn.Conv2d
    cout = cout * groups if cout % groups else cout
    conv = randomize(cls(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias),
                     g)
    ok = k == 1 and stride == 1 and padding == 0 and groups == 1
    assert Int8Conv1x1.supports(conv) == ok
    if not ok:
        with pytest.raises(ValueError, match="1x1"):
            Int8Conv1x1.from_float(conv, mode=mode)
        return
    q = Int8Conv1x1.from_float(conv, mode=mode)
    # state_dict under linear., the weight quantized per output channel within half a step
    sd = q.state_dict()
    assert list(sd) == ["linear.weight", "linear.weight_scale"] + (["linear.bias"] if bias else [])
    assert sd["linear.weight"].dtype == torch.int8 and sd["linear.weight"].shape == (cout, cin)
    w = conv.weight.detach().reshape(cout, cin).double()
    s = sd["linear.weight_scale"].double()[:, None]
    assert ((sd["linear.weight"].double() * s - w).abs() <= s / 2 * (1 + 1e-6)).all()
    q2 = Int8Conv1x1(Int8Linear(cin, cout, bias=bias, mode=mode), ndim=ndim)
    q2.load_state_dict(sd)
    spatial = data.draw(st.sampled_from([(1,), (5,), (7,)]) if ndim == 1 else
                        st.sampled_from([(1, 1), (3, 4), (5, 2)]), label="spatial")
    N = data.draw(st.sampled_from([1, 2]), label="N")
    x = _conv_layout(randn(g, (N, cin) + spatial, dtype), lay)
    y = q2(x)
    assert y.shape == (N, cout) + spatial and y.dtype == dtype
    rows = x.movedim(1, -1)
    check_int8_layer("Int8Conv1x1", q2.linear, rows, y.movedim(1, -1))


# test_bug_int8_conv1x1_unbatched: found while fuzzing Int8Conv1x1 (forward moved dim 1 to the
# end, assuming a batch dim), fixed.
@pytest.mark.parametrize("ndim", [1, 2])
def test_bug_int8_conv1x1_unbatched(ndim):
    torch.manual_seed(0)
    conv = (nn.Conv1d if ndim == 1 else nn.Conv2d)(3, 4, 1)
    x = torch.randn((3, 5) if ndim == 1 else (3, 5, 6))     # unbatched, as torch allows
    q = Int8Conv1x1.from_float(conv, mode="weight_only")
    want = conv(x)                                          # (4, 5) / (4, 5, 6)
    got = q(x)   # was: ValueError: x has 5 features but qweight expects in_features=3
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 0.05


# --------------------------------------------------------------------------------------------
# tilefuse.quantize on random models
# --------------------------------------------------------------------------------------------
def _saved_bytes(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _rule_hits(path, module, rules):
    return any(isinstance(module, r) if isinstance(r, type) else
               (path == r or path.startswith(r + ".") or fnmatch.fnmatchcase(path, r))
               for r in rules)


def _expected_replaced(model, rules):
    """Documented rule: Linear (tilefuse's too), ungrouped Conv2d (issue 20) and 1x1/stride-1/
    unpadded/ungrouped Conv1d, except those matched by a skip rule themselves or through an
    enclosing module."""
    mods = dict(model.named_modules())
    holders = {}   # a weight held by several modules (tied) is skipped
    for m in mods.values():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    out = []
    for name, m in mods.items():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or holders[id(m.weight)] > 1:
            continue
        parts = name.split(".")
        paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
        if any(_rule_hits(p, mods[p], rules) for p in paths):
            continue
        if isinstance(m, nn.Linear) or Int8Conv1x1.supports(m) or Int8Conv2d.supports(m):
            out.append(name)
    return out


def _draw_skip(data, model):
    kind = data.draw(st.sampled_from(["none", "none", "class", "name"]), label="skip kind")
    if kind == "class":
        return (data.draw(st.sampled_from([nn.Linear, nn.Conv2d]), label="skip class"),)
    names = [n for n, _ in model.named_modules() if n]
    if kind == "name" and names:
        name = data.draw(st.sampled_from(names), label="skip name")
        return (name if data.draw(st.booleans(), label="exact") else name[:-1] + "*",)
    return ()


@pytest.mark.filterwarnings("ignore:tilefuse.*patched in eval mode")
@fuzz(4, 120)
def test_fuzz_quantize_model(data):
    g = seed(data)
    bare = data.draw(st.sampled_from([None, None, None, "linear", "conv1x1"]), label="bare")
    if bare is None:
        model, x = random_model(data, g)
    elif bare == "linear":   # the model *is* the layer: replaced as the root ("")
        model, x = randomize(nn.Linear(8, 5), g), randn(g, (4, 8))
    else:
        model, x = randomize(nn.Conv2d(3, 4, 1), g), randn(g, (2, 3, 2, 5))
    model.eval()
    # a bare conv is not patched: test_bug_patch_root_conv (test_fuzz_modules.py), open
    if bare is None and data.draw(st.booleans(), label="patched first"):
        model = tilefuse.patch(model)
    mode = data.draw(st.sampled_from(["w8a8", "weight_only", "w8a8", "weight_only", "fp16",
                                      "bf16"]), label="mode")
    skip = _draw_skip(data, model) if mode in ("w8a8", "weight_only") else ()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    with torch.no_grad():
        want = model(x)
    qm, rep = tilefuse.quantize(model, mode=mode, skip=skip, calibration=x)
    # the original is untouched
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # sizes: real torch.save bytes
    assert rep.mode == mode
    assert rep.size_before == _saved_bytes(model) and rep.size_after == _saved_bytes(qm)
    assert rep.compression == pytest.approx(rep.size_before / rep.size_after)
    assert f"{len(rep.replaced)} module(s) replaced, {len(rep.skipped)} skipped" in str(rep)
    mods = dict(qm.named_modules())
    if mode in ("fp16", "bf16"):
        dt = torch.float16 if mode == "fp16" else torch.bfloat16
        assert all(t.dtype == dt for t in qm.state_dict().values() if t.is_floating_point())
        xq = x.to(dt)
    else:
        xq = x
        assert sorted(rep.replaced) == sorted(_expected_replaced(model, skip))
        for name in rep.replaced:
            assert isinstance(mods[name], (Int8Linear, Int8Conv1x1, Int8Conv2d)), name
        for entry in rep.skipped:
            name = entry.split(" (", 1)[0]   # the reason may hold " (" too
            assert name in mods and not isinstance(mods[name], (Int8Linear, Int8Conv1x1,
                                                                Int8Conv2d)), entry
        # every int8 linear (Int8Conv1x1's too) vs its fp64 reference on the input it actually
        # received; Int8Conv2d: end to end here, per layer in tests/test_int8_conv.py
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, m, i[0], o)))
                 for n, m in qm.named_modules() if isinstance(m, Int8Linear)]
    with torch.no_grad():
        got = qm(xq)
    if mode in ("w8a8", "weight_only"):
        for h in hooks:
            h.remove()
        for n, m, inp, out in seen:
            check_int8_layer(n, m, inp, out)
    # the report's deviations and argmax agreement, recomputed
    d = (got.double() - want.double()).abs()
    assert rep.max_abs_dev == pytest.approx(d.max().item(), rel=1e-9, abs=1e-12)
    assert rep.mean_abs_dev == pytest.approx(d.mean().item(), rel=1e-9, abs=1e-12)
    assert rep.max_rel_dev == pytest.approx(d.max().item() / want.abs().max().item(), rel=1e-9)
    agree = (got.argmax(-1) == want.argmax(-1)).double()
    assert rep.argmax_agreement == pytest.approx(agree.mean().item())
    top2 = want.double().topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * rep.max_abs_dev
    assert agree[clear].all()
    if mode == "weight_only":   # end to end: the float model with the dequantized weights
        deq = copy.deepcopy(model)
        dmods = dict(deq.named_modules())
        with torch.no_grad():
            for name in rep.replaced:
                lin = mods[name].linear if isinstance(mods[name], Int8Conv1x1) else mods[name]
                w = dmods[name].weight
                w.copy_(lin.dequantized_weight(torch.float64).reshape(w.shape))
            ref = copy.deepcopy(deq).double()(x.double())
            eager = deq(x)
        check("quantize weight_only end to end", got, ref, eager, n_reduce=x[0].numel())


# --------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------
@fuzz(5, 150)
def test_fuzz_fold_batchnorm(data):
    g = seed(data)
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32, torch.float64,
                                       torch.bfloat16]), label="dtype")
    cin = data.draw(st.sampled_from([1, 2, 3, 4, 6]), label="Cin")
    groups = data.draw(st.sampled_from([d for d in (1, 2, 3, cin) if cin % d == 0]),
                       label="groups")
    cout = groups * data.draw(st.sampled_from([1, 2, 3]), label="out per group")
    k = data.draw(st.sampled_from([1, 2, 3, (3, 1)]), label="kernel")
    stride = data.draw(st.sampled_from([1, 2]), label="stride")
    padding = data.draw(st.sampled_from([0, 1, "same"]), label="padding")
    stride = 1 if padding == "same" else stride
    dilation = data.draw(st.sampled_from([1, 2]), label="dilation")
    pmode = data.draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]),
                      label="padding_mode")
    bias = data.draw(st.booleans(), label="bias")
    affine = data.draw(st.booleans(), label="affine")
    eps = data.draw(st.sampled_from([1e-5, 1e-3, 0.1]), label="eps")
    var_scale = data.draw(st.sampled_from([1.0, 1e-2, 10.0]), label="running_var scale")
    act, act_mod = data.draw(st.sampled_from(ACTS), label="act")
    conv = randomize(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias,
                               padding_mode=pmode), g)
    bn = randomize(nn.BatchNorm2d(cout, eps=eps, affine=affine), g).eval()
    with torch.no_grad():
        bn.running_var.mul_(var_scale)
    conv, bn = conv.to(dtype), bn.to(dtype)
    before = [t.clone() for t in list(conv.state_dict().values()) + list(bn.state_dict().values())]
    N = data.draw(st.sampled_from([1, 2]), label="N")
    x = randn(g, (N, cin, 7, 6), dtype)
    with torch.no_grad():
        ref = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double()))
        eager = bn(conv(x))
        w, b = fold_batchnorm(conv, bn)
        assert w.dtype == b.dtype == dtype and w.shape == conv.weight.shape and b.shape == (cout,)
        conv_f = copy.deepcopy(conv)   # same geometry and padding mode, folded parameters
        conv_f.weight, conv_f.bias = nn.Parameter(w), nn.Parameter(b)
        folded = conv_f(x)
        red = cin // groups * (k * k if isinstance(k, int) else k[0] * k[1])
        # the fold rounds each folded weight once and reorders the sums: an error floor of a
        # few ulps of sum |w_folded| |x| (fp64: eager *is* the reference, its error is 0)
        conv_abs = copy.deepcopy(conv_f).double()
        conv_abs.weight.abs_()
        conv_abs.bias.abs_()
        mag = conv_abs(x.double().abs()).max().item()
        check("fold_batchnorm", folded, ref, eager, n_reduce=red, scale=mag)
        fused = fuse_conv_bn_eval(conv, bn, activation=act)
        depthwise = groups == cin and cout % cin == 0
        assert isinstance(fused, tilefuse.nn.DepthwiseConv2d) == depthwise
        a = act_mod()
        check("fuse_conv_bn_eval", fused(x), a(ref), a(eager), n_reduce=red, scale=mag)
    after = list(conv.state_dict().values()) + list(bn.state_dict().values())
    assert all(torch.equal(u, v) for u, v in zip(before, after)), "conv/bn modified"

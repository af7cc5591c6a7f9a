"""Norm modules: drop-in by state_dict, residual forward, weight_norm on Linear, convergence."""
import pathlib

import pytest
import torch

import tilefuse
from tilefuse import nn as tnn


@pytest.mark.parametrize("make", [
    lambda: (torch.nn.LayerNorm(6), tnn.LayerNormAct(6, activation="gelu")),
    lambda: (torch.nn.LayerNorm(6, bias=False), tnn.LayerNormAct(6, bias=False)),
    lambda: (torch.nn.RMSNorm([6]), tnn.RMSNormAct([6], activation="silu")),
    lambda: (torch.nn.GroupNorm(2, 6), tnn.GroupNormAct(2, 6, activation="relu")),
    lambda: (torch.nn.GroupNorm(6, 6, affine=False), tnn.GroupNormAct(6, 6, affine=False)),
    lambda: (torch.nn.BatchNorm1d(6), tnn.BatchNormAct1d(6, activation="relu")),
    lambda: (torch.nn.BatchNorm2d(6, affine=False), tnn.BatchNormAct2d(6, affine=False)),
])
def test_state_dict_round_trip(make):
    ref, ours = make()
    assert isinstance(ours, type(ref))
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    assert list(ref.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(ref.state_dict())          # torch -> tilefuse
    ref.load_state_dict(ours.state_dict())          # tilefuse -> torch
    ref.eval()
    ours.eval()
    if isinstance(ref, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        x = torch.randn(2, 3, 6)
    elif isinstance(ref, torch.nn.BatchNorm2d):
        x = torch.randn(2, 6, 3, 2)
    else:
        x = torch.randn(2, 6, 3)
    y_ref = tilefuse.activations.torch_activation(ref(x), ours.activation, ours.act_param)
    assert (ours(x) - y_ref).abs().max() < 1e-5
    assert ours.activation in repr(ours) or ours.activation == "none"


def test_residual_forward_and_from_torch():
    ln = torch.nn.LayerNorm(8)
    fused = tnn.LayerNormAct.from_torch(ln, activation="relu")
    assert fused.weight is ln.weight
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    assert (fused(x, r) - torch.relu(ln(x + r))).abs().max() < 1e-5
    bn = torch.nn.BatchNorm2d(4).eval()
    fbn = tnn.BatchNormAct2d.from_torch(bn, activation="relu")
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert (fbn(x, r) - torch.relu(bn(x) + r)).abs().max() < 1e-5


def test_weight_norm_on_fused_linear():
    from torch.nn.utils.parametrizations import weight_norm

    lin = weight_norm(tnn.Linear(5, 4, activation="relu"))
    ref = weight_norm(torch.nn.Linear(5, 4))
    ref.load_state_dict(lin.state_dict())
    assert "parametrizations.weight.original0" in lin.state_dict()
    x = torch.randn(3, 5)
    y = lin(x)
    assert (y - torch.relu(ref(x))).abs().max() < 1e-5
    y.sum().backward()
    torch.relu(ref(x)).sum().backward()
    for (n, p), q in zip(lin.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).abs().max() < 1e-5, n


def _mlp(fused: bool, seed: int = 0):
    torch.manual_seed(seed)
    if not fused:
        return torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
            torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), tnn.BatchNormAct1d(8, activation="relu"),
        torch.nn.Linear(8, 8), tnn.LayerNormAct(8, activation="gelu"), torch.nn.Linear(8, 3))


def _cnn(fused: bool, seed: int = 0):
    torch.manual_seed(seed)
    if not fused:
        return torch.nn.Sequential(
            torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(),
            torch.nn.Flatten(), torch.nn.Linear(36, 3))
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), tnn.BatchNormAct2d(4, activation="relu"),
        torch.nn.Conv2d(4, 4, 1), tnn.GroupNormAct(2, 4, activation="silu"),
        torch.nn.Flatten(), torch.nn.Linear(36, 3))


def _train(model, data, target, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    hist = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(data), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
    return hist


def _check_tracks(make, data, target, steps):
    eager, fused = make(False), make(True)
    # same parameters, in the same order (the fused model just has no activation modules)
    fused.load_state_dict(dict(zip(fused.state_dict(), eager.state_dict().values())))
    a, b = _train(eager, data, target, steps), _train(fused, data, target, steps)
    assert a[-1] < a[0], a                                       # it does learn
    for la, lb in zip(a, b):
        assert abs(la - lb) < 1e-3 * max(1.0, abs(la)), (a, b)
    for (name, p), q in zip(fused.state_dict().items(), eager.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-3), name   # incl. running stats


def test_tiny_mlp_convergence_tracks_eager():
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(6, 4, generator=gen)
    _check_tracks(_mlp, data, torch.randint(0, 3, (6,), generator=gen), steps=24)


def test_tiny_cnn_convergence_short():
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(3, 2, 3, 3, generator=gen)
    _check_tracks(_cnn, data, torch.randint(0, 3, (3,), generator=gen), steps=4)


@pytest.mark.slow
def test_tiny_cnn_convergence_long():
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(8, 2, 3, 3, generator=gen)
    _check_tracks(_cnn, data, torch.randint(0, 3, (8,), generator=gen), steps=30)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """Every norm op traces under torch.compile(fullgraph=True), running-stat updates included."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), tnn.BatchNormAct1d(8, activation="relu"),
                            tnn.LayerNormAct(8, activation="gelu"),
                            tnn.RMSNormAct(8, activation="silu"))
    m2 = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), tnn.GroupNormAct(2, 4, activation="silu"),
                             tnn.BatchNormAct2d(4))
    x, x2 = torch.randn(6, 4), torch.randn(2, 2, 3, 3)
    y = torch.compile(m, fullgraph=True)(x)
    y2 = torch.compile(m2, fullgraph=True)(x2)
    y.sum().backward()
    y2.sum().backward()
    assert (y - m(x)).abs().max() < 1e-5 and (y2 - m2(x2)).abs().max() < 1e-5
    assert int(m[1].num_batches_tracked) == 2


def test_torch_backend_reference_paths(monkeypatch):
    """TILEFUSE_BACKEND=torch: the plain-torch fallbacks match the same references."""
    import torch.nn.functional as F
    from test_norm_helpers import check_fwd_bwd

    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    ops = tilefuse.ops
    x, w, b, r = torch.randn(3, 10), torch.randn(10), torch.randn(10), torch.randn(3, 10)
    check_fwd_bwd(lambda x, w, b, r: ops.layer_norm_act(x, 10, w, b, activation="gelu",
                                                        residual=r),
                  lambda x, w, b, r: F.gelu(F.layer_norm(x + r, (10,), w, b)),
                  dict(x=x, w=w, b=b, r=r))
    check_fwd_bwd(lambda x, w: ops.rms_norm_act(x, 10, w, eps=1e-6, activation="silu"),
                  lambda x, w: F.silu(F.rms_norm(x, (10,), w, 1e-6)), dict(x=x, w=w))
    xi = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    c4 = dict(x=xi, w=torch.randn(4), b=torch.randn(4))
    check_fwd_bwd(lambda x, w, b: ops.group_norm_act(x, 2, w, b, activation="relu"),
                  lambda x, w, b: F.relu(F.group_norm(x, 2, w, b)), c4)
    for training in (True, False):
        rm, rv = torch.randn(4), torch.rand(4) + 0.5
        check_fwd_bwd(
            lambda x, w, b, r: ops.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training,
                                                  activation="silu", residual=r),
            lambda x, w, b, r: F.silu(F.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b,
                                                   training) + r),
            dict(c4, r=torch.randn(2, 4, 3, 3)))


@pytest.mark.parametrize("affine,track", [(False, False), (True, True)])
def test_instance_norm_act_matches_torch(affine, track):
    ref = torch.nn.InstanceNorm2d(3, affine=affine, track_running_stats=track)
    ours = tnn.InstanceNormAct2d(3, affine=affine, track_running_stats=track, activation="relu")
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    for step in range(2):
        x = torch.randn(2, 3, 4, 5) * (step + 1) + step
        assert (ours(x) - torch.relu(ref(x))).abs().max() < 1e-5
    for k, v in ref.state_dict().items():
        assert torch.allclose(ours.state_dict()[k], v, atol=1e-6), k
    ref.eval()
    ours.eval()
    x = torch.randn(3, 4, 4)            # no batch dim
    assert (ours(x) - torch.relu(ref(x))).abs().max() < 1e-5


def test_new_torch_ctor_keywords_pass_through():
    import inspect

    if "bias" not in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters:
        pytest.skip("this torch has no BatchNorm2d(bias=...)")
    ref, ours = torch.nn.BatchNorm2d(4, bias=False), tnn.BatchNormAct2d(4, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 4, 3, 3)
    assert (ours(x) - ref(x)).abs().max() < 1e-5


def test_int_momentum_as_torch_bool_refused():
    """torch's F.batch_norm / nn.BatchNorm accept an int momentum (1 = replace the running stats
    by the batch's); tilefuse does the same, as docs/norm.md says; a bool is refused."""
    x = torch.randn(6, 3, 2)
    rm, rv, rm_t, rv_t = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    y = tilefuse.ops.batch_norm_act(x, rm, rv, training=True, momentum=1)
    y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, training=True, momentum=1)
    torch.testing.assert_close(y, y_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((rm, rv), (rm_t, rv_t), atol=1e-5, rtol=1e-5)
    m, ref = tnn.BatchNormAct1d(3, momentum=1), torch.nn.BatchNorm1d(3, momentum=1)
    m(x), ref(x)
    torch.testing.assert_close(m.running_var, ref.running_var, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="momentum"):
        tilefuse.ops.batch_norm_act(x, rm, rv, training=True, momentum=True)
    with pytest.raises(TypeError, match="momentum"):
        tilefuse.ops.batch_norm_act(x, rm, rv, training=True, momentum="0.1")
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "norm.md").read_text()
    assert "non-float `momentum`" not in doc and "`momentum=1` is accepted" in doc

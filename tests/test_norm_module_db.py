"""PyTorch's own ``module_db`` samples (torch.testing._internal.common_modules) for the norm
modules, run through tilefuse's drop-in modules (issue 17): BatchNorm1d/2d, GroupNorm,
InstanceNorm1d/2d, LayerNorm and RMSNorm, in every dtype torch tests on CPU (float64 included),
train and eval, forward and backward (input and parameter gradients) and the buffers after the
forward (running statistics, ``num_batches_tracked``). The fast lane takes a few samples per
module; ``-m slow`` runs them all."""

import pytest
import torch

import tilefuse
from utils import torch_test_db  # noqa: I100

TF = {  # torch module -> tilefuse drop-in
    "BatchNorm1d": tilefuse.nn.BatchNormAct1d, "BatchNorm2d": tilefuse.nn.BatchNormAct2d,
    "GroupNorm": tilefuse.nn.GroupNormAct, "InstanceNorm1d": tilefuse.nn.InstanceNormAct1d,
    "InstanceNorm2d": tilefuse.nn.InstanceNormAct2d, "LayerNorm": tilefuse.nn.LayerNormAct,
    "RMSNorm": tilefuse.nn.RMSNormAct,
}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
FAST_SAMPLES = 2  # per module, dtype and mode in the fast lane


def _module_db():
    module_db = torch_test_db("module_db")

    return {m.module_cls.__name__: m for m in module_db if m.module_cls.__name__ in TF}


INFOS = _module_db()
CASES = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
         for name, info in sorted(INFOS.items()) for dtype in info.dtypes]


def _grads(module, args, seed):
    """The forward output, then the gradients of the inputs and parameters that require grad
    for a fixed cotangent (none for an output without grad)."""
    out = module(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    leaves += [p for p in module.parameters() if p.requires_grad]
    if not out.requires_grad or not leaves:
        return [out]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return [out] + list(torch.autograd.grad(out, leaves, g, allow_unused=True))


def _check(name, dtype, training, limit):
    info = INFOS[name]
    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                      training=training)
    assert samples
    tol = TOL[dtype]
    for i, s in enumerate(samples[:limit]):
        ctor, fwd = s.constructor_input, s.forward_input
        torch.manual_seed(i)
        ref = info.module_cls(*ctor.args, **ctor.kwargs).to(dtype)
        with torch.no_grad():  # non-trivial parameters and running statistics
            for k, t in list(ref.named_parameters()) + list(ref.named_buffers()):
                if t.is_floating_point():
                    t.copy_(torch.rand_like(t) + 0.5 if k.endswith("var")
                            else torch.randn_like(t))
        ours = TF[name](*ctor.args, **ctor.kwargs).to(dtype)
        ours.load_state_dict(ref.state_dict())
        ref.train(training), ours.train(training)
        args = [a.detach().clone().requires_grad_(a.requires_grad)
                if isinstance(a, torch.Tensor) else a for a in fwd.args]
        want = _grads(ref, args, i)
        got = _grads(ours, [a.detach().clone().requires_grad_(a.requires_grad)
                            if isinstance(a, torch.Tensor) else a for a in fwd.args], i)
        where = f"{name} {s.desc!r} {dtype} training={training}"
        assert len(got) == len(want), where
        for k, (a, b) in enumerate(zip(got, want)):
            if b is None:
                assert a is None or not a.any(), where
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, (where, k)
            torch.testing.assert_close(a, b, rtol=tol, atol=tol,
                                       msg=lambda m: f"{where} #{k}: {m}")
        for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol,
                                       msg=lambda m: f"{where} {k}: {m}")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name,dtype", CASES)
def test_module_db_samples(name, dtype, training):
    _check(name, dtype, training, FAST_SAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name,dtype", CASES)
def test_module_db_all_samples(name, dtype, training):
    _check(name, dtype, training, None)


def test_the_samples_cover_every_norm_and_float64():
    assert set(INFOS) == set(TF)
    assert all(torch.float64 in INFOS[n].dtypes for n in TF)

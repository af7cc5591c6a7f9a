"""Every ``nn.functional.cross_entropy`` sample of PyTorch's own OpInfo database (CPU,
float32/float64) through ``tilefuse.ops.cross_entropy``: class-index and class-probability
targets, ``weight=``, every reduction, ``ignore_index``, (N, C, d1, ...) layouts; forward and
the gradients of every input that requires grad (the logits, probability targets) against
torch. Fast lane: a subset (float32); slow lane: all samples of both dtypes."""

import pytest
import torch
import torch.nn.functional as F

import tilefuse
from utils import torch_test_db  # noqa: I100

_SAMPLES = {}


def _samples(dtype):
    if dtype not in _SAMPLES:
        op_db = torch_test_db()

        op = next(o for o in op_db if o.name == "nn.functional.cross_entropy")
        _SAMPLES[dtype] = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    return _SAMPLES[dtype]


def _run(fn, x, target, kwargs):
    x = x.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_(target.requires_grad)
    kw = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
          for k, v in kwargs.items()}
    out = fn(x, t, **kw)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    diff = [a for a in (x, t) if a.requires_grad]
    return [out] + list(torch.autograd.grad(out, diff, g))


def _ours(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    return tilefuse.ops.cross_entropy(x, t, label_smoothing, ignore_index, reduction,
                                      weight=weight)


def _check(dtype, index):
    s = _samples(dtype)[index]
    assert not s.args[1:], "a positional argument beyond target: extend _ours"
    ours = _run(_ours, s.input, s.args[0], s.kwargs)
    ref = _run(F.cross_entropy, s.input, s.args[0], s.kwargs)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("index", range(0, 21, 3))
def test_opinfo_subset(index):
    _check(torch.float32, index)


def test_opinfo_sample_count():
    """The database still has the 21 samples this file was written against (soft targets and
    weights included); a change shows up here instead of as silently skipped cases."""
    samples = _samples(torch.float32)
    assert len(samples) >= 21
    assert any(s.args[0].is_floating_point() for s in samples)
    assert any("weight" in s.kwargs for s in samples)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opinfo_all(dtype):
    for i in range(len(_samples(dtype))):
        _check(dtype, i)

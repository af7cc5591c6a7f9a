"""Norm parameters that are strided views (``w[::2]``): the kernels read per-channel weights and
biases as ``ptr + channel``, so the ops pass them with unit stride (``_validate.dense``); before,
LayerNorm/RMSNorm/GroupNorm/BatchNorm read the wrong elements and returned silently wrong
results. Forward and gradients against torch, on the first (full path) and later (planned)
calls."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse

ops = tilefuse.ops


def _cases():
    rm, rv = torch.randn(12)[::2], torch.rand(12)[::2] + 0.5
    return {
        "layer_norm": (lambda x, w, b: ops.layer_norm_act(x, 6, w, b),
                       lambda x, w, b: F.layer_norm(x, (6,), w, b), (4, 6)),
        "rms_norm": (lambda x, w, b: ops.rms_norm_act(x, 6, w) + 0 * b.sum(),
                     lambda x, w, b: F.rms_norm(x, (6,), w) + 0 * b.sum(), (4, 6)),
        "prenorm": (lambda x, w, b: ops.layer_norm_act(x, 6, w, b, residual=x * 2,
                                                       prenorm=True)[0],
                    lambda x, w, b: F.layer_norm(x * 3, (6,), w, b), (4, 6)),
        "group_norm": (lambda x, w, b: ops.group_norm_act(x, 3, w, b),
                       lambda x, w, b: F.group_norm(x, 3, w, b), (3, 6, 4, 4)),
        "batch_norm_train": (lambda x, w, b: ops.batch_norm_act(x, None, None, w, b, True),
                             lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                             (3, 6, 4, 4)),
        "batch_norm_eval": (lambda x, w, b: ops.batch_norm_act(x, rm, rv, w, b, False),
                            lambda x, w, b: F.batch_norm(x, rm.double(), rv.double(), w, b,
                                                         False), (3, 6, 4, 4)),
    }


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(_cases()))
def test_strided_weight_and_bias(name, grad):
    """fp32 through the kernels, against torch in fp64 on the same values."""
    ours, ref, shape = _cases()[name]
    x, w_base, b_base = torch.randn(*shape), torch.randn(12), torch.randn(12)
    for _ in range(3):  # the full path, then the plans
        xs = [x.clone(), w_base.clone()[::2], b_base.clone()[::2]]
        rs = [t.detach().double() for t in xs]
        assert xs[1].stride() == (2,) and xs[2].stride() == (2,)
        for t in xs + rs:
            t.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y, y_ref = ours(*xs), ref(*rs)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
        if grad:
            g = torch.randn_like(y_ref)
            y.backward(g.float())
            y_ref.backward(g)
            for got, want in zip(xs, rs):
                torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_strided_class_weight(ls, reduction):
    """Class weights ``w[::2]`` (read as ``ptr + class``): loss and logit gradient as torch's."""
    logits, target = torch.randn(5, 6), torch.randint(0, 6, (5,))
    w = torch.rand(12)[::2]
    x, xr = logits.clone().requires_grad_(), logits.double().requires_grad_()
    for _ in range(2):
        out = ops.cross_entropy(x, target, weight=w, label_smoothing=ls, reduction=reduction)
        ref = F.cross_entropy(xr, target, weight=w.double(), label_smoothing=ls,
                              reduction=reduction)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        g, = torch.autograd.grad(out.sum(), x)
        gr, = torch.autograd.grad(ref.sum(), xr)
        torch.testing.assert_close(g.double(), gr, rtol=1e-5, atol=1e-6)

"""torch.autocast (AMP) for the fused ops: each public wrapper follows torch's autocast policy for
the aten op it fuses (tilefuse/_autocast.py, docs/amp.md). References are torch's own eager ops
under the same ``torch.autocast("cpu", dtype=torch.bfloat16)``."""
import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse import _autocast, ops

BF16 = dict(atol=3e-2, rtol=3e-2)


def _amp():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


def _fwd_bwd(fn, inputs):
    """(out, grads) with the backward run outside autocast, as in training."""
    with _amp():
        out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # same for ours/ref
    grads = torch.autograd.grad((out.float() * g).sum(), [t for t in inputs if t is not None])
    return out, grads


def _check(ours, ref, **tol):
    out, grads = ours
    rout, rgrads = ref
    assert out.dtype == rout.dtype
    torch.testing.assert_close(out.float(), rout.float(), **(tol or BF16))
    for g, rg in zip(grads, rgrads):
        assert g.dtype == rg.dtype
        torch.testing.assert_close(g.float(), rg.float(), **(tol or BF16))


def test_linear_lower_precision_fwd_bwd():
    x, w, b = _leaf(5, 16), _leaf(8, 16, scale=0.25), _leaf(8)
    ours = _fwd_bwd(lambda x, w, b: ops.linear(x, w, b, activation="gelu"), (x, w, b))
    ref = _fwd_bwd(lambda x, w, b: F.gelu(F.linear(x, w, b)), (x, w, b))
    assert ours[0].dtype == torch.bfloat16
    _check(ours, ref)


def test_nn_linear_bf16_input_fp32_weight():
    m = tilefuse.nn.Linear(8, 4)
    ref = torch.nn.Linear(8, 4)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 8).bfloat16()
    with _amp():
        y, r = m(x), ref(x)
    assert y.dtype == r.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), r.float(), **BF16)


def test_matmul_batched_residual_to_output_dtype():
    a, b, bias = _leaf(2, 3, 16), _leaf(16, 8, scale=0.25), _leaf(8)
    res = _leaf(2, 3, 8)
    ours = _fwd_bwd(lambda a, b, bias, r: ops.matmul(a, b, bias, "relu", r), (a, b, bias, res))
    # residual is cast to the output dtype (addmm-like epilogue): bf16 end to end
    ref = _fwd_bwd(lambda a, b, bias, r: torch.relu(torch.matmul(a, b) + bias.bfloat16())
                   + r.bfloat16(), (a, b, bias, res))
    _check(ours, ref)


def test_depthwise_conv2d_lower_precision():
    x, w, b = _leaf(2, 4, 7, 7), _leaf(4, 1, 3, 3, scale=0.3), _leaf(4)
    ours = _fwd_bwd(lambda x, w, b: ops.depthwise_conv2d(x, w, b, padding=1, activation="relu6"),
                    (x, w, b))
    ref = _fwd_bwd(lambda x, w, b: F.relu6(F.conv2d(x, w, b, padding=1, groups=4)), (x, w, b))
    assert ours[0].dtype == torch.bfloat16
    _check(ours, ref)


def test_int8_weight_only_and_w8a8_follow_linear():
    w = torch.randn(8, 16) * 0.2
    qw, sw = ops.quantize_per_row(w)
    deq = ops.dequantize_per_row(qw, sw)
    x, b = _leaf(4, 16), _leaf(8)
    ours = _fwd_bwd(lambda x, b: ops.weight_only_int8_linear(x, qw, sw.flatten(), b), (x, b))
    ref = _fwd_bwd(lambda x, b: F.linear(x, deq, b), (x, b))
    _check(ours, ref)
    with _amp():
        y = ops.w8a8_linear(x.detach(), qw, sw.flatten(), b.detach())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x, deq, b).detach(), atol=0.1, rtol=0.05)


def test_dropconnect_linear_lower_precision():
    x, w, b = _leaf(4, 16), _leaf(8, 16, scale=0.25), _leaf(8)
    out, grads = _fwd_bwd(lambda x, w, b: ops.dropconnect_linear(x, w, b, p=0.3), (x, w, b))
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.float32] * 3
    assert all(torch.isfinite(g).all() for g in grads)
    ours = _fwd_bwd(lambda x, w, b: ops.dropconnect_linear(x, w, b, p=0.3, training=False),
                    (x, w, b))
    _check(ours, _fwd_bwd(F.linear, (x, w, b)))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_row_norms_follow_torch_cpu_policy(x_dtype):
    x, w, b = _leaf(6, 32, dtype=x_dtype), _leaf(32), _leaf(32)
    ours = _fwd_bwd(lambda x, w, b: ops.layer_norm_act(x, 32, w, b, activation="silu"), (x, w, b))
    ref = _fwd_bwd(lambda x, w, b: F.silu(F.layer_norm(x, (32,), w, b)), (x, w, b))
    _check(ours, ref)
    ours = _fwd_bwd(lambda x, w: ops.rms_norm_act(x, [32], w), (x, w))
    ref = _fwd_bwd(lambda x, w: F.rms_norm(x, [32], w), (x, w))
    _check(ours, ref)


def test_row_norm_residual_promoted_like_eager_add():
    x, r = _leaf(4, 16, dtype=torch.bfloat16), _leaf(4, 16)
    ours = _fwd_bwd(lambda x, r: ops.layer_norm_act(x, 16, residual=r), (x, r))
    ref = _fwd_bwd(lambda x, r: F.layer_norm(x + r, (16,)), (x, r))
    _check(ours, ref)


def test_group_norm_follows_torch_cpu_policy():
    x, w, b = _leaf(2, 6, 5, 5, dtype=torch.bfloat16), _leaf(6), _leaf(6)
    ours = _fwd_bwd(lambda x, w, b: ops.group_norm_act(x, 3, w, b, activation="relu"), (x, w, b))
    ref = _fwd_bwd(lambda x, w, b: F.relu(F.group_norm(x, 3, w, b)), (x, w, b))
    _check(ours, ref)


def test_norm_fp32_policy_where_torch_applies_it(monkeypatch):
    """On CUDA torch runs layer/group(/RMS from 2.12) norm in fp32 under autocast: inputs cast to
    fp32, fp32 output. Exercised on CPU by marking the ops fp32 for 'cpu' in the helper's table."""
    table = dict(_autocast._NORM_FP32)
    table.update({(op, "cpu"): True for op in ("layer_norm", "rms_norm", "group_norm")})
    monkeypatch.setattr(_autocast, "_NORM_FP32", table)
    x, w = _leaf(4, 16, dtype=torch.bfloat16), _leaf(16)
    out, (gx, gw) = _fwd_bwd(lambda x, w: ops.layer_norm_act(x, 16, w), (x, w))
    assert out.dtype == torch.float32 and gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(out, F.layer_norm(x.float(), (16,), w).detach(), atol=1e-5,
                               rtol=1e-5)
    with _amp():
        assert ops.rms_norm_act(x, 16).dtype == torch.float32
        assert ops.group_norm_act(x.detach().reshape(2, 4, 8), 2).dtype == torch.float32


def test_norm_policy_table_follows_the_dispatcher():
    f = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("layer_norm", "rms_norm", "group_norm"):
        assert _autocast._NORM_FP32[(op, "cpu")] is False  # AutocastCPU falls through
        assert _autocast._NORM_FP32[(op, "cuda")] == f(f"aten::{op}", "AutocastCUDA")


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_bf16_input_fp32_params(training):
    x, w, b = _leaf(4, 3, 5, 5, dtype=torch.bfloat16), _leaf(3), _leaf(3)
    rm, rv = torch.randn(3) * 0.1, torch.rand(3) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    ours = _fwd_bwd(lambda x, w, b: ops.batch_norm_act(x, rm, rv, w, b, training=training,
                                                       activation="relu"), (x, w, b))
    ref = _fwd_bwd(lambda x, w, b: F.relu(F.batch_norm(x, rm2, rv2, w, b, training=training)),
                   (x, w, b))
    assert ours[0].dtype == torch.bfloat16
    _check(ours, ref)
    assert rm.dtype == rv.dtype == torch.float32
    torch.testing.assert_close(rm, rm2, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(rv, rv2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_entropy_fp32(dtype):
    logits, t = _leaf(6, 10, dtype=dtype), torch.tensor([1, 0, 9, -100, 3, 3])
    for red in ("mean", "none"):
        ours = _fwd_bwd(lambda x: ops.cross_entropy(x, t, 0.1, reduction=red), (logits,))
        ref = _fwd_bwd(lambda x: F.cross_entropy(x, t, label_smoothing=0.1, reduction=red),
                       (logits,))
        assert ours[0].dtype == torch.float32
        _check(ours, ref)


def test_dropout_not_cast():
    x = torch.randn(4, 8)
    with _amp():
        assert ops.dropout(x, 0.5).dtype == torch.float32
        assert ops.dropout(x.bfloat16(), 0.5).dtype == torch.bfloat16


def test_no_autocast_behaviour_unchanged():
    with pytest.raises(TypeError):
        ops.linear(torch.randn(3, 8).bfloat16(), torch.randn(4, 8))
    assert ops.linear(torch.randn(3, 8), torch.randn(4, 8)).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert ops.linear(torch.randn(3, 8), torch.randn(4, 8)).dtype == torch.float32


def test_torch_compile_fullgraph_under_autocast():
    lin = tilefuse.nn.Linear(16, 10, activation="relu")
    x, t = torch.randn(4, 16), torch.tensor([1, 2, 3, 4])

    def f(x):
        h = ops.layer_norm_act(lin(x), 10)
        return ops.cross_entropy(h, t)

    with _amp():
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)
    compiled.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_train_step_amp_bf16_mobilenet(monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    model = tilefuse.models.mobilenet_v2(num_classes=4, width_mult=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2,)))
    seen = {}
    hook = model.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    r = tilefuse.train.step(model, batch, opt, amp_dtype=torch.bfloat16)
    hook.remove()
    assert seen["dtype"] == torch.bfloat16  # the fused linear classifier ran in bf16
    assert not r.skipped and torch.isfinite(torch.tensor(r.grad_norm)) and r.grad_norm > 0


@pytest.mark.cuda
def test_cuda_autocast_policy_matches_torch():
    x, w, b = (torch.randn(6, 32, device="cuda"), torch.randn(16, 32, device="cuda"),
               torch.randn(16, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, ry = ops.linear(x, w, b), F.linear(x, w, b)
        h = y.bfloat16()
        ln, rln = ops.layer_norm_act(h, 16), F.layer_norm(h, (16,))
        gn, rgn = ops.group_norm_act(h.reshape(2, 6, 8), 2), F.group_norm(h.reshape(2, 6, 8), 2)
        ce = ops.cross_entropy(h, torch.arange(6, device="cuda"))
        rce = F.cross_entropy(h, torch.arange(6, device="cuda"))
    assert y.dtype == ry.dtype == torch.bfloat16
    assert ln.dtype == rln.dtype and gn.dtype == rgn.dtype and ce.dtype == rce.dtype
    torch.testing.assert_close(y.float(), ry.float(), **BF16)
    torch.testing.assert_close(ln.float(), rln.float(), **BF16)
    torch.testing.assert_close(ce, rce, **BF16)

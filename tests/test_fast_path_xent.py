"""The eager fast path of ``tilefuse.ops.cross_entropy`` against the custom-op path it bypasses,
and the reduction inside the op against the torch-op reduction it replaced.

* fast path vs ``custom_op_path()``: same losses and gradients bit for bit, with and without grad;
* ``torch.compile(fullgraph=True)`` traces the wrapper into a graph calling the custom op;
* the op now reduces (mean / sum) itself and backward applies the reduction's derivative by hand:
  the loss and the gradient equal, bit for bit, the former formulation (per-row losses from the
  op, then ``sum`` / ``where(count > 0, total / count.clamp_min(1), nan)`` under autograd);
* targets are still validated on CPU (now by a NaN check of the loss sum after the launch).
"""
import pytest
import torch

import tilefuse
import tilefuse.fused.cross_entropy as fce
from fast_path_utils import assert_compiles_to_custom_op, assert_fast_equals_custom_op  # noqa: I100
from tilefuse.fused._fast import FastOp, custom_op_path

ops = tilefuse.ops


def _case(shape, C, dtype=torch.float32, ignore=True, tdtype=torch.int64):
    g = torch.Generator().manual_seed(sum(shape) * 7 + C)
    logits = (torch.randn(*shape, generator=g) * 3).to(dtype)
    tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, C, tshape, generator=g)
    if ignore and target.numel() > 1:
        target.view(-1)[::3] = -100
    return logits, target.to(tdtype) if tdtype != torch.int64 else target


CASES = {
    "2d": lambda: _case((6, 11), 11),
    "2d_no_ignore": lambda: _case((5, 40), 40, ignore=False),
    "1d": lambda: _case((9,), 9, ignore=False),
    "3d": lambda: _case((3, 7, 4), 7),
    "4d_int32_target": lambda: _case((2, 5, 3, 2), 5, tdtype=torch.int32),
    "fp16": lambda: _case((4, 13), 13, dtype=torch.float16),
    "bf16": lambda: _case((4, 13), 13, dtype=torch.bfloat16),
    "fp64": lambda: _case((4, 13), 13, dtype=torch.float64),
    "transposed": lambda: (_case((12, 5), 5)[0].t(), torch.tensor([0, 4, -100, 2, 1])),
}
REDUCTIONS = ["mean", "sum", "none"]


def _fn(eps, reduction):
    return lambda x, t: ops.cross_entropy(x, t, label_smoothing=eps, reduction=reduction)


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_path_equals_custom_op(name, reduction, grad, backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    logits, target = CASES[name]()
    assert_fast_equals_custom_op(_fn(0.1, reduction), [logits, target], grad)


def _rows_then_torch(logits, target, eps, ignore_index, reduction):
    """Per-row losses from the op (``'none'``), then the reduction with torch ops."""
    rows = ops.cross_entropy(logits, target, eps, ignore_index, "none")
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = (target != ignore_index).sum()
    return torch.where(count > 0, total / count.clamp_min(1), float("nan")).to(logits.dtype)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["2d", "3d", "fp16", "bf16", "fp64", "all_ignored"])
def test_reduction_in_op_matches_torch_reduction(name, reduction, eps):
    """The reduce kernel (mean over non-ignored rows / sum, fixed order) and the backward's
    on-device ``grad_output / denominator`` against the per-row losses reduced by torch ops
    under autograd. Since the redesign (issue 18) the mean/sum is a tree sum in the reduce
    kernel and the loss is written in the logits' dtype directly, so this is no longer
    bit-identical to the former ``rows.sum()`` formulation: equal to rounding."""
    if name == "all_ignored":
        logits, target = torch.randn(3, 6), torch.full((3,), -100)
    else:
        logits, target = CASES[name]()
    results = []
    for fn in (lambda x, t: ops.cross_entropy(x, t, eps, -100, reduction),
               lambda x, t: _rows_then_torch(x, t, eps, -100, reduction)):
        x = logits.clone().requires_grad_()
        loss = fn(x, target)
        (g,) = torch.autograd.grad(loss, x, torch.rand_like(loss, generator=torch.Generator()
                                                            .manual_seed(4)))
        results.append((loss, g))
    (new, g_new), (old, g_old) = results
    assert new.dtype == old.dtype and new.shape == old.shape
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(logits.dtype, 1e-6)
    assert torch.allclose(new, old, rtol=tol, atol=tol, equal_nan=True)  # NaN: all ignored
    assert g_new.dtype == g_old.dtype and torch.allclose(g_new, g_old, rtol=tol, atol=tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_traces_the_custom_op(reduction):
    logits, target = CASES["3d"]()
    assert_compiles_to_custom_op(_fn(0.1, reduction), [logits, target], "cross_entropy")


def test_op_is_fast_op_and_grad_fn_is_eager_function():
    assert isinstance(fce.cross_entropy_op, FastOp)
    x, t = CASES["2d"]()
    x.requires_grad_()
    assert "Fast_" in type(ops.cross_entropy(x, t).grad_fn).__name__  # one node: no sum/where
    with torch.no_grad():
        assert ops.cross_entropy(x, t).grad_fn is None
    with custom_op_path():
        assert "Fast_" not in type(ops.cross_entropy(x, t).grad_fn).__name__


@pytest.mark.parametrize("custom", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_out_of_range_target_still_raises(reduction, custom):
    """The CPU target check runs when the loss sum is NaN (the kernel writes NaN for a row whose
    target is out of range); NaN logits with valid targets are not an error."""
    x = torch.randn(4, 5)
    with custom_op_path(custom):
        for bad in ([0, 5, 1, -100], [-1, 0, 1, 2], [0, 1, 2, -7]):
            with pytest.raises(ValueError, match="target"):
                ops.cross_entropy(x, torch.tensor(bad), reduction=reduction)
        xn = x.clone()
        xn[1, 2] = float("nan")
        loss = ops.cross_entropy(xn, torch.tensor([0, 1, 2, -100]), reduction="none")
        assert torch.isnan(loss[1]) and not torch.isnan(loss[[0, 2, 3]]).any()


def test_bad_arguments_still_named():
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match="logits"):
        ops.cross_entropy(x.long(), t)
    with pytest.raises(ValueError, match="logits"):
        ops.cross_entropy(torch.tensor(1.0), t)
    with pytest.raises(ValueError, match="target"):  # probabilities need the logits' shape
        ops.cross_entropy(x, t.float())
    with pytest.raises(TypeError, match="label_smoothing"):
        ops.cross_entropy(x, t, label_smoothing="0.1")
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="ignore_index"):
        ops.cross_entropy(x, t, ignore_index=True)
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="target must have shape"):
        ops.cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="target must have shape"):
        ops.cross_entropy(x, t[:, None])
    assert torch.equal(ops.cross_entropy(x, t, label_smoothing=0),
                       ops.cross_entropy(x, t, label_smoothing=0.0))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows_backward(reduction):
    """No rows: a zero gradient of shape (0, C) for every reduction (the reduced loss is 0-d, so
    'not computed' is told by the placeholder's shape, not by the incoming gradient's size)."""
    x = torch.randn(0, 5, requires_grad=True)
    loss = ops.cross_entropy(x, torch.zeros(0, dtype=torch.long), reduction=reduction)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert g.shape == (0, 5)


def test_gradient_not_computed_is_an_error():
    x = torch.randn(3, 5, requires_grad=True)
    loss, _, _ = fce.cross_entropy_op(x, torch.tensor([0, 1, 2]), None, 0.0, -100, "mean", False)
    with pytest.raises(RuntimeError, match="not saved"):
        loss.backward()


@pytest.mark.parametrize("weighted", [False, True])
def test_reduce_kernel_denominator(weighted):
    """``reduction='mean'``'s denominator comes from the reduce kernel and equals the sum of
    ``weight[target]`` (or the count) over targets that are not ``ignore_index``; the valid
    flag is cleared by an out-of-range target."""
    from tilefuse.kernels.cross_entropy import launch_reduce

    g = torch.Generator().manual_seed(8)
    for R, ig in ((1, -100), (7, -100), (33, 2), (5, 0)):
        t = torch.randint(0, 6, (R,), generator=g)
        t[::2] = ig
        w = torch.rand(6, generator=g) if weighted else None
        rows, out, aux = torch.rand(R, generator=g), torch.empty(()), torch.empty(3)
        launch_reduce(rows, t, w, out, aux, 6, ig, "mean")
        live = t != ig
        den = (w[t[live]].sum() if weighted else live.sum()).float()
        assert torch.allclose(aux[0], den) and aux[2] == 1.0
        assert torch.allclose(out, rows.sum() / den) or not live.any()
        t[-1] = 6 if ig != 6 else 7
        launch_reduce(rows, t, w, out, aux, 6, ig, "sum")
        assert aux[2] == 0.0


def _soft_case(shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(*shape, generator=g) * 3).to(dtype)
    return logits, torch.softmax(torch.randn(*shape, generator=g), 1).to(dtype)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["soft_2d", "soft_3d", "soft_bf16", "weight", "soft_weight"])
def test_fast_path_soft_targets_and_weights(kind, reduction, grad):
    logits, target = _soft_case((5, 8, 3) if kind == "soft_3d" else (5, 8),
                                torch.bfloat16 if kind == "soft_bf16" else torch.float32)
    if kind == "weight":
        target = torch.tensor([0, 7, -100, 3, 3])
    w = torch.rand(8, generator=torch.Generator().manual_seed(1)) if "weight" in kind else None

    def fn(x, t):
        return ops.cross_entropy(x, t, 0.1, -100, reduction, weight=w)

    assert_fast_equals_custom_op(fn, [logits, target], grad)


@pytest.mark.parametrize("kind", ["soft", "weight"])
def test_compile_traces_soft_and_weighted(kind):
    logits, target = _soft_case((4, 6))
    if kind == "weight":
        target = torch.tensor([0, 5, -100, 2])
    w = torch.rand(6)
    assert_compiles_to_custom_op(
        lambda x, t: ops.cross_entropy(x, t, 0.1, weight=w), [logits, target], "cross_entropy")


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_match_fake(backend, save, dtype, monkeypatch):
    """The op's real outputs have the fake kernel's shapes and dtypes (what torch.compile
    traces with), on both backends, with and without saved statistics."""
    if backend == "torch":
        monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    x, t = torch.randn(5, 7, dtype=dtype), torch.tensor([0, 6, -100, 3, 3])
    for target in (t, torch.softmax(torch.randn(5, 7, dtype=dtype), 1)):
        for red in REDUCTIONS:
            args = (x, target, None, 0.1, -100, red, save)
            real, fake = fce._xent_impl(*args), fce._xent_fake(*args)
            for a, b in zip(real, fake):
                assert a.shape == b.shape and a.dtype == b.dtype, (red, a.shape, b.shape)

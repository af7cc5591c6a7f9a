"""Issue 15: the per-signature plans of ``batch_norm_act`` (tilefuse/fused/norm_bn_plan.py) and
the one-program small-problem kernels (tilefuse/kernels/norm_bn.py ``_small``).

A plan serves the second and later eager calls of a signature; it must give the bits of the full
path and of the custom-op path (outputs, running stats, ``num_batches_tracked``, gradients),
never serve another signature (shape, dtype, strides, device, scalars, backend) and never skip
a validation error.
"""
import contextlib

import pytest
import torch

import tilefuse
import tilefuse.fused.norm_bn as fbn
import tilefuse.fused.norm_bn_plan as plan_mod
import tilefuse.kernels.norm_bn as kbn
from fast_path_utils import assert_same, compiled_targets, launches  # noqa: I100
from tilefuse.fused._fast import custom_op_path

ops = tilefuse.ops
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered")  # interpreter, masked



@pytest.fixture
def full_calls(monkeypatch):
    """Counts the calls that take the full path (validation, reshape, op) instead of a plan."""
    calls = []
    real = fbn._batch_norm_act

    def counted(*args):
        calls.append(args)
        return real(*args)
    monkeypatch.setattr(fbn, "_batch_norm_act", counted)
    return calls


def _inputs(shape, layout="nchw", dtype=torch.float32, residual=False, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]

    def lay(t):
        if layout == "cl":
            return t.to(memory_format=torch.channels_last)
        if layout == "strided":  # every other sample of a batch twice as large
            big = torch.zeros(2 * t.shape[0], *t.shape[1:], dtype=t.dtype)
            big[::2] = t
            return big[::2]
        return t
    x = lay((torch.randn(*shape, generator=g) * 2 + 3).to(dtype))
    w = torch.randn(C, generator=g) if affine else None
    b = torch.randn(C, generator=g) if affine else None
    r = lay(torch.randn(*shape, generator=g).to(dtype)) if residual else None
    return x, w, b, r


def _steps(shape, training, grad, *, layout="nchw", dtype=torch.float32, residual=False,
           affine=True, momentum=0.1, eps=1e-5, act="relu", nbt=False,
           stats_dtype=torch.float32, steps=3, custom=False):
    """``steps`` calls with the same running stats (a module's buffers): per call, the output,
    the running stats, the counter and the gradients of x, w, b, residual."""
    C = shape[1]
    rm = torch.linspace(-1, 1, C, dtype=stats_dtype)
    rv = torch.linspace(0.5, 2, C, dtype=stats_dtype)
    counter = torch.tensor(3, dtype=torch.long) if nbt else None
    out = []
    with custom_op_path() if custom else contextlib.nullcontext():
        for i in range(steps):
            x, w, b, r = _inputs(shape, layout, dtype, residual, affine, seed=i)
            leaves = [t for t in (x, w, b, r) if t is not None]
            for t in leaves:
                t.requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y = ops.batch_norm_act(x, rm, rv, w, b, training=training, momentum=momentum,
                                       eps=eps, activation=act, residual=r,
                                       num_batches_tracked=counter)
            rec = [y.detach(), rm.clone(), rv.clone(),
                   counter.clone() if counter is not None else None]
            if grad:
                y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
                rec += [t.grad for t in leaves]
            out.append(rec)
    return out


def _assert_steps_equal(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb)
        for ta, tb in zip(ra, rb):
            assert_same(ta, tb)


CASES = {
    "eval_nchw": dict(shape=(4, 8, 4, 4), training=False, eps=0.25),
    "eval_cl_residual": dict(shape=(2, 6, 3, 5), training=False, layout="cl", residual=True,
                             act="silu"),
    "eval_fp16_stats": dict(shape=(3, 5, 4), training=False, stats_dtype=torch.float16),
    "eval_2d_no_affine": dict(shape=(7, 5), training=False, affine=False, act=None),
    "train_nchw": dict(shape=(4, 8, 4, 4), training=True, eps=0.25),
    "train_cl_residual": dict(shape=(3, 6, 3, 5), training=True, layout="cl", residual=True,
                              act="silu"),
    "train_cumulative": dict(shape=(4, 3, 2, 3), training=True, momentum=None, nbt=True),
    "train_counter_momentum": dict(shape=(4, 3, 5), training=True, nbt=True, momentum=0.3),
    "train_bf16": dict(shape=(4, 3, 2, 3), training=True, dtype=torch.bfloat16,
                       act=("leaky_relu", 0.2)),
    "train_strided_x": dict(shape=(3, 4, 2, 2), training=True, layout="strided",
                            residual=True),
    "train_3d_no_affine": dict(shape=(3, 4, 6), training=True, affine=False, act=None),
    "train_2d": dict(shape=(7, 5), training=True, act="gelu"),
}


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_same_bits_as_custom_op_path(name, grad, small, full_calls, monkeypatch):
    """Three calls (the first on the full path, the next two on the plan) against three on the
    custom-op path: outputs, running stats, counter and gradients bit for bit; ``small``: the
    one-program kernels, else the statistics / finalize / apply launches."""
    if not small:
        monkeypatch.setattr(kbn, "SMALL_TILE", 0)
    kw = CASES[name]
    fast = _steps(grad=grad, **kw)
    assert len(full_calls) == 1  # (the first call: the later ones took the plan)
    slow = _steps(grad=grad, custom=True, **kw)
    _assert_steps_equal(fast, slow)


def test_plan_same_bits_as_full_path(full_calls, monkeypatch):
    """The plan against the full path itself (plans disabled by a custom key every call)."""
    kw = CASES["train_cl_residual"]
    fast = _steps(grad=False, **kw)
    assert len(full_calls) == 1
    monkeypatch.setattr(plan_mod, "PLANS", {})
    monkeypatch.setattr(fbn, "remember", lambda cache, key, plan: plan)  # nothing remembered
    full = _steps(grad=False, **kw)
    assert len(full_calls) == 4
    _assert_steps_equal(fast, full)


def test_module_steps_with_plans_match_torch():
    """BatchNormAct2d (momentum=None: cumulative average, counter in the kernel) against torch's
    BatchNorm2d over training steps on the plan, then eval."""
    ref = torch.nn.BatchNorm2d(6, momentum=None)
    ours = tilefuse.nn.BatchNormAct2d(6, momentum=None, activation="relu")
    ours.load_state_dict(ref.state_dict())
    for step in range(4):
        x = torch.randn(4, 6, 3, 3) * (step + 1) + step
        torch.testing.assert_close(ours(x), torch.relu(ref(x)), atol=1e-5, rtol=1e-5)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    assert int(ours.num_batches_tracked) == 4
    ref.eval(), ours.eval()
    for _ in range(2):
        x = torch.randn(2, 6, 3, 3)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), torch.relu(ref(x)), atol=1e-5, rtol=1e-5)


def _eval_call(x, **kw):
    C = x.shape[1]
    rm, rv = torch.zeros(C, device=x.device), torch.ones(C, device=x.device)
    return ops.batch_norm_act(x, rm, rv, training=False, activation="relu", **kw)


def _ref_eval(x):
    return torch.relu(torch.nn.functional.batch_norm(x.float(), torch.zeros(x.shape[1]),
                                                     torch.ones(x.shape[1]))).to(x.dtype)


def test_no_stale_plan_for_another_signature(full_calls):
    """After a plan exists: another shape, dtype, layout, strides or device kind runs its own
    path (a new full call each), and results stay right."""
    x = torch.randn(2, 4, 3, 3)
    for _ in range(2):
        torch.testing.assert_close(_eval_call(x), _ref_eval(x))
    assert len(full_calls) == 1
    others = [torch.randn(2, 4, 3, 4), torch.randn(2, 4, 3, 3).half(),
              torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last),
              torch.randn(2, 4, 3, 6)[..., ::2], torch.randn(3, 4, 3, 3)]
    for i, other in enumerate(others):
        y = _eval_call(other)
        assert y.shape == other.shape and y.dtype == other.dtype
        torch.testing.assert_close(y, _ref_eval(other), atol=1e-3, rtol=1e-3)
        assert len(full_calls) == 2 + i
    meta = _eval_call(torch.empty(2, 4, 3, 3, device="meta"))  # same shape, CPU -> meta
    assert meta.device.type == "meta" and meta.shape == (2, 4, 3, 3)
    assert len(full_calls) == 2 + len(others)


def test_bad_input_raises_after_a_plan_exists():
    """A plan never skips validation: arguments that hash like a planned signature's but are
    invalid (bool momentum / eps, a tensor subclass as counter, a tensor on another device)
    still raise, on every call."""
    x = torch.randn(4, 3, 2)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    for _ in range(2):  # plans for momentum=1.0, eps=1.0, a plain counter
        ops.batch_norm_act(x, rm, rv, training=True, momentum=1.0, eps=1.0,
                           num_batches_tracked=nbt)
    for _ in range(2):
        with pytest.raises(TypeError, match="momentum"):
            ops.batch_norm_act(x, rm, rv, training=True, momentum=True, eps=1.0,
                               num_batches_tracked=nbt)
        with pytest.raises(ValueError, match="eps"):
            ops.batch_norm_act(x, rm, rv, training=True, momentum=1.0, eps=True,
                               num_batches_tracked=nbt)
        with pytest.raises(TypeError, match="num_batches_tracked"):
            ops.batch_norm_act(x, rm, rv, training=True, momentum=1.0, eps=1.0,
                               num_batches_tracked=torch.nn.Parameter(torch.tensor(0),
                                                                      requires_grad=False))
        with pytest.raises((ValueError, RuntimeError)):
            ops.batch_norm_act(x, rm, rv.to("meta"), training=True, momentum=1.0, eps=1.0,
                               num_batches_tracked=nbt)
    assert int(nbt) == 2
    y = torch.randn(1, 3)
    for _ in range(2):  # an error on the first call is not remembered as a plan
        with pytest.raises(ValueError, match="more than 1 value"):
            ops.batch_norm_act(y, rm, rv, training=True)


def test_backend_switch_after_a_plan(monkeypatch):
    """TILEFUSE_BACKEND=torch after a plan exists: the torch path (no kernel launched)."""
    x = torch.randn(2, 4, 3, 3)
    for _ in range(2):
        _eval_call(x)
    with launches() as t:
        _eval_call(x)
    assert t.n == 1
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    for _ in range(2):
        with launches() as t:
            y = _eval_call(x)
        assert t.n == 0, "a plan of the triton backend served the torch backend"
        torch.testing.assert_close(y, _ref_eval(x))
    monkeypatch.delenv("TILEFUSE_BACKEND")
    with launches() as t:
        _eval_call(x)
    assert t.n == 1


@pytest.mark.parametrize("training", [False, True])
def test_plan_launch_budget(training):
    """One launch per call, first call and plan (the one-program training forward at this
    size); the backward of a small problem is one launch too."""
    x, w, b, r = _inputs((4, 8, 4, 4), residual=True)
    rm, rv, nbt = torch.zeros(8), torch.ones(8), torch.tensor(0)
    for grad in (False, True):
        for t_ in (x, w, b):
            t_.requires_grad_(grad)
        for _ in range(2):
            with torch.set_grad_enabled(grad), launches() as fwd:
                y = ops.batch_norm_act(x, rm, rv, w, b, training=training, activation="relu",
                                       residual=r, num_batches_tracked=nbt)
            assert fwd.n == 1
        if grad:
            with launches() as bwd:
                y.backward(torch.ones_like(y))
            assert bwd.n == 1
    assert int(nbt) == (4 if training else 0)


def test_unplannable_signatures_keep_the_full_path(full_calls):
    """Strided running stats in training (the update by torch ops), an activation module, a
    broadcast residual with grad, running stats alone requiring grad: the full path every call,
    right results."""
    x = torch.randn(4, 3, 5)
    rm = torch.zeros(6)[::2]
    rv = torch.ones(6)[::2]
    for _ in range(2):
        ops.batch_norm_act(x, rm, rv, training=True)
    ref_m, ref_v = torch.zeros(3), torch.ones(3)
    torch.nn.functional.batch_norm(x, ref_m, ref_v, training=True)
    torch.nn.functional.batch_norm(x, ref_m, ref_v, training=True)
    torch.testing.assert_close((rm, rv), (ref_m, ref_v))
    act = torch.nn.LeakyReLU(0.3)
    for _ in range(2):
        y = ops.batch_norm_act(x, torch.zeros(3), torch.ones(3), activation=act)
    torch.testing.assert_close(y, torch.nn.functional.leaky_relu(
        torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3)), 0.3))
    w = torch.randn(3, requires_grad=True)
    res = torch.randn(3, 1, requires_grad=True)
    for _ in range(2):
        y = ops.batch_norm_act(x, torch.zeros(3), torch.ones(3), w, residual=res)
        y.sum().backward()
    assert res.grad.shape == (3, 1)
    stats = torch.ones(3, requires_grad=True)  # (only the running stats require grad)
    for _ in range(2):
        y = ops.batch_norm_act(x, torch.zeros(3), stats, activation="relu")
    assert y.requires_grad
    assert len(full_calls) == 8  # (every call)


def test_grad_plan_under_activation_checkpoint():
    """Non-reentrant checkpointing compares the tensors saved by the forward and by its
    recomputation: the first call of a signature (full path) and a plan save the same ones."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    w = torch.randn(8, requires_grad=True)

    def block(x):
        return ops.batch_norm_act(x, None, None, w, None, training=True, activation="relu")
    for _ in range(2):
        y = checkpoint(block, x, use_reentrant=False)
        y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    block(x).sum().backward()
    torch.testing.assert_close(x.grad, g / 2)


def test_compile_after_a_plan_traces_the_custom_op():
    """A plan is never used while compiling: the graph calls the custom op."""
    C = 4
    stats = [torch.zeros(C), torch.ones(C)]

    def fn(x):
        return ops.batch_norm_act(x, stats[0], stats[1], training=True, activation="relu")
    x = torch.randn(3, C, 2, 2)
    for _ in range(2):
        fn(x)
    seen, out, ref = compiled_targets(fn, [x])
    assert torch.equal(out, ref)
    assert any("tilefuse.batch_norm_act_fwd" in s for s in seen), seen


def test_autocast_skips_the_plan(full_calls):
    """Under autocast (a mixed-dtype residual is promoted) no plan serves the call."""
    x = torch.randn(2, 4, 3, 3)
    for _ in range(2):
        _eval_call(x)
    n = len(full_calls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _eval_call(x)
    assert len(full_calls) == n + 1


def test_small_path_is_chosen_by_shape_alone():
    """One program when the padded (N * S, C) tile fits SMALL_TILE, whatever the layout."""
    assert kbn._small(64, 8) == (64, 8, 2)
    assert kbn._small(256, 16) == (256, 16, 16)
    assert kbn._small(257, 16) is None and kbn._small(100, 64) is None
    for layout in ("nchw", "cl"):
        x, w, b, _ = _inputs((4, 8, 4, 4), layout)
        with launches() as t:
            ops.batch_norm_act(x, None, None, w, b, training=True)
        assert t.n == 1

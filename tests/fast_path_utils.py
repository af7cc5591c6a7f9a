"""The harness of the fast-path tests (tests/test_fast_path*.py): the eager fast path of a
:class:`tilefuse.fused._fast.FastOp` against the ``torch.library`` custom op it bypasses, and
``torch.compile(fullgraph=True)`` tracing the custom op."""
import contextlib

import pytest
import torch

from tilefuse.fused._fast import custom_op_path


def run(fn, inputs, grad, seed=None):
    """Outputs (and input gradients when ``grad``) of ``fn(*inputs)`` on fresh input copies;
    ``seed``: the RNG state the call starts from (random ops)."""
    xs = [t.detach().clone().requires_grad_(grad and t.is_floating_point()) for t in inputs]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.set_grad_enabled(grad):
        out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = []
    if grad:
        diff = [o for o in outs if o.requires_grad]
        torch.autograd.backward(diff, [torch.ones_like(o) for o in diff])
        grads = [t.grad for t in xs if t.requires_grad]
    return [o.detach() for o in outs], grads


def assert_same(a, b):
    """Bit for bit, with the same dtype, shape and strides."""
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


def assert_fast_equals_custom_op(fn, inputs, grad=True, seed=None):
    """The fast path and the custom-op path give the same outputs and gradients; returns the
    fast path's ``(outputs, grads)``."""
    fast = run(fn, inputs, grad, seed)
    with custom_op_path():
        slow = run(fn, inputs, grad, seed)
    assert len(fast[0]) == len(slow[0]) and len(fast[1]) == len(slow[1])
    for a, b in zip(fast[0] + fast[1], slow[0] + slow[1]):
        assert_same(a, b)
    return fast


def compiled_targets(fn, inputs, grad=False, seed=None):
    """``torch.compile(fn, fullgraph=True)`` (a graph break raises): the call targets of every
    graph it produced, the compiled and the eager outputs (both from ``seed`` when given)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    with torch.set_grad_enabled(grad):
        if seed is not None:
            torch.manual_seed(seed)
        out = compiled(*inputs)
        if seed is not None:
            torch.manual_seed(seed)
        ref = fn(*inputs)
    return seen, out, ref


def assert_compiles_to_custom_op(fn, inputs, op_name, grad=False, seed=None):
    """fullgraph compile runs, matches eager, and ``tilefuse::op_name`` is a node of the graph."""
    seen, out, ref = compiled_targets(fn, inputs, grad, seed)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for a, b in zip(outs, refs):
        assert torch.equal(a, b)
    assert any(f"tilefuse.{op_name}" in s for s in seen), seen


@contextlib.contextmanager
def launches():
    """Counts interpreted Triton launches (they run; any triton version)."""
    from tilefuse.bench.host import LaunchCount, _launcher_class, _patched_run

    cls = _launcher_class(interpreter=True)
    real, count = cls.__dict__["run"], LaunchCount()

    def run(self, *args, **kwargs):
        count.n += 1
        return real(self, *args, **kwargs)

    with _patched_run(cls, run):
        yield count


def assert_grads_equal_custom_op(loss, tensors, repeats=3):
    """``loss(*fresh copies of tensors).backward()`` gives the custom-op path's input gradients
    bit for bit on ``repeats`` eager calls (the first plans a signature, the next ones use it)."""
    def grads():
        xs = [t.detach().clone().requires_grad_() for t in tensors]
        loss(*xs).backward()
        return [x.grad for x in xs]

    with custom_op_path():
        want = grads()
    for _ in range(repeats):
        for a, b in zip(grads(), want):
            assert_same(a, b)


def record_launches(monkeypatch, record):
    """Wrap the launch method of Triton's kernel class: every launch calls
    ``record(kernel, args, kwargs)`` and still runs. Returns nothing; the callers' fixtures keep
    what ``record`` collects."""
    cls = _kernel_class()
    real = cls.run

    def run(self, *args, **kwargs):
        record(self, args, kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)


def _kernel_class():
    from tilefuse.kernels.activations import activation_backward_kernel

    return type(activation_backward_kernel)


def _assert_all_same(got, want):
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert_same(a, b)


def assert_plans_match_custom_op(fn, inputs, mask, calls=3, dy=None):
    """``calls`` calls of ``fn`` on fresh leaves (``mask``: which require grad; the first call
    of a new signature takes the full path, later ones the plans) and one on the custom-op
    path: outputs and input gradients bit for bit equal. ``dy(y)``: the upstream gradient
    (ones by default)."""
    results = []
    for path in ("plan",) * calls + ("custom",):
        xs = [t.detach().clone().requires_grad_(m) for t, m in zip(inputs, mask)]
        with custom_op_path(path == "custom"):
            y = fn(*xs)
            y.backward(torch.ones_like(y) if dy is None else dy(y))
        results.append([y.detach()] + [t.grad for t in xs])
    for res in results[:-1]:
        _assert_all_same(res, results[-1])


def assert_checkpoint_matches_custom_op(fn, inputs, clear, calls=3):
    """``torch.utils.checkpoint`` (non-reentrant) around ``fn`` after ``clear()`` emptied the
    plans: the first forward takes the full path and its recomputation the plan, later ones
    plans; checkpoint's saved-tensor check passes and outputs and gradients equal the
    custom-op path's bit for bit."""
    from torch.utils.checkpoint import checkpoint

    def grads(wrap):
        xs = [t.clone().requires_grad_() for t in inputs]
        y = wrap(fn, *xs)
        y.square().sum().backward()
        return [y.detach()] + [t.grad for t in xs]

    with custom_op_path():
        want = grads(lambda f, *a: f(*a))
    clear()
    for _ in range(calls):
        _assert_all_same(grads(lambda f, *a: checkpoint(f, *a, use_reentrant=False)), want)


def assert_raises_after_plan(op, good: dict, bad: dict, err, match):
    """``op(**good)`` twice (a plan exists for those arguments), then ``op(**good, **bad)``
    raises ``err`` matching ``match`` on every call (a bad argument equal to a valid one as a
    dict key, ``True == 1`` or ``1.0 == 1``, is not served by that plan)."""
    for _ in range(2):
        op(**good)
    args = {**good, **bad}
    for _ in range(3):
        with pytest.raises(err, match=match):
            op(**args)

"""The hot slot of ``tilefuse.ops.matmul`` (tilefuse.fused.matmul): when two keyed plan lookups in
a row find the same plan, that plan becomes the hot one and later calls are checked against it
with one guard call (``_fast.tensor_guard``: torch's dynamo tensor guard) instead of building and
hashing a key. Checked here: a hot call equals the custom-op path bit for bit and skips the full
path; anything the key tells apart (and autocast, functorch transforms, jit tracing, compiling,
the torch backend, the custom-op switch) misses the slot and takes the path it took before; a
caller that alternates signatures never keeps a slot; a tuning change empties it.
"""
import warnings

import pytest
import torch

import tilefuse
from fast_path_utils import assert_same, compiled_targets
from tilefuse.bench.host import stub_launches
from tilefuse.fused import _fast
from tilefuse.fused import matmul as fm
from tilefuse.fused._fast import custom_op_path

ops = tilefuse.ops


@pytest.fixture(autouse=True)
def _cold():
    fm._MATMUL.hot.clear()
    fm._MATMUL.last[:] = [None, None]
    yield
    fm._MATMUL.hot.clear()


def _make_hot(a, b, **kw):
    """Three calls under no_grad: the full path plans, two keyed hits promote the plan."""
    with torch.no_grad():
        for _ in range(3):
            ops.matmul(a, b, **kw)
    assert False in fm._MATMUL.hot


def _ref(a, b, **kw):
    with torch.no_grad(), custom_op_path():
        return ops.matmul(a, b, **kw)


def test_this_torch_supports_the_guard():
    assert _fast._guards_work()


@pytest.mark.parametrize("kw", [{}, {"activation": "gelu"}, {"out_dtype": torch.float64}])
def test_hot_call_equals_custom_op_and_skips_the_full_path(monkeypatch, kw):
    a, b = torch.randn(5, 8), torch.randn(8, 6)
    _make_hot(a, b, **kw)
    xs = (a, a.clone(), torch.randn(5, 8))  # any tensor with the same signature
    refs = [_ref(x, b, **kw) for x in xs]
    monkeypatch.setattr(fm, "_matmul", lambda *args: pytest.fail("full path ran"))
    monkeypatch.setattr(fm, "find_plan", None)  # nor a keyed lookup
    with torch.no_grad(), stub_launches() as count:
        ops.matmul(a, b, **kw)
    assert count.n == 1
    with torch.no_grad():
        for x, ref in zip(xs, refs):
            assert_same(ops.matmul(x, b, **kw), ref)


def _variants(a, b):
    """Calls that differ from ``matmul(a, b)`` in one thing the plan key tells apart."""
    return {
        "shape": (torch.randn(7, 8), b, {}),
        "transposed": (torch.randn(8, 5).t(), b, {}),
        "sliced": (torch.randn(10, 8)[::2], b, {}),
        "dtype": (a.double(), b.double(), {}),
        "half": (a.half(), b.half(), {}),
        "b_transposed": (a, torch.randn(6, 8).t(), {}),
        "requires_grad": (a.clone().requires_grad_(), b, {}),
        "same_tensor": (torch.randn(8, 8), None, {}),
        "parameter": (a, torch.nn.Parameter(b.clone()), {}),
        "activation": (a, b, {"activation": "relu"}),
        "act_tuple": (a, b, {"activation": ("leaky_relu", 0.3)}),
        "out_dtype": (a, b, {"out_dtype": torch.float16}),
        "bias": (a, b, {"bias": torch.randn(6)}),
        "residual": (a, b, {"residual": torch.randn(5, 6)}),
    }


@pytest.mark.parametrize("name", sorted(_variants(torch.randn(5, 8), torch.randn(8, 6))))
def test_other_signatures_miss_the_slot(name):
    a, b = torch.randn(5, 8), torch.randn(8, 6)
    _make_hot(a, b)
    hot = fm._MATMUL.hot[False]
    x, y, kw = _variants(a, b)[name]
    if y is None:  # matmul(x, x): one tensor twice
        y = x
    with torch.no_grad():
        out = ops.matmul(x, y, **kw)
        ref = _ref(x.detach(), y.detach(), **kw)
    assert_same(out.detach(), ref)
    # a miss empties the slot (or, for a tensor that only differs in requires_grad under
    # no_grad, whose plan key is the same, makes a slot for that tensor)
    assert fm._MATMUL.hot.get(False) is not hot
    with torch.no_grad():  # and the hot signature is served right again
        assert_same(ops.matmul(a, b), _ref(a, b))


def test_alternating_signatures_keep_no_slot():
    pairs = [(torch.randn(4, 8), torch.randn(8, 3)), (torch.randn(6, 8), torch.randn(8, 5))]
    with torch.no_grad():
        for i in range(8):
            a, b = pairs[i % 2]
            assert_same(ops.matmul(a, b), _ref(a, b))
            if i >= 2:
                assert False not in fm._MATMUL.hot


def test_modes_miss_the_slot(monkeypatch):
    a, b = torch.randn(5, 8), torch.randn(8, 6)
    _make_hot(a, b)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.matmul(a, b).dtype == torch.bfloat16
    _make_hot(a, b)
    hot = fm._MATMUL.hot[False]
    fm._MATMUL.hot[False] = hot[:6] + (lambda *args: pytest.fail("hot plan ran under vmap"),)
    try:  # (the interpreter cannot launch on vmap's batched tensors: only the path matters)
        torch.func.vmap(lambda x: ops.matmul(x, b))(torch.stack([a, 2 * a]))
    except NotImplementedError:
        pass
    assert False not in fm._MATMUL.hot
    _make_hot(a, b)
    with custom_op_path(), stub_launches() as count:
        ops.matmul(a, b)  # (the custom op launches the same kernel)
    assert count.n == 1 and False in fm._MATMUL.hot  # the switch is checked before the slot
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    with torch.no_grad(), stub_launches() as count:
        torch.testing.assert_close(ops.matmul(a, b), a @ b)
    assert count.n == 0


def test_jit_trace_records_the_op_after_a_hot_slot():
    a, b = torch.randn(5, 8), torch.randn(8, 6)
    _make_hot(a, b)
    with warnings.catch_warnings():  # (jit.trace is deprecated; it still traces)
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(lambda x: ops.matmul(x, b), (a,), check_trace=False)
    assert "tilefuse::matmul" in str(traced.graph)
    torch.testing.assert_close(traced(a), a @ b, rtol=1e-5, atol=1e-5)


def test_compile_traces_the_op_after_a_hot_slot():
    a, b = torch.randn(5, 8), torch.randn(8, 6)
    _make_hot(a, b)
    seen, out, ref = compiled_targets(lambda x, y: ops.matmul(x, y), (a, b))
    assert any("tilefuse.matmul" in s for s in seen), seen
    assert torch.equal(out, ref)


def test_grad_slot_equals_custom_op():
    a, b = torch.randn(5, 8), torch.randn(8, 6)
    results = []
    for path in ("plan",) * 4 + ("custom",):
        x, w = a.clone().requires_grad_(), b.clone().requires_grad_()
        with custom_op_path(path == "custom"):
            y = ops.matmul(x, w, activation="silu")
            y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad, w.grad))
    assert True in fm._MATMUL.hot
    for res in results[:4]:
        for got, ref in zip(res, results[4]):
            assert_same(got, ref)


def test_tuning_change_empties_the_slot():
    from tilefuse.kernels import clear_launch_caches

    a, b = torch.randn(5, 8), torch.randn(8, 6)
    _make_hot(a, b)
    clear_launch_caches()
    assert not fm._MATMUL.hot
    with torch.no_grad():
        assert_same(ops.matmul(a, b), _ref(a, b))


def test_validation_still_runs_for_a_new_signature_after_a_hot_slot():
    a, b = torch.randn(5, 8), torch.randn(8, 6)
    _make_hot(a, b)
    with pytest.raises(ValueError, match="inner dimensions"):
        ops.matmul(a, torch.randn(7, 6))
    with pytest.raises(TypeError):
        ops.matmul(a, b.long())


def test_threads_alternating_signatures():
    """Two threads with different signatures share the slot: no call raises (a miss empties
    the slot with pop: the other thread may have emptied it already). Launches are stubbed:
    the Triton interpreter itself is not thread-safe."""
    import threading

    pairs = [(torch.randn(4, 8), torch.randn(8, 3)), (torch.randn(6, 8), torch.randn(8, 5))]
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(200):
                    assert ops.matmul(*pairs[i]).shape == (pairs[i][0].shape[0],
                                                           pairs[i][1].shape[1])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with stub_launches():
        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    with torch.no_grad():
        for a, b in pairs:
            assert_same(ops.matmul(a, b), _ref(a, b))

"""tilefuse.models.cuda_graph_inference / prepare_inference(cuda_graph=True) and its use by
``tilefuse bench models``.

Everywhere: the error paths (CPU model or inputs, bad arguments, input changes after capture) and
the wrapper's plumbing under a stand-in for ``torch.cuda.graph`` (``fake_cuda``: modules record
how to recompute their outputs in place while a "capture" is open, ``replay()`` reruns them).
``@pytest.mark.cuda``: real capture and replay against eager outputs (skipped without a GPU)."""
import contextlib

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import tilefuse
from tilefuse.bench import models as mb
from tilefuse.models import cuda_graph as cg


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


# ------------------------------------------------------------------------------------------
# error paths (any machine)
# ------------------------------------------------------------------------------------------
def test_cpu_model_is_refused_with_a_clear_error():
    model = _mlp().eval()
    with pytest.raises(ValueError, match=r"CUDA graphs need CUDA: the model.s .0.weight. is on cpu"):
        tilefuse.models.cuda_graph_inference(model, torch.randn(1, 8))
    with pytest.raises(ValueError, match="CUDA graphs need CUDA"):
        tilefuse.models.prepare_inference(model, torch.randn(1, 8), cuda_graph=True)
    assert type(model[0]) is nn.Linear  # refused before patching: the model is untouched


def test_cpu_inputs_are_refused_naming_the_input():
    relu = nn.ReLU().eval()  # no parameters: the inputs are checked
    with pytest.raises(ValueError, match=r"input args\[1\] is on cpu"):
        cg.cuda_graph_inference(relu, (1.0, torch.randn(2)))
    with pytest.raises(ValueError, match=r"input kwargs\['mask'\] is on cpu"):
        cg.cuda_graph_inference(relu, {"mask": torch.randn(2)})


def test_bad_arguments():
    relu = nn.ReLU().eval()
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        cg.cuda_graph_inference(relu, 3)
    with pytest.raises(ValueError, match="holds no tensor"):
        cg.cuda_graph_inference(relu, {"scale": 1.0})
    with pytest.raises(ValueError, match="training mode"):
        cg.cuda_graph_inference(nn.ReLU(), torch.randn(2))
    with pytest.raises(ValueError, match="warmup"):
        cg.cuda_graph_inference(relu, torch.randn(2), warmup=0)
    with pytest.raises(TypeError, match="model must be"):
        cg.cuda_graph_inference("relu", torch.randn(2))
    with pytest.raises(ValueError, match="needs example_inputs"):
        tilefuse.models.prepare_inference(_mlp(), cuda_graph=True)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tilefuse.models.prepare_inference(lambda x: x)


def test_call_inputs_checked_against_the_captured_ones():
    x, mask = torch.randn(1, 8), torch.ones(1, 8, dtype=torch.bool)
    names, static, spec = cg._flatten((x,), {"mask": mask, "scale": 2.0})
    assert names == ["args[0]", "kwargs['mask']", "kwargs['scale']"]

    def match(*args, **kwargs):
        return cg._match_inputs(names, static, spec, args, kwargs)

    assert match(torch.randn(1, 8), scale=2.0, mask=mask)[0].shape == (1, 8)  # kwarg order free
    with pytest.raises(ValueError, match=r"input args\[0\]: got shape \(2, 8\) float32.*captured "
                                         r"for shape \(1, 8\) float32.*static shapes"):
        match(torch.randn(2, 8), mask=mask, scale=2.0)
    with pytest.raises(ValueError, match=r"input args\[0\]: got shape \(1, 8\) float64"):
        match(x.double(), mask=mask, scale=2.0)
    with pytest.raises(ValueError, match=r"input kwargs\['mask'\]: expected a tensor"):
        match(x, mask=None, scale=2.0)
    with pytest.raises(ValueError, match=r"kwargs\['scale'\] is 3.0 .* captured with 2.0"):
        match(x, mask=mask, scale=3.0)
    with pytest.raises(ValueError, match="differ in structure"):
        match(x, mask=mask)
    with pytest.raises(ValueError, match="differ in structure"):
        match(x, mask, scale=2.0)


# ------------------------------------------------------------------------------------------
# the wrapper's plumbing under a stand-in capture (any machine)
# ------------------------------------------------------------------------------------------
class _Tape:
    """Stands in for ``torch.cuda.CUDAGraph``: modules record themselves while it captures."""
    capturing = None

    def __init__(self):
        self.records, self.replays = [], 0

    def replay(self):
        self.replays += 1
        for rerun in self.records:
            rerun()


class _Stream:
    def wait_stream(self, other):
        pass


@contextlib.contextmanager
def _capture(graph, pool=None):
    _Tape.capturing = graph
    try:
        yield
    finally:
        _Tape.capturing = None


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(cg, "_check_capturable", lambda model, names, leaves: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", _Stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Tape)
    monkeypatch.setattr(torch.cuda, "graph", _capture)


class _TwoHeads(nn.Module):
    """``{"y": lin(x) masked * scale, "stats": (x.sum(), x.amax())}``; under a ``_Tape`` capture it
    records how to recompute those outputs in place from the same (static) inputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.calls = 0

    def compute(self, x, mask, scale):
        return {"y": self.lin(x).masked_fill(~mask, 0.0) * scale, "stats": (x.sum(), x.amax())}

    def forward(self, x, mask, scale=1.0):
        self.calls += 1
        out = self.compute(x, mask, scale)
        if _Tape.capturing is not None:
            def rerun():
                for o, n in zip(pytree.tree_leaves(out), pytree.tree_leaves(self.compute(x, mask,
                                                                                         scale))):
                    o.copy_(n)
            _Tape.capturing.records.append(rerun)
        return out


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 8, generator=g), "mask": torch.rand(2, 4, generator=g) > 0.5,
            "scale": 2.0}


def test_replays_return_fresh_outputs_matching_eager(fake_cuda):
    model = _TwoHeads().eval()
    example = _inputs(0)
    kept = {k: v.clone() if torch.is_tensor(v) else v for k, v in example.items()}
    graphed = cg.cuda_graph_inference(model, example, warmup=2)
    assert model.calls == 3 and graphed.graph.replays == 0  # 2 warm-ups + the capture
    outs = []
    with torch.no_grad():
        for seed in (1, 2, 3):
            inp = _inputs(seed)
            out = graphed(**inp)
            torch.testing.assert_close(out, model.compute(**inp))
            outs.append((inp, out))
        for inp, out in outs:  # clone_outputs=True: earlier results are not overwritten
            torch.testing.assert_close(out, model.compute(**inp))
    assert model.calls == 3 and graphed.graph.replays == 3  # replays never run forward
    for k, v in kept.items():  # the caller's example tensors are not the graph's buffers
        assert torch.equal(example[k], v) if torch.is_tensor(v) else example[k] == v
    assert "kwargs['x']" in repr(graphed)


def test_static_outputs_and_inputs_without_copies(fake_cuda):
    model = _TwoHeads().eval()
    graphed = cg.cuda_graph_inference(model, _inputs(0), clone_outputs=False)
    first = graphed(**_inputs(1))
    second = graphed(**_inputs(2))
    assert first["y"] is second["y"] and first["stats"][0] is second["stats"][0]
    torch.testing.assert_close(first, model.compute(**_inputs(2)))
    _, static = graphed.static_inputs
    static["x"].copy_(_inputs(3)["x"])  # written in place, passed back as itself: no copy needed
    out = graphed(x=static["x"], mask=static["mask"], scale=2.0)
    torch.testing.assert_close(out["y"], model.compute(static["x"], static["mask"], 2.0)["y"])
    with pytest.raises(ValueError, match="static shapes"):
        graphed(**{**_inputs(4), "x": torch.randn(3, 8)})


def test_a_view_sharing_the_buffer_pointer_is_still_copied(fake_cuda):
    class Square(nn.Module):
        def forward(self, x):
            out = x @ torch.arange(16.0).reshape(4, 4)
            if _Tape.capturing is not None:
                _Tape.capturing.records.append(lambda: out.copy_(x @ torch.arange(16.0).reshape(
                    4, 4)))
            return out

    graphed = cg.cuda_graph_inference(Square().eval(), torch.zeros(4, 4))
    (static,), _ = graphed.static_inputs
    static.copy_(torch.randn(4, 4))
    want = static.t() @ torch.arange(16.0).reshape(4, 4)
    torch.testing.assert_close(graphed(static.t()), want)  # same data_ptr, other layout


def test_capture_failure_is_wrapped_and_warmup_errors_are_not(fake_cuda, monkeypatch):
    @contextlib.contextmanager
    def failing(graph, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        yield

    monkeypatch.setattr(torch.cuda, "graph", failing)
    with pytest.raises(RuntimeError, match=r"capture of _TwoHeads failed \(RuntimeError: "
                                           r"operation not permitted when stream is capturing\)"):
        cg.cuda_graph_inference(_TwoHeads().eval(), _inputs(0))
    class Broken(nn.Module):
        def forward(self, x):
            raise KeyError("not a capture problem")

    with pytest.raises(KeyError, match="not a capture problem"):  # warm-up errors: unchanged
        cg.cuda_graph_inference(Broken().eval(), torch.randn(3, 8))


# ------------------------------------------------------------------------------------------
# tilefuse bench models (any machine)
# ------------------------------------------------------------------------------------------
def test_bench_falls_back_to_eager_when_capture_fails():
    rep = {"errors": []}
    model, x = _mlp().eval(), torch.randn(1, 8)
    fn, graphed = mb.timed_call(rep, "model/mlp/bs1/eager", model, x, "cuda", 1, "eager")
    assert not graphed and torch.equal(fn(), model(x))
    assert rep["errors"][0]["where"] == "model/mlp/bs1/eager/cuda_graph"
    assert rep["errors"][0]["error"].startswith(
        "timed without a CUDA graph: ValueError: CUDA graphs need CUDA")
    for args in [("cpu", 1, "eager"), ("cuda", 32, "eager"), ("cuda", 1, "patched+compile")]:
        assert mb.timed_call(rep, "k", model, x, *args)[1] is False
    assert mb.timed_call(rep, "k", model, x, "cuda", 1, "eager", cuda_graph=False)[1] is False
    assert len(rep["errors"]) == 1  # only a failed capture is reported


def test_bench_times_graph_replays_at_batch_1(fake_cuda):
    class Wrapped(_TwoHeads):
        def forward(self, x):
            return super().forward(x, torch.ones(1, 4, dtype=torch.bool))["y"]

    rep = {"errors": []}
    model = Wrapped().eval()
    x = torch.randn(1, 8)
    fn, graphed = mb.timed_call(rep, "k", model, x, "cuda", 1, "patched")
    assert graphed and rep["errors"] == []
    calls = model.calls
    torch.testing.assert_close(fn(), model.lin(x))
    assert model.calls == calls  # a replay, not a forward


def test_bench_models_cpu_rows_say_not_graphed(monkeypatch):
    monkeypatch.setitem(mb.EXTRA_MODELS, "mlp_cg", (lambda fused=False: nn.Sequential(
        nn.Flatten(), nn.Linear(12, 4)), "3x2x2"))
    rep = mb.run(models=["mlp_cg"], variants=["eager", "patched"], runs=2, warmup=1, train=False,
                 show_progress=False)
    assert [e["cuda_graph"] for e in rep["entries"]] == [False, False]
    assert rep["errors"] == []


# ------------------------------------------------------------------------------------------
# real capture and replay (GPU only)
# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_replay_matches_eager_for_new_inputs(dtype):
    model = tilefuse.patch(_mlp().eval()).cuda().to(dtype)
    graphed = cg.cuda_graph_inference(model, torch.randn(4, 8, device="cuda", dtype=dtype))
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    results = []
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 8, device="cuda", dtype=dtype)
            results.append((graphed(x), model(x)))
    for got, want in results:  # clone_outputs: every result survives the later replays
        torch.testing.assert_close(got, want, **tol)
    with pytest.raises(ValueError, match=r"input args\[0\]: got shape \(2, 8\)"):
        graphed(torch.randn(2, 8, device="cuda", dtype=dtype))
    with pytest.raises(ValueError, match="on cpu"):
        graphed(torch.randn(4, 8, dtype=dtype))


@pytest.mark.cuda
def test_cuda_pytree_outputs_kwargs_and_static_outputs():
    model = _TwoHeads().cuda().eval()
    inp = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _inputs(0).items()}
    graphed = cg.cuda_graph_inference(model, inp, clone_outputs=False)
    for seed in (1, 2):
        new = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _inputs(seed).items()}
        out = graphed(**new)
        with torch.no_grad():
            torch.testing.assert_close(out, model.compute(**new))
    assert graphed(**new)["y"] is out["y"]  # static output buffers when not cloned


@pytest.mark.cuda
def test_cuda_prepare_inference_graph_of_a_zoo_model():
    model = tilefuse.models.resnet18(num_classes=10, width=0.25).cuda()
    x = torch.randn(1, 3, 32, 32, device="cuda")
    graphed = tilefuse.models.prepare_inference(model, x, cuda_graph=True)
    assert isinstance(graphed, tilefuse.models.CUDAGraphInference) and not model.training
    with torch.inference_mode():  # callable inside inference mode, buffers stay usable outside
        y = torch.randn_like(x)
        torch.testing.assert_close(graphed(y), model(y), rtol=1e-3, atol=1e-3)
    y = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(graphed(y), model(y), rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
def test_cuda_bench_bs1_rows_are_graph_replays():
    rep = mb.run(device="cuda", models=["textcls"], batches=[1, 2], variants=["eager", "patched"],
                 runs=3, warmup=1, size="tiny", train=False, proxies=False, show_progress=False)
    graphed = {(e["batch"], e["impl"]): e["cuda_graph"] for e in rep["entries"]}
    assert graphed == {(1, "eager"): True, (1, "patched"): True, (2, "eager"): False,
                       (2, "patched"): False}, rep["errors"]

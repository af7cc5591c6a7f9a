"""CUDA-graph capture of fused models and the fused optimizer step (GPU only). Batch-1 latency is
launch-bound in eager mode (shared/perf-notes.md), so every fused op must be capturable: no host
syncs, no allocations outside the caching allocator, no tuning during capture."""
import pytest
import torch

import tilefuse

pytestmark = pytest.mark.cuda


def _capture(fn, static_in):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: compile kernels, settle the allocator
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)
    return graph, static_out


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_inference_graph_replay_matches_eager(name, dtype):
    torch.manual_seed(0)
    model = getattr(tilefuse.models, name)(num_classes=10).cuda().to(dtype).eval()
    x = torch.randn(1, 3, 64, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        graph, out = _capture(model, x)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.testing.assert_close(out, model(x), rtol=2e-2, atol=2e-2)


def test_text_classifier_graph_replay():
    torch.manual_seed(0)
    model = tilefuse.models.text_classifier().cuda().eval()
    ids = torch.randint(0, 1000, (1, 64), device="cuda")
    with torch.no_grad():
        graph, out = _capture(model, ids)
        graph.replay()
        torch.testing.assert_close(out, model(ids), rtol=1e-3, atol=1e-3)


def test_train_step_graph_with_capturable_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(tilefuse.nn.Linear(64, 128, activation="gelu"),
                                tilefuse.nn.Linear(128, 10)).cuda()
    opt = tilefuse.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"),
                               capturable=True)
    x = torch.randn(32, 64, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")

    def step(inp):
        opt.zero_grad(set_to_none=False)
        loss = tilefuse.ops.cross_entropy(model(inp), y)
        loss.backward()
        opt.step()
        return loss

    graph, loss = _capture(step, x)
    graph.replay()  # capture records without running: `loss` holds a value only after a replay
    first = loss.item()
    for _ in range(20):
        graph.replay()
    assert loss.item() < first

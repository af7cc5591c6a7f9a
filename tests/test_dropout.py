"""Dropout / dropout_add / dropout2d: statistics, reproducibility, forward/backward mask identity,
checkpoint recompute, layouts, dtypes, errors (Triton interpreter on CPU, compiled on GPU)."""
import pytest
import torch

import tilefuse
from tilefuse import ops

P = 0.3
SCALE = 1.0 / (1.0 - P)


def test_keep_rate_and_mean(device):
    x = torch.ones(256, 256, device=device)
    y = ops.dropout(x, P)
    keep = (y != 0).float().mean().item()
    assert abs(keep - (1 - P)) < 0.01  # 5 sigma for 65536 draws
    assert abs(y.mean().item() - 1.0) < 0.02
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], SCALE))


def test_values_and_dtypes(device):
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(37, 53, device=device).to(dtype)
        y = ops.dropout(x, P)
        assert y.dtype == dtype and y.shape == x.shape
        kept = y != 0
        # survivors: x * 1/(1-p) in the op's compute dtype (fp32, fp64 for fp64), one rounding
        ref = (x.double() * SCALE).to(dtype)
        tol = {torch.float64: 1e-15, torch.float32: 2e-7}.get(dtype, 0.0)
        assert torch.allclose(y[kept].double(), ref[kept].double(), rtol=tol + 1e-2 * (
            dtype in (torch.float16, torch.bfloat16)), atol=0)


def test_reproducible_and_fresh(device):
    x = torch.randn(64, 33, device=device)
    torch.manual_seed(7)
    a = ops.dropout(x, 0.5)
    b = ops.dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(ops.dropout(x, 0.5), a)
    assert not torch.equal(a, b)
    torch.manual_seed(7)
    # the seed comes from the input device's generator: fork that one (as for F.dropout)
    with torch.random.fork_rng(devices=[x.device.index or 0] if x.is_cuda else []):
        ops.dropout(x, 0.5)
        ops.dropout(x, 0.5)
    assert torch.equal(ops.dropout(x, 0.5), a)  # fork_rng isolated the draws inside it


def test_seed_lives_on_input_device(device, monkeypatch):
    """The seed is drawn on the input's device and handed to the kernel as a tensor (read
    through a pointer), never as a host int: no ``.item()`` on the Triton path."""
    import tilefuse.fused.dropout as fd
    import tilefuse.kernels.dropout as kd

    drawn, launched = [], []
    real_draw, real_launch = fd.draw_seed, kd.launch_dropout

    def draw(dev=None):
        drawn.append(real_draw(dev))
        return drawn[-1]

    def launch(x, out, seed, *args, **kw):
        launched.append(seed)
        return real_launch(x, out, seed, *args, **kw)

    monkeypatch.setattr(fd, "draw_seed", draw)
    monkeypatch.setattr(kd, "launch_dropout", launch)
    x = torch.randn(16, 24, device=device, requires_grad=True)
    real_item = torch.Tensor.item

    def no_item(t):
        if t.dtype == torch.int64 and any(t is s or t._base is s for s in drawn):
            raise AssertionError("seed read on the host")
        return real_item(t)

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    y = ops.dropout(x, 0.5)
    y2 = ops.dropout_add(x, torch.zeros_like(x), 0.5)
    y3 = ops.dropout2d(x.detach().reshape(2, 3, 8, 8), 0.5)
    (y.sum() + y2.sum()).backward()
    monkeypatch.setattr(torch.Tensor, "item", real_item)
    assert len(drawn) == 3 and all(s.device == x.device and s.dtype == torch.int64 and
                                   s.shape == (2,) for s in drawn)
    # 3 forwards + 2 backwards, each launch gets a device tensor (the saved seed in backward)
    assert len(launched) == 5
    assert all(isinstance(s, torch.Tensor) and s.device == x.device for s in launched)
    assert any(launched[i] is drawn[0] for i in range(len(launched)))
    assert y3.shape == (2, 3, 8, 8)


def test_seed_is_an_aligned_pair_with_randints_draw(device):
    """draw_seed: a 16-byte aligned int64 pair (one 128-bit load in the kernel) drawn by one
    ``torch.randint`` (one op: host cost), whose element 0 is the value the former 0-d seed
    ``torch.randint(2**31 - 1, ())`` drew after a ``torch.manual_seed``; later pairs follow the
    generator as ``torch.randint(2**31 - 1, (2,))`` does."""
    from tilefuse.fused.dropout import draw_seed

    torch.manual_seed(5)
    first = torch.randint(2**31 - 1, (), device=device)
    torch.manual_seed(5)
    ref = [torch.randint(2**31 - 1, (2,), device=device) for _ in range(3)]
    torch.manual_seed(5)
    got = [draw_seed(torch.device(device)) for _ in range(3)]
    assert got[0][0].item() == first.item()
    for r, g in zip(ref, got):
        assert g.shape == (2,) and g.dtype == torch.int64 and g.is_contiguous()
        assert g.data_ptr() % 16 == 0 and g.device == r.device
        assert torch.equal(g, r)


def test_caller_seed_and_pair_give_one_mask(device):
    """A caller's 0-d seed (copied to a pair by the launcher) and a pair holding the same value
    (its second word garbage) give bit-identical outputs: only element 0 is the seed."""
    from tilefuse.fused.dropout import dropout_op

    x = torch.randn(33, 65, device=device)
    a = dropout_op(x, None, torch.tensor(4321, device=device), P, 1)
    b = dropout_op(x, None, torch.tensor([4321, -987654321], device=device), P, 1)
    assert torch.equal(a, b)
    c = dropout_op(x, None, torch.tensor([4322, -987654321], device=device), P, 1)
    assert not torch.equal(a, c)


def test_backward_regenerates_mask(device):
    x = (torch.rand(45, 61, device=device) + 0.5).requires_grad_()
    y = ops.dropout(x, P)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx == 0, y == 0)
    kept = y != 0
    assert torch.allclose(gx[kept], g[kept] * SCALE)


def test_checkpoint_recompute(device):
    w = torch.randn(16, 16, device=device)

    def block(h):
        return ops.dropout(torch.tanh(h @ w), 0.5) @ w

    x = torch.randn(8, 16, device=device, requires_grad=True)
    torch.manual_seed(3)
    (g_ref,) = torch.autograd.grad(block(x).sum(), x)
    torch.manual_seed(3)
    y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    (g_ck,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g_ref, g_ck)


@pytest.mark.parametrize("make", [
    lambda t: t.t(),                               # transposed
    lambda t: t[::2, 1:-3],                        # sliced
    lambda t: t.reshape(4, 6, 10)[:, :, ::3].permute(2, 0, 1),
], ids=["transposed", "sliced", "3d-permuted"])
def test_non_contiguous_uses_logical_index(device, make):
    x = make(torch.randn(24, 10, device=device))
    torch.manual_seed(1)
    a = ops.dropout(x, 0.5)
    torch.manual_seed(1)
    b = ops.dropout(x.contiguous(), 0.5)
    assert torch.equal(a, b)


def test_high_rank_and_edge_shapes(device):
    x = torch.randn(2, 3, 2, 3, 2, 3, device=device)[..., ::2]  # > 4 dims after merging
    torch.manual_seed(2)
    a = ops.dropout(x, 0.5)
    torch.manual_seed(2)
    assert torch.equal(a, ops.dropout(x.contiguous(), 0.5))
    x = torch.randn(2 * 3001, device=device)[::2]  # strided path vs multi-chunk fast path
    torch.manual_seed(2)
    a = ops.dropout(x, 0.5)
    torch.manual_seed(2)
    assert torch.equal(a, ops.dropout(x.contiguous(), 0.5))
    for shape in [(0, 5), (1,), (1, 1), (7,)]:
        x = torch.randn(shape, device=device)
        assert ops.dropout(x, 0.5).shape == x.shape


def test_identity_zero_and_errors(device):
    x = torch.randn(5, 7, device=device, requires_grad=True)
    assert ops.dropout(x, 0.0) is x
    assert ops.dropout(x, 0.9, training=False) is x
    z = ops.dropout(x, 1.0)
    assert torch.equal(z, torch.zeros_like(x))
    z.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(ValueError, match="p"):
        ops.dropout(x, 1.5)
    with pytest.raises(TypeError, match="p"):
        ops.dropout(x, "0.5")
    with pytest.raises(TypeError, match="x"):
        ops.dropout(torch.ones(3, dtype=torch.int64, device=device), 0.5)
    with pytest.raises(TypeError, match="training"):
        ops.dropout(x, 0.5, training=1)


def test_dropout_add(device):
    x = torch.randn(33, 40, device=device, requires_grad=True)
    r = torch.randn(40, device=device, requires_grad=True)  # broadcast residual
    torch.manual_seed(4)
    y = ops.dropout_add(x, r, P)
    torch.manual_seed(4)
    d = ops.dropout(x, P)
    assert torch.allclose(y, d + r, atol=1e-6)
    g = torch.randn_like(y)
    gx, gr = torch.autograd.grad(y, (x, r), g)
    assert torch.equal(gx == 0, d == 0)
    assert torch.allclose(gr, g.sum(0), atol=1e-5)
    h = torch.randn(8, 8, device=device, dtype=torch.float16)
    res = torch.randn(8, 8, device=device)
    assert ops.dropout_add(h, res, 0.5).dtype == torch.float32  # torch promotion
    assert torch.equal(ops.dropout_add(h, res, 0.5, training=False), res + h)
    with pytest.raises(ValueError, match="residual"):
        ops.dropout_add(x, torch.randn(3, device=device), 0.5)


def test_dropout2d_channels(device):
    x = torch.rand(3, 16, 5, 7, device=device) + 0.5
    y = ops.dropout2d(x, 0.5)
    dropped = (y == 0).all(dim=(2, 3))
    kept = (y != 0).all(dim=(2, 3))
    assert torch.equal(dropped | kept, torch.ones_like(dropped))
    assert 0 < dropped.sum() < dropped.numel()
    cl = x.to(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(5)
    a = ops.dropout2d(x, 0.5)
    torch.manual_seed(5)
    b = ops.dropout2d(cl, 0.5)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)
    (g,) = torch.autograd.grad(b.sum(), cl)
    assert torch.equal(g == 0, b == 0)
    assert ops.dropout2d(torch.randn(4, 3, 3, device=device), 0.5).shape == (4, 3, 3)
    with pytest.raises(ValueError, match="x"):
        ops.dropout2d(torch.randn(4, 3, device=device), 0.5)


def test_modules(device):
    m = tilefuse.nn.Dropout(0.25)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.25
    x = torch.randn(4, 9, device=device)
    y = m(x)
    assert ((y == 0) | torch.isclose(y, x / 0.75)).all()
    assert m.eval()(x) is x
    m2 = tilefuse.nn.Dropout2d(0.5)
    assert isinstance(m2, torch.nn.Dropout2d)
    assert m2(torch.randn(2, 4, 3, 3, device=device)).shape == (2, 4, 3, 3)


def test_torch_backend_path(monkeypatch):
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    x = (torch.rand(30, 20) + 0.5).requires_grad_()
    y = ops.dropout_add(x, torch.zeros(30, 20), P)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g == 0, y == 0)
    assert abs((y != 0).float().mean().item() - (1 - P)) < 0.1
    torch.manual_seed(9)
    a = ops.dropout2d(torch.ones(2, 8, 3, 3), 0.5)
    assert ((a == 0).all(dim=(2, 3)) | (a == 2).all(dim=(2, 3))).all()


def test_compile_fullgraph_fresh_per_call(device):
    torch._dynamo.reset()
    f = torch.compile(lambda t: ops.dropout(t, 0.5) * 2.0, fullgraph=True, backend="aot_eager")
    x = torch.ones(64, 32, device=device, requires_grad=True)
    a, b = f(x), f(x)
    assert not torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad == 0, a == 0)


@pytest.mark.slow
def test_compile_inductor(device):
    torch._dynamo.reset()
    f = torch.compile(lambda t, r: ops.dropout_add(t, r, 0.5), fullgraph=True)
    x, r = torch.ones(64, 32, device=device), torch.zeros(64, 32, device=device)
    a, b = f(x, r), f(x, r)
    assert not torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.cuda
@pytest.mark.slow
def test_int64_counters_past_2_pow_31():
    n = 2**31 + 2**20  # 4 GiB of fp16: counters past 2^31 must not wrap onto the head's
    x = torch.ones(n, device="cuda", dtype=torch.float16)
    y = ops.dropout(x, 0.5)
    head, tail = y[: 2**20] == 0, y[2**31:] == 0
    assert not torch.equal(head, tail)
    assert abs(tail.float().mean().item() - 0.5) < 0.01
    del x, y


@pytest.mark.cuda
def test_cuda_generator_drives_masks():
    x = torch.ones(128, 128, device="cuda")
    torch.cuda.manual_seed(1)
    a = ops.dropout(x, 0.5)
    torch.rand(10)  # the CPU generator plays no part
    torch.cuda.manual_seed(1)
    assert torch.equal(ops.dropout(x, 0.5), a)
    torch.cuda.manual_seed(2)
    assert not torch.equal(ops.dropout(x, 0.5), a)
    torch.manual_seed(3)  # seeds every device's generator too
    b = ops.dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(ops.dropout(x, 0.5), b)


@pytest.mark.cuda
def test_cuda_graph_replays_draw_fresh_masks():
    from tilefuse.ops import dropconnect_linear

    x = torch.ones(256, 256, device="cuda")
    w = torch.ones(64, 256, device="cuda")

    def step():
        return ops.dropout(x, 0.5), ops.dropout_add(x, x, 0.5), dropconnect_linear(
            x, w, p=0.5)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernels outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    g.replay()
    first = [o.clone() for o in outs]
    g.replay()
    second = [o.clone() for o in outs]
    torch.cuda.synchronize()
    for a, b in zip(first, second):
        assert not torch.equal(a, b)  # the seed is drawn and read on the device per replay
    for y in (first[0], second[0]):
        assert abs((y != 0).float().mean().item() - 0.5) < 0.02
        assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert set(first[1].unique().tolist()) <= {1.0, 3.0}


@pytest.mark.parametrize("case", ["contig_odd", "transposed", "bcast_residual", "dropout2d",
                                  "dropout2d_cl", "permuted3d"])
def test_gpu_block_tiling_keeps_masks(device, monkeypatch, case):
    """The GPU configs (4096-element contiguous blocks, 1024-element 2-D tiles on the strided
    path, VEC size hints) give bit-identical outputs to the interpreter's one-big-block
    configs: the keep rule depends only on (seed, logical index), never on the tiling."""
    import tilefuse.kernels.dropout as kd

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 37, 53, generator=g).to(device)
    run = {
        "contig_odd": lambda: ops.dropout(x.reshape(-1)[:9999], P),
        "transposed": lambda: ops.dropout(x[0, 0].t(), P),
        "bcast_residual": lambda: ops.dropout_add(x[0], x[0, 0, 0].expand(5, 37, 53), P),
        "dropout2d": lambda: ops.dropout2d(x, P),
        "dropout2d_cl": lambda: ops.dropout2d(x.to(memory_format=torch.channels_last), P),
        "permuted3d": lambda: ops.dropout(x[1].permute(2, 0, 1), P),
    }[case]
    torch.manual_seed(11)
    ref = run()
    for block, strided in ((kd.GPU_BLOCK, kd.STRIDED_GPU_BLOCK), (1024, 256)):
        monkeypatch.setattr(kd, "_block", lambda n, is_cuda, b=block: b)
        monkeypatch.setattr(kd, "_tile", lambda inner, blk, s=strided: (
            s // min(s, max(16, 1 << (inner - 1).bit_length())),
            min(s, max(16, 1 << (inner - 1).bit_length()))))
        kd._LAUNCH.clear()
        torch.manual_seed(11)
        assert torch.equal(run(), ref), (case, block)
    kd._LAUNCH.clear()

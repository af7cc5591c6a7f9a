"""Dense conv2d (issue 20): PyTorch's own ``nn.functional.conv2d`` OpInfo samples, awkward shapes,
the fused epilogue and bad arguments, forward and backward, on the Triton interpreter (compiled
Triton on CUDA) against torch / fp64 references."""

import pytest
import torch
import torch.nn.functional as F

import tilefuse
from tilefuse.activations import ACTIVATIONS, torch_activation
from tilefuse.fused._fast import FastOp
from fast_path_utils import assert_compiles_to_custom_op, assert_fast_equals_custom_op
from utils import assert_close_to_ref, torch_test_db

conv2d = tilefuse.ops.conv2d


def _opinfo_samples(dtype):
    """The ``nn.functional.conv2d`` entry of torch's op_db (torch's test-suite samples)."""
    op_db = torch_test_db()

    op = next(o for o in op_db if o.name == "nn.functional.conv2d")
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


def _fwd_bwd(fn, tensors, seed=0):
    """Output and the gradients of every tensor that requires grad, for a fixed cotangent."""
    y = fn(*tensors)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    diff = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    return [y] + list(torch.autograd.grad(y, diff, g))


def _check_opinfo(dtype, batched_only):
    samples = _opinfo_samples(dtype)
    assert len(samples) >= 20
    checked = 0
    for s in samples:
        if batched_only and s.input.dim() == 3:
            continue
        args = [s.input] + list(s.args)
        ours = _fwd_bwd(lambda *a: conv2d(*a, **s.kwargs), args)
        ref = _fwd_bwd(lambda *a: F.conv2d(*a, **s.kwargs), args)
        ref64 = _fwd_bwd(lambda *a: F.conv2d(*a, **s.kwargs),
                         [a.detach().double().requires_grad_(a.requires_grad)
                          if isinstance(a, torch.Tensor) else a for a in args])
        for name, o, r, r64 in zip(("out", "dx", "dw", "db"), ours, ref, ref64):
            assert o.dtype == r.dtype and o.shape == r.shape, (name, s.kwargs)
            assert_close_to_ref(o, r64, r, name=f"{name} {tuple(s.input.shape)} {s.kwargs}")
        checked += 1
    assert checked >= 10


def test_opinfo_samples_float64():
    _check_opinfo(torch.float64, batched_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opinfo_samples_all(dtype):
    _check_opinfo(dtype, batched_only=False)


# ------------------------------------------------------------------------------ shapes
SHAPES = {  # name: (x shape, weight shape, kwargs)
    "1x1": ((2, 8, 5, 7), (16, 8, 1, 1), {}),
    "stem_7x7_s2": ((1, 3, 15, 13), (8, 3, 7, 7), dict(stride=2, padding=3)),
    "primes": ((1, 5, 11, 13), (7, 5, 3, 3), dict(padding=1)),
    "same_even_kernel": ((1, 3, 6, 7), (4, 3, 2, 4), dict(padding="same", dilation=(1, 2))),
    "grouped_strided": ((2, 6, 9, 8), (9, 2, 3, 3), dict(stride=(2, 3), padding=(0, 2),
                                                         groups=3)),
}


def _layouts(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # non-contiguous: every other column of a wider tensor
        return _interleave(x)
    return x


def _interleave(x):
    wide = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1).flatten(-2)
    out = wide[..., ::2]
    assert not out.is_contiguous() and torch.equal(out, x)
    return out


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_awkward_shapes_fp64(name, layout):
    xs, ws, kw = SHAPES[name]
    if layout != "nchw" and name not in ("1x1", "primes"):
        pytest.skip("layouts covered on two shapes (interpreter time)")
    g = torch.Generator().manual_seed(1)
    x = _layouts(torch.randn(xs, generator=g, dtype=torch.float64), layout)
    w = torch.randn(ws, generator=g, dtype=torch.float64)
    b = torch.randn(ws[0], generator=g, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w, b)]
    ours = _fwd_bwd(lambda *a: conv2d(*a, **kw), args)
    ref = _fwd_bwd(lambda *a: F.conv2d(*a, **kw), args)
    for o, r in zip(ours, ref):
        assert_close_to_ref(o, r)
    # output memory format follows torch
    assert ours[0].is_contiguous(memory_format=torch.channels_last) == \
        ref[0].is_contiguous(memory_format=torch.channels_last)
    assert ours[0].stride() == ref[0].stride() or ours[0].shape[1] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_channels_last(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 7, 6, generator=g).to(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3, generator=g) / 12
    b = torch.randn(24, generator=g)
    ref64 = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
    eager = F.relu(F.conv2d(x, w, b, padding=1)).to(dtype)
    y = conv2d(x.to(dtype), w.to(dtype), b.to(dtype), padding=1, activation="relu")
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_ref(y, ref64, eager)


# ------------------------------------------------------------------------------ epilogue
@pytest.mark.parametrize("act", sorted(a for a in ACTIVATIONS if a != "none"))
def test_every_activation_fp64(act):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    y = conv2d(x, w, padding=1, activation=act)
    assert_close_to_ref(y, torch_activation(F.conv2d(x, w, padding=1), act, ACTIVATIONS[act][1]))


@pytest.mark.parametrize("act,post", [(None, "relu"), ("silu", "gelu_tanh"), ("tanh", None)])
def test_residual_and_post_activation_backward_fp64(act, post):
    """ResNet's relu(conv + b + identity) and the general act -> + residual -> post_act chain,
    every gradient (residual included) against torch's composition."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64).to(
        memory_format=torch.channels_last)
    w = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    r = torch.randn(4, 1, 5, generator=g, dtype=torch.float64)   # broadcast residual
    args = [t.requires_grad_() for t in (x, w, b, r)]

    def ref(x, w, b, r):
        u = torch_activation(F.conv2d(x, w, b, padding=1), act or "none") + r
        return torch_activation(u, post or "none")

    ours = _fwd_bwd(lambda x, w, b, r: conv2d(x, w, b, padding=1, activation=act, residual=r,
                                              post_activation=post), args)
    for o, e in zip(ours, _fwd_bwd(ref, args)):
        assert_close_to_ref(o, e)


def test_only_residual_requires_grad_with_post_activation():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 1, 1)
    r = torch.randn(1, 3, 4, 4, requires_grad=True)
    y = conv2d(x, w, residual=r, post_activation="relu")
    (dr,) = torch.autograd.grad(y.sum(), r)
    assert torch.equal(dr, (y > 0).to(dr.dtype))


def test_unbatched_and_zero_batch():
    x, w = torch.randn(3, 5, 5), torch.randn(4, 3, 3, 3)
    assert_close_to_ref(conv2d(x, w, padding=1), F.conv2d(x, w, padding=1))
    assert conv2d(torch.randn(0, 3, 5, 5), w).shape == (0, 4, 3, 3)


def test_torch_backend_matches(monkeypatch):
    """TILEFUSE_BACKEND=torch runs the reference path through the same custom op and autograd."""
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    kw = dict(stride=(2, 1), padding="valid", groups=2, dilation=(1, 2))
    ref = _fwd_bwd(lambda *a: F.relu(F.conv2d(*a, **kw)), [x, w, b])
    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    ours = _fwd_bwd(lambda *a: conv2d(*a, activation="relu", **kw), [x, w, b])
    for o, r in zip(ours, ref):
        assert_close_to_ref(o, r)


# ------------------------------------------------------------------------------ errors
BAD = [  # (x shape, w shape, kwargs, error, words in the message)
    ((1, 4, 5, 5), (3, 3, 3, 3), {}, ValueError, ["expected input", "3 channels", "4 channels"]),
    ((1, 4, 5, 5), (3, 2, 3, 3), dict(groups=2), ValueError, ["divisible by 2"]),
    ((1, 6, 5, 5), (4, 2, 3, 3), dict(groups=4), ValueError, ["groups=4"]),
    ((1, 4, 5, 5), (3, 4, 3, 3), dict(stride=0), ValueError, ["stride"]),
    ((1, 4, 5, 5), (3, 4, 3, 3), dict(stride=2, padding="same"), ValueError, ["same", "stride"]),
    ((1, 4, 5, 5), (3, 4, 3, 3), dict(padding=-1), ValueError, ["padding"]),
    ((1, 4, 5, 5), (3, 4, 3, 3), dict(dilation=0), ValueError, ["dilation"]),
    ((1, 4, 5, 5), (3, 4, 3, 3), dict(padding="full"), ValueError, ["padding"]),
    ((1, 4, 2, 2), (3, 4, 3, 3), {}, ValueError, ["Kernel size"]),
    ((4, 5), (3, 4, 3, 3), {}, ValueError, ["3D", "4D"]),
    ((1, 4, 5, 5), (3, 4, 3), {}, ValueError, ["weight", "4-D"]),
    ((1, 4, 5, 5), (3, 4, 3, 3), dict(groups=0), ValueError, ["groups"]),
    ((1, 4, 5, 5), (3, 4, 3, 3), dict(groups=1.5), TypeError, ["groups"]),
]


@pytest.mark.parametrize("xs,ws,kw,err,words", BAD)
def test_bad_arguments_like_torch(xs, ws, kw, err, words):
    x, w = torch.randn(xs), torch.randn(ws)
    with pytest.raises((RuntimeError, ValueError, TypeError)):  # torch refuses it too
        F.conv2d(x, w, **kw)
    with pytest.raises(err) as info:
        conv2d(x, w, **kw)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_tensors():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 3, 3)
    with pytest.raises(TypeError, match="input"):
        conv2d(x.long(), w)
    with pytest.raises(TypeError, match="weight"):
        conv2d(x, "w")
    with pytest.raises(TypeError, match="bias"):
        conv2d(x, w, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        conv2d(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="residual"):
        conv2d(x, w, residual=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="activation"):
        conv2d(x, w, activation="nope")


# ------------------------------------------------------------------------------ dispatch
def test_fast_path_equals_custom_op():
    assert isinstance(tilefuse.fused.conv.conv2d_op, FastOp)
    assert isinstance(tilefuse.fused.conv.conv2d_backward_op, FastOp)
    x = torch.randn(2, 4, 6, 5).to(memory_format=torch.channels_last)
    inputs = [x, torch.randn(6, 2, 3, 3), torch.randn(6), torch.randn(2, 6, 3, 5)]

    def fn(x, w, b, r):
        return conv2d(x, w, b, stride=(2, 1), padding=1, groups=2, activation="silu",
                      residual=r, post_activation="relu")

    for grad in (False, True):
        assert_fast_equals_custom_op(fn, inputs, grad)


def test_compile_traces_the_custom_op():
    def fn(x, w, b):
        return conv2d(x, w, b, padding="same", activation="relu")

    assert_compiles_to_custom_op(fn, [torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3),
                                      torch.randn(4)], "conv2d")


# ------------------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_resnet_block_shape(dtype):
    x = torch.randn(8, 64, 56, 56, device="cuda").to(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda") / 24
    b, r = torch.randn(64, device="cuda"), torch.randn(8, 64, 56, 56, device="cuda")
    ref64 = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1) + r.double())
    eager = F.relu(F.conv2d(x.to(dtype), w.to(dtype), b.to(dtype), padding=1) + r.to(dtype))
    y = conv2d(x.to(dtype), w.to(dtype), b.to(dtype), padding=1, residual=r.to(dtype),
               post_activation="relu")
    assert_close_to_ref(y, ref64, eager)


def test_torch_backend_activation_backward_keeps_fp64(monkeypatch):
    """Regression: the torch path of the shared activation backward computed in fp32, so fp64
    gradients through a fused activation (conv2d, matmul) were only fp32-accurate."""
    from tilefuse.fused.matmul import activation_backward_op

    monkeypatch.setenv("TILEFUSE_BACKEND", "torch")
    grad = torch.full((3,), 1.0 + 2.0 ** -40, dtype=torch.float64)
    z = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    out = activation_backward_op(grad, z, ACTIVATIONS["relu"][0], 0.0, torch.float64)
    assert torch.equal(out, grad * (z > 0))


# ------------------------------------------------------------------------------ autotune
def test_autotune_space_tunes_and_the_launcher_uses_the_entry(tmp_cache):
    from tilefuse import autotune
    from tilefuse.autotune import chain
    from tilefuse.kernels.conv_fwd import conv_key, get_config

    assert "conv2d" in autotune.registered_spaces()
    space = autotune.get_space("conv2d")
    key = space.parse_shape("fwd 40x12x8 k3 s1")
    assert key == dict(kind="fwd", M=40, N=12, K=8, KH=3, KW=3, stride=1, dtype="float32")
    problem = space.prepare(key, "cpu")
    out = problem.run(space.default(key)).clone()
    assert problem.check(out)
    out[0, 1, 2, 3] += 0.05 * max(1.0, out.abs().max().item())
    assert not problem.check(out)

    def narrow_m_wins(fn, cfg):  # stand-in timer; the kernel really runs
        fn()
        return cfg["BLOCK_M"] + cfg["BLOCK_N"] / 1e3

    entry = autotune.tune("conv2d", key, timer=narrow_m_wins)
    assert entry["failed"] == 0 and entry["config"]["BLOCK_M"] == 16
    chain.reset()
    same_bucket = conv_key("fwd", 37, 9, 5, (3, 3), (1, 1), torch.float32, False, False)
    assert get_config(same_bucket, torch.float32) == entry["config"]
    x, w = torch.randn(1, 5, 6, 7, dtype=torch.float64), torch.randn(9, 5, 3, 3)
    y = conv2d(x.float(), w, padding=1)   # 42 pixels: the tuned bucket (M=64)
    assert_close_to_ref(y, F.conv2d(x, w.double(), padding=1))


def test_bench_cases_run_and_agree():
    """The benchmark's implementations compute the same thing (tiny CPU sizes)."""
    from tilefuse.bench.kernels_conv import cases

    cs = cases("cpu", torch.float32, "tiny")
    assert {c.name.split("/")[0] for c in cs} == {"fwd", "fwd+bwd", "int8"}
    float_out = {}
    for case in sorted(cs, key=lambda c: c.name.startswith("int8/")):
        outs = {impl: fn() for impl, fn in case.fns.items()}
        layer = case.name.split("/", 1)[1]
        if case.name.startswith("fwd/"):
            assert_close_to_ref(outs["tilefuse"], outs["eager"].double(), factor=8)
            assert set(outs) == {"tilefuse", "eager", "vendor"}
            float_out[layer] = outs["eager"]
        elif case.name.startswith("int8/"):  # W8A8: within int8 rounding of the float block
            ref = float_out[layer]
            assert (outs["tilefuse"] - ref).abs().max() <= 0.05 * ref.abs().max()

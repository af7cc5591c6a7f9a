"""Randomized (hypothesis) statistical tests of the mask-based regularizers against their
documented semantics (docs/regularization.md):

* ``DropBlock2d`` / ``regularize.drop_block2d``: the dropped set is a union of ``bs x bs`` blocks
  (torchvision's geometry), the dropped count agrees with the exact expectation
  ``sum_ij 1 - (1 - gamma)^cover_ij`` within a 6-sigma bound, survivors are scaled by
  ``numel / kept``, gradients flow only through kept elements, eval / ``p == 0`` return the input
  itself, ``p == 1`` with ``block_size == 1`` gives zeros, the same seed gives the same mask
  (whatever the input's layout).
* DropConnect (``tilefuse.nn.Linear(dropconnect=p)`` / ``ops.dropconnect_linear``): the kept
  fraction of weights within a binomial bound, kept weights scaled by ``1/(1-p)``, the output
  and every gradient vs an fp64 reference built from the recovered mask (tolerance tied to eager
  torch's error with the same mask), zero weight gradient exactly where dropped, eval / ``p == 0``
  the plain linear, ``p == 1`` the bias alone, the same seed the same mask.

Lanes as in test_fuzz_modules.py: a few deterministic examples by default, many under ``-m slow``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402
from fuzz_models import ACTS, randomize  # noqa: E402
from fuzz_utils import check, fuzz, randn, seed  # noqa: E402

import tilefuse  # noqa: E402
import tilefuse.regularize as R  # noqa: E402
from tilefuse._backend import backend_for_device  # noqa: E402

pytestmark = pytest.mark.skipif(backend_for_device("cpu") != "triton",
                                reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")

Z = 6.0   # sigmas: a correct implementation fails a bound with probability ~1e-9


def _within(name, count, mean, var):
    lim = Z * math.sqrt(var) + 1.0
    assert abs(count - mean) <= lim, f"{name}: {count} vs expected {mean:.1f} (+- {lim:.1f})"


# --------------------------------------------------------------------------------------------
# DropBlock
# --------------------------------------------------------------------------------------------
def _geometry(H, W, block_size):
    """(bs, off, cover): the block size after clipping to the map, the offset of a block's first
    row/column from its sampled position (torchvision's pad + max_pool: 0 for odd, 1 for even
    sizes; blocks of even size are cut at the bottom/right edge), and cover[i, j], the number of
    sampled positions whose block covers (i, j)."""
    bs = min(block_size, H, W)
    off = 1 - bs % 2

    def count(n):
        i = torch.arange(n, dtype=torch.float64)[:, None]
        a = torch.arange(n - bs + 1, dtype=torch.float64)[None, :] + off
        return ((a <= i) & (i <= a + bs - 1)).sum(1).double()

    return bs, off, count(H)[:, None] * count(W)[None, :]


def _assert_union_of_blocks(dropped, bs, off):
    """``dropped`` (N, C, H, W) bool is exactly the union of the (clipped) blocks it contains."""
    N, C, H, W = dropped.shape
    d = dropped.reshape(N * C, 1, H, W).double()
    dp = F.pad(d, (0, off, 0, off), value=1.0)               # beyond the edge counts as dropped
    full = -F.max_pool2d(-dp, bs, stride=1)[..., off:, off:]  # blocks entirely dropped
    back = F.conv_transpose2d(full, torch.ones(1, 1, bs, bs, dtype=torch.float64))
    back = F.pad(back, (off, 0, off, 0))[..., :H, :W] > 0
    assert torch.equal(back, d > 0), "dropped set is not a union of block_size x block_size blocks"


def _drop_block_call(x, p, bs, torch_seed, use_module):
    torch.manual_seed(torch_seed)
    if use_module:
        return tilefuse.nn.DropBlock2d(p=p, block_size=bs)(x)
    return R.drop_block2d(x, p, bs)


@fuzz(6, 200)
def test_fuzz_drop_block_statistics(data):
    g = seed(data)
    s = data.draw(st.integers(0, 2**31 - 1), label="torch_seed")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16,
                                       torch.float16]), label="dtype")
    # large maps too (plain torch, cheap): the count's resolution is one block, so telling a
    # wrong gamma from the right one takes thousands of block positions
    N = data.draw(st.sampled_from([1, 2, 4, 16]), label="N")
    C = data.draw(st.sampled_from([1, 3, 8, 16]), label="C")
    H = data.draw(st.sampled_from([1, 2, 5, 8, 13, 32]), label="H")
    W = data.draw(st.sampled_from([1, 3, 8, 11, 32]), label="W")
    block = data.draw(st.sampled_from([1, 2, 3, 4, 5, 7]), label="block_size")
    p = data.draw(st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0]), label="p")
    use_module = data.draw(st.booleans(), label="module")
    channels_last = data.draw(st.booleans(), label="channels_last")
    x = (randn(g, (N, C, H, W)).abs() + 0.5).to(dtype)   # no zeros: zero output == dropped
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    # eval and p == 0: the input itself
    m = tilefuse.nn.DropBlock2d(p=p, block_size=block)
    assert m.eval()(x) is x and R.drop_block2d(x, p, block, training=False) is x
    if p == 0.0:
        assert _drop_block_call(x, p, block, s, use_module) is x
        return
    xk = x.detach().requires_grad_(True)
    y = _drop_block_call(xk, p, block, s, use_module)
    assert y.shape == x.shape and y.dtype == dtype
    # same seed -> same mask, whatever the input's layout
    again = _drop_block_call(x.contiguous(), p, block, s, not use_module)
    assert torch.equal(y.detach(), again)
    dropped = y.detach() == 0
    bs, off, cover = _geometry(H, W, block)
    _assert_union_of_blocks(dropped, bs, off)
    # dropped count vs its exact expectation; Efron-Stein: each of the n Bernoulli(gamma) block
    # positions moves the count by at most bs^2, so Var <= n gamma (1 - gamma) bs^4
    gamma = min(1.0, p * H * W / (bs * bs * (H - bs + 1) * (W - bs + 1)))
    n = N * C * (H - bs + 1) * (W - bs + 1)
    mean = N * C * (1 - (1 - gamma) ** cover).sum().item()
    _within("DropBlock dropped count", int(dropped.sum()), mean, n * gamma * (1 - gamma) * bs ** 4)
    if p == 1.0 and bs == 1:
        assert dropped.all()
    # survivors scaled by numel / kept (torchvision's normalisation, eps=1e-6)
    kept = ~dropped
    scale = x.numel() / (1e-6 + int(kept.sum()))
    want = torch.where(kept, x.double() * scale, 0.0)
    check("DropBlock output", y.detach(), want, scale=scale * x.abs().max().item())
    # gradient: dy * scale on kept elements, exactly zero on dropped ones
    dy = randn(g, x.shape, dtype)
    (gx,) = torch.autograd.grad(y, xk, dy)
    assert torch.equal(gx[dropped], torch.zeros_like(gx[dropped]))
    check("DropBlock grad", gx, torch.where(kept, dy.double() * scale, 0.0),
          scale=scale * dy.abs().max().item())


# test_bug_drop_block_fp16_*: found by test_fuzz_drop_block_statistics, fixed. The torchvision
# formula summed the keep mask in the input's dtype: fp16 cannot hold a count above 65504 (inf ->
# scale 0), and numel / eps overflows fp16 when nothing is kept (0 * inf = NaN).
def test_bug_drop_block_fp16_large_map():
    torch.manual_seed(0)
    x = torch.ones(4, 8, 64, 64, dtype=torch.float16)   # 131072 elements, ~90% kept
    y = R.drop_block2d(x, 0.1, 5)
    kept = y != 0
    assert 0.8 < kept.float().mean().item() < 0.99   # got 0.0: every element zeroed
    assert torch.allclose(y[kept].float(), torch.full_like(y[kept].float(),
                                                           x.numel() / kept.sum().item()),
                          rtol=2e-3)


def test_bug_drop_block_fp16_all_dropped():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4).half()
    y = R.drop_block2d(x, 1.0, 1)   # p=1, block_size=1: gamma = 1, every element dropped
    assert torch.equal(y, torch.zeros_like(y))   # fp32/bf16 give zeros; fp16 gave NaN


# --------------------------------------------------------------------------------------------
# DropConnect
# --------------------------------------------------------------------------------------------
def _nonzero_weight(lin, g):
    """Weights bounded away from 0, so a zero in the masked weight means dropped."""
    with torch.no_grad():
        w = randn(g, lin.weight.shape)
        lin.weight.copy_(torch.sign(w) * (w.abs() + 0.25) / math.sqrt(lin.in_features))
    return lin


@fuzz(4, 150)
def test_fuzz_dropconnect_statistics(data):
    g = seed(data)
    s = data.draw(st.integers(0, 2**31 - 1), label="torch_seed")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16,
                                       torch.float64]), label="dtype")
    K = data.draw(st.sampled_from([1, 3, 8, 17, 33]), label="K")
    N = data.draw(st.sampled_from([1, 4, 9, 16]), label="N")
    lead = data.draw(st.sampled_from([(1,), (5,), (2, 3)]), label="lead")
    bias = data.draw(st.booleans(), label="bias")
    p = data.draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9, 1.0]), label="p")
    act, act_mod = data.draw(st.sampled_from(ACTS), label="act")
    tm = _nonzero_weight(randomize(nn.Linear(K, N, bias=bias), g), g)
    lin = tilefuse.nn.Linear(K, N, bias=bias, activation=act, dropconnect=p)
    lin.load_state_dict(tm.state_dict())
    lin = lin.to(dtype).train()
    w = lin.weight.detach()
    # the mask, recovered with the same seed from an identity input: row k = W[:, k] kept/(1-p)
    torch.manual_seed(s)
    eye = tilefuse.ops.dropconnect_linear(torch.eye(K, dtype=dtype), w, None, p=p)
    keep = (eye != 0).t()   # (N, K), the weight's layout
    kscale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    _within("DropConnect kept weights", int(keep.sum()), (1 - p) * N * K, N * K * p * (1 - p))
    check("DropConnect kept weight", eye.t(), torch.where(keep, w.double() * kscale, 0.0),
          torch.where(keep, w * kscale, 0.0))
    # the module's output and gradients vs fp64 with that mask (same seed -> same mask)
    x = randn(g, lead + (K,), dtype).requires_grad_(True)
    torch.manual_seed(s)
    y = lin(x)
    assert y.shape == lead + (N,) and y.dtype == dtype

    def masked(xx, ww, bb):
        return act_mod()(F.linear(xx, torch.where(keep, ww * kscale, 0.0), bb))

    x64 = x.detach().double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    b64 = lin.bias.detach().double().requires_grad_(True) if bias else None
    ref = masked(x64, w64, b64)
    xe = x.detach().requires_grad_(True)
    we = w.clone().requires_grad_(True)
    be = lin.bias.detach().clone().requires_grad_(True) if bias else None
    eager = masked(xe, we, be)
    check("DropConnect forward", y, ref, eager, n_reduce=K)
    dy = randn(g, y.shape, dtype)
    params = [lin.weight] + ([lin.bias] if bias else [])
    got = torch.autograd.grad(y, [x] + params, dy)
    want = torch.autograd.grad(ref, [x64, w64] + ([b64] if bias else []), dy.double())
    base = torch.autograd.grad(eager, [xe, we] + ([be] if bias else []), dy)
    n_red = max(K, N, math.prod(lead))
    for name, a, b, e in zip(["x", "weight", "bias"], got, want, base):
        check(f"DropConnect grad {name}", a, b, e, n_reduce=n_red)
    assert torch.equal(got[1][~keep], torch.zeros_like(got[1][~keep])), "grad on dropped weights"
    # eval: the plain fused linear, no mask
    lin.eval()
    with torch.no_grad():
        ye = lin(x)
        check("DropConnect eval", ye, act_mod()(F.linear(x64, w64, b64)),
              act_mod()(F.linear(xe, we, be)), n_reduce=K)


# test_bug_fp64_leaky_relu_backward: found by test_fuzz_dropconnect_statistics (fp64, p=0: the
# plain fused linear) as a strict xfail, fixed in dbbf279: kernels/activations.py activation_grad
# built the slope with tl.where(z > 0, 1.0, ACT_PARAM), an fp32 constant, so fp64 gradients used
# float32(slope).
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_bug_fp64_leaky_relu_backward(p):
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = tilefuse.ops.dropconnect_linear(x, w, None, p=p, activation=("leaky_relu", 0.2))
    torch.manual_seed(1)   # the same mask, read off an identity input
    keep = (tilefuse.ops.dropconnect_linear(torch.eye(3, dtype=torch.float64), w.detach(), None,
                                            p=p) != 0).t()
    ref = F.leaky_relu(F.linear(x, torch.where(keep, w / (1 - p), 0.0)), 0.2)
    dy = torch.randn_like(y)
    gx = torch.autograd.grad(y, x, dy)[0]
    rx = torch.autograd.grad(ref, x, dy)[0]
    assert (y - ref).abs().max().item() < 1e-14                # forward: exact slope
    assert (gx - rx).abs().max().item() < 1e-14                # got ~1e-8 (float32(0.2) - 0.2)


# test_bug_dropconnect_fp64_bias_grad: found by test_fuzz_dropconnect_statistics as a strict
# xfail, fixed in dbbf279 (fused/dropout.py _dc_backward summed dbias in fp32 for every dtype).
def test_bug_dropconnect_fp64_bias_grad():
    torch.manual_seed(0)
    x, w = torch.randn(7, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, 4, dtype=torch.float64) / 3
    (gb,) = torch.autograd.grad(tilefuse.ops.dropconnect_linear(x, w, b, p=0.3), b, dy)
    assert (gb - dy.sum(0)).abs().max().item() < 1e-14   # got 1.1e-7 (ops.linear: 0)


def test_dropconnect_masks_differ_between_calls_and_follow_the_seed():
    lin = tilefuse.nn.Linear(32, 32, bias=False, dropconnect=0.5)
    x = torch.eye(32)
    torch.manual_seed(3)
    a = lin(x)
    b = lin(x)
    torch.manual_seed(3)
    assert torch.equal(lin(x), a) and not torch.equal(a != 0, b != 0)

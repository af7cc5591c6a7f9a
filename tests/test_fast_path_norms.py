"""The eager fast path of batch_norm_act and group_norm_act against the custom-op path it bypasses.

The fast path (``FastOp``: the implementation called directly, or through an equivalent
``autograd.Function``) and the ``torch.library`` custom op (forced with ``custom_op_path()``) give
the same outputs, running statistics and gradients bit for bit, with and without grad;
``torch.compile(fullgraph=True)`` traces each wrapper into a graph that calls the custom op.
"""
import numpy as np
import pytest
import torch

import tilefuse
import tilefuse.fused.norm_bn as fbn
import tilefuse.fused.norm_group as fgn
import tilefuse.kernels.norm_bn as kbn
from fast_path_utils import (assert_fast_equals_custom_op, assert_same,  # noqa: I100
                             compiled_targets)
from tilefuse.fused._fast import FastOp

ops = tilefuse.ops


def _f(*shape, dtype=torch.float32, cl=False, shift=0.0):
    t = (torch.randn(*shape) + shift).to(dtype)
    return t.to(memory_format=torch.channels_last) if cl else t


def _bn(training, stats=(torch.float32, 1), momentum=0.1, act="relu", residual=False,
        affine=True):
    """fn(x, [w, b], [r]) -> (y, running_mean, running_var): fresh running stats per call (the
    op updates them in place), returned so that their update is compared too. ``stats``:
    (dtype, step): a step of 2 makes them strided views."""
    dtype, step = stats

    def fn(x, *rest):
        C = x.shape[1]
        rm = torch.linspace(-1, 1, C * step, dtype=dtype)[::step]
        rv = torch.linspace(0.5, 2, C * step, dtype=dtype)[::step]
        w, b = (rest[0], rest[1]) if affine else (None, None)
        r = rest[-1] if residual else None
        y = ops.batch_norm_act(x, rm, rv, w, b, training=training, momentum=momentum,
                               activation=act, residual=r)
        return y, rm, rv
    return fn


def _bn_inputs(shape, residual=False, affine=True, dtype=torch.float32, cl=False):
    C = shape[1]
    ins = [_f(*shape, dtype=dtype, cl=cl, shift=3.0)]
    if affine:
        ins += [_f(C), _f(C)]
    if residual:
        ins.append(_f(*shape, dtype=dtype, cl=cl))
    return lambda: ins


BN_CASES = {
    "train_nchw_residual": (_bn(True, residual=True), _bn_inputs((4, 6, 5, 5), residual=True)),
    "train_channels_last": (_bn(True, act="silu", residual=True),
                            _bn_inputs((3, 6, 3, 5), residual=True, cl=True)),
    "train_2d_no_affine": (_bn(True, act="gelu", affine=False),
                           _bn_inputs((7, 5), affine=False)),
    "train_3d_int_momentum": (_bn(True, momentum=1, act=None), _bn_inputs((3, 4, 6))),
    "train_fp16_stats": (_bn(True, stats=(torch.float16, 1)), _bn_inputs((4, 3, 4))),
    "train_bf16_x": (_bn(True, act="silu"), _bn_inputs((4, 3, 2, 3), dtype=torch.bfloat16)),
    "train_fp64": (_bn(True), _bn_inputs((4, 3, 5), dtype=torch.float64)),
    "eval_nchw": (_bn(False), _bn_inputs((2, 5, 3, 3))),
    "eval_residual_cl": (_bn(False, act="tanh", residual=True),
                         _bn_inputs((2, 5, 3, 3), residual=True, cl=True)),
    "eval_fp16_stats": (_bn(False, stats=(torch.float16, 1)), _bn_inputs((2, 5, 4))),
    "eval_strided_stats": (_bn(False, stats=(torch.float32, 2)), _bn_inputs((2, 5, 4))),
    "eval_fp64": (_bn(False, stats=(torch.float64, 1)),
                  _bn_inputs((2, 3, 4), dtype=torch.float64)),
}


@pytest.mark.filterwarnings("ignore:overflow encountered")  # masked lanes, interpreter
@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(BN_CASES))
def test_batch_norm_fast_path_equals_custom_op(name, grad, small, monkeypatch):
    """``small``: these shapes fit one tile (one-program training forward and backward); else
    the statistics / finalize / apply and reduction / apply launches."""
    if not small:
        monkeypatch.setattr(kbn, "SMALL_TILE", 0)
    fn, make = BN_CASES[name]
    assert_fast_equals_custom_op(fn, make(), grad)


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("grad", [False, True])
def test_batch_norm_split_reduction_fast_path(grad, monkeypatch):
    """Several R-slices per channel (the cached slice counts and the stored shift K)."""
    monkeypatch.setattr(kbn, "INTERP_TILE", 64)
    monkeypatch.setattr(kbn, "SMALL_TILE", 0)  # (else one program)
    x = _f(5, 6, 4, 5, shift=300.0)
    assert kbn._split(100, 1, 64, torch.device("cpu"))[0] == 2
    fast = assert_fast_equals_custom_op(_bn(True, act="silu", residual=True),
                                        [x, _f(6), _f(6), _f(5, 6, 4, 5)], grad)
    rm, rv = torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6)
    torch.nn.functional.batch_norm(x, rm, rv, training=True, momentum=0.1)
    torch.testing.assert_close(fast[0][1:], [rm, rv], atol=1e-4, rtol=1e-4)


def test_batch_norm_no_stats_copied_in_eval_without_grad():
    """Eval without grad reads the fp32 running stats in place: the op returns no stats."""
    x = torch.randn(2, 3, 4)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    y0, mean, var = fbn.batch_norm_act_fwd(x, None, None, None, rm, rv, False, 1e-5, 0, 0.0,
                                           False)
    assert mean.numel() == 0 and var.numel() == 0
    y1, mean, var = fbn.batch_norm_act_fwd(x, None, None, None, rm, rv, False, 1e-5, 0, 0.0,
                                           True)
    assert_same(y0, y1)
    assert torch.equal(mean, rm) and torch.equal(var, rv)
    assert mean.data_ptr() != rm.data_ptr()  # saved for backward: a copy


@pytest.mark.parametrize("momentum", [1, 0, np.float32(0.25), 0.25])
def test_batch_norm_real_momentum_as_torch(momentum):
    """issue 14 item 13: any real momentum (an int included) works as in F.batch_norm."""
    x = torch.randn(6, 3, 2)
    rm, rv, rm_t, rv_t = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    ops.batch_norm_act(x, rm, rv, training=True, momentum=momentum)
    torch.nn.functional.batch_norm(x, rm_t, rv_t, training=True, momentum=float(momentum))
    torch.testing.assert_close((rm, rv), (rm_t, rv_t), atol=1e-5, rtol=1e-5)
    for bad in (True, None, "0.1"):
        with pytest.raises(TypeError, match="momentum"):
            ops.batch_norm_act(x, rm, rv, training=True, momentum=bad)


def test_batch_norm_layouts_do_not_share_a_cached_launch():
    """Same shape, NCHW then channels_last: the tile choice depends on the layout (cache key)."""
    x = torch.randn(3, 6, 4, 4) + 2
    for xx in (x, x.to(memory_format=torch.channels_last), x):
        rm, rv = torch.zeros(6), torch.ones(6)
        y = ops.batch_norm_act(xx, rm, rv, training=True, activation="relu")
        ref = torch.relu(torch.nn.functional.batch_norm(x, torch.zeros(6), torch.ones(6),
                                                        training=True))
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert len({sig[:5] for sig in kbn._FWD_LAUNCH}) == 2  # (N, C, S, C innermost, one run)


def _gn(G, act):
    return lambda x, w, b: ops.group_norm_act(x, G, w, b, activation=act)


GN_CASES = {
    "nchw": (_gn(3, "silu"), lambda: [_f(2, 6, 5, 5, shift=4.0), _f(6), _f(6)]),
    "channels_last": (_gn(2, "relu"), lambda: [_f(2, 6, 3, 4, cl=True), _f(6), _f(6)]),
    "instance": (_gn(6, None), lambda: [_f(2, 6, 7), _f(6), _f(6)]),
    "2d": (_gn(2, "gelu"), lambda: [_f(5, 4), _f(4), _f(4)]),
    "no_affine": (lambda x: ops.group_norm_act(x, 2), lambda: [_f(3, 4, 2, 2)]),
    "bf16": (_gn(2, "silu"), lambda: [_f(2, 4, 3, 3, dtype=torch.bfloat16), _f(4), _f(4)]),
    "fp64": (_gn(2, "relu"), lambda: [_f(2, 4, 3, dtype=torch.float64),
                                      _f(4, dtype=torch.float64), _f(4, dtype=torch.float64)]),
}


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", sorted(GN_CASES))
def test_group_norm_fast_path_equals_custom_op(name, grad):
    fn, make = GN_CASES[name]
    assert_fast_equals_custom_op(fn, make(), grad)


def test_norm_ops_are_fast_ops():
    for op in (fbn.batch_norm_act_fwd, fbn.batch_norm_act_bwd, fgn.group_norm_act_fwd,
               fgn.group_norm_act_bwd):
        assert isinstance(op, FastOp)


@pytest.mark.parametrize("case", ["bn_train_grad", "bn_eval", "gn", "gn_grad"])
def test_compile_traces_the_custom_op(case):
    C = 4
    x = torch.randn(3, C, 2, 2)
    if case.startswith("bn"):
        training = case == "bn_train_grad"
        stats = [torch.zeros(C), torch.ones(C)]
        w = torch.randn(C, requires_grad=training)

        def fn(x):
            return ops.batch_norm_act(x, stats[0], stats[1], w, None, training=training,
                                      momentum=0.5, activation="relu")
        op, grad = "batch_norm_act_fwd", training
    else:
        grad = case == "gn_grad"
        w = torch.randn(C, requires_grad=grad)

        def fn(x):
            return ops.group_norm_act(x, 2, w, None, activation="silu")
        op = "group_norm_act_fwd"
    seen, out, ref = compiled_targets(fn, [x], grad)
    assert torch.equal(out, ref)
    assert any(f"tilefuse.{op}" in s for s in seen), seen
    if case == "bn_train_grad":  # the running-stat update ran in place, twice, without a graph
        assert not stats[0].requires_grad and not torch.equal(stats[1], torch.ones(C))
        out.sum().backward()
        assert w.grad is not None


def _old_merge(x3):
    """The launcher's merge as it was before the fast path: Python-number operands, sums over
    the (SPLIT, C) partials for any SPLIT, K sliced from x on the host."""
    import triton

    N, C, S = x3.shape
    R = N * S
    br, bc = kbn._tiles(x3)
    split, r_per = kbn._split(R, triton.cdiv(C, bc), br, x3.device)
    pmean, pm2, k = torch.empty(split, C), torch.empty(split, C), torch.empty(C)
    kbn.bn_stats_kernel[(triton.cdiv(C, bc), split)](x3, pmean, pm2, k, C, R, S, r_per,
                                                     *x3.stride(), BLOCK_R=br, BLOCK_C=bc,
                                                     num_warps=4)
    cnt = torch.full((split, 1), float(r_per))
    cnt[-1] = float(R - r_per * (split - 1))
    md = (pmean * cnt).sum(0) / R
    var = (pm2 + cnt * (pmean - md) ** 2).sum(0) / R
    return x3[0, :, 0].float() + md, var, split


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("tile", [None, 64])
def test_batch_norm_merge_same_bits_as_before(tile, monkeypatch):
    """The cached-operand merge (and its one-slice form) returns the bits of the original one."""
    monkeypatch.setattr(kbn, "SMALL_TILE", 0)  # (the merge: not the one-program path)
    if tile:
        monkeypatch.setattr(kbn, "INTERP_TILE", tile)
    x3 = (torch.randn(1, 6, 100) * 3 + 250.0).float()  # (one run of S: one slice)
    mean, var, split = _old_merge(x3)
    assert split == (2 if tile else 1)
    y = torch.empty_like(x3)
    m2, v2 = kbn.launch_batch_norm_fwd(x3, None, None, None, y, None, None, True, 1e-5, 0, 0.0)
    assert torch.equal(mean, m2) and torch.equal(var, v2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_running_update_same_bits_as_python_numbers(dtype):
    """Cached 0-d operands update the running stats exactly as Python-number operands do."""
    mean, var = torch.randn(7), torch.rand(7) + 0.1
    for momentum, count in ((0.1, 12), (1 / 3, 7), (0.37, 1001)):
        rm, rv = (torch.randn(7) * 3).to(dtype), (torch.rand(7) + 0.5).to(dtype)
        rm_ref, rv_ref = rm.clone(), rv.clone()
        fbn._update_running(rm, rv, mean, var, momentum, count)
        rm_ref.mul_(1.0 - momentum).add_(mean.to(dtype), alpha=momentum)
        rv_ref.mul_(1.0 - momentum).add_((var * (count / (count - 1))).to(dtype),
                                         alpha=momentum)
        assert torch.equal(rm, rm_ref) and torch.equal(rv, rv_ref)


def test_batch_norm_backward_one_slice_same_bits_as_sum(monkeypatch):
    """With one R-slice the backward's (C,) partials are dw/db: the bits of ``.sum(0)`` over the
    (1, C) partials the launcher reduced before."""
    import triton

    monkeypatch.setattr(kbn, "SMALL_TILE", 0)  # (the reduction + apply launches)
    x3, dy = torch.randn(1, 5, 18) + 2, torch.randn(1, 5, 18)  # (one run of S: one slice)
    w, b = torch.randn(5), torch.randn(5)
    mean, var = x3.mean((0, 2)), x3.var((0, 2), unbiased=False)
    N, C, S = x3.shape
    br, bc = kbn._tiles(x3)
    split, r_per = kbn._split(N * S, triton.cdiv(C, bc), br, x3.device)
    assert split == 1
    p1, p2 = torch.empty(1, C), torch.empty(1, C)
    kbn.bn_bwd_reduce_kernel[(triton.cdiv(C, bc), 1)](
        dy, x3, x3, w, b, mean, var, p1, p2, C, N * S, S, r_per, *dy.stride(), *x3.stride(),
        *x3.stride(), 1e-5, HAS_RESIDUAL=False, HAS_W=True, HAS_B=True, ACTIVATION=1,
        ACT_PARAM=0.0, BLOCK_R=br, BLOCK_C=bc, num_warps=4)
    dw, db = kbn.launch_batch_norm_bwd(dy, x3, None, w, b, mean, var, torch.empty_like(x3),
                                       None, True, 1e-5, 1, 0.0)
    assert torch.equal(dw, p2.sum(0)) and torch.equal(db, p1.sum(0))

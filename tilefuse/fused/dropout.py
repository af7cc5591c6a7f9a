"""Dropout custom ops: ``tilefuse::dropout`` (dropout, dropout+residual, channel dropout) and
``tilefuse::dropconnect_linear`` (DropConnect inside the matmul kernel's load path).

RNG design: the public wrappers draw a 31-bit seed (``torch.randint``'s draw) on the *input's
device* (that device's default generator, as torch's own dropout), *outside* the custom op, and
pass it in as an int64 tensor (a 16-byte aligned pair: :func:`draw_seed`) that the Triton
kernels read through a pointer (one 128-bit load): nothing on the CUDA path reads it on the
host, so there is no sync and a captured CUDA graph draws a fresh seed on every replay. So ``torch.manual_seed`` /
``torch.cuda.manual_seed`` reproduce runs, ``torch.random.fork_rng`` isolates them,
``torch.utils.checkpoint`` (which restores the CPU and the device RNG state before recomputing)
regenerates the same mask, and under ``torch.compile`` the draw is part of the graph, hence fresh
on every call. Only the seed is saved for backward; the mask is regenerated from it (no mask
tensor is stored).

The torch reference path (CPU without the interpreter) also derives its mask from the seed alone
(a ``torch.Generator`` seeded with it), so forward and backward agree there too; its bits differ
from the Philox stream of the Triton path. It reads the seed with ``.item()``: free for a CPU
seed; on a GPU that path only runs when forced (``TILEFUSE_BACKEND=torch``), at one sync per op.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from tilefuse import _autocast
from tilefuse._backend import backend_of
from tilefuse._validate import (check_broadcastable, check_probability, check_same_dtype,
                                check_tensor, float_tensor, same_device)
from tilefuse.activations import NAMES, torch_activation
from tilefuse.fused._fast import act_code, autocast_maybe_on, fast_op, needs_grad
from tilefuse.fused.matmul import activation_backward_op
from tilefuse.fused.linear import linear as fused_linear

_SEED_HIGH = 2**31 - 1
# tilefuse.kernels.dropout / .matmul, imported on the first launch (triton is optional); their
# functions are looked up on the module at each call (tests patch them)
_kd = _km = None


def _kernels():
    global _kd
    if _kd is None:
        import tilefuse.kernels.dropout as kd

        _kd = kd
    return _kd


def _matmul_kernels():
    global _km
    if _km is None:
        import tilefuse.kernels.matmul as km

        _km = km
    return _km


def draw_seed(device=None) -> Tensor:
    """A fresh seed on ``device`` (default CPU), drawn from that device's default generator (so
    ``torch.manual_seed`` / ``torch.cuda.manual_seed`` / ``fork_rng`` govern it as they govern
    ``torch.nn.functional.dropout``). The Triton path never reads it on the host.

    Layout: a 2-element int64 tensor (a fresh allocation, so 16-byte aligned); element 0 is the
    seed, element 1 is never used: it lets the kernels read the seed with one 128-bit load.
    Both are drawn by one ``torch.randint`` (one op, ~1.5 us of host time, traceable by
    ``torch.compile``); element 0 is the value the former 0-d seed ``torch.randint(2**31 - 1,
    ())`` drew, so a given ``torch.manual_seed`` gives the same masks (the generator then
    advances by one more draw)."""
    return torch.randint(_SEED_HIGH, (2,), device=device if device is not None else "cpu")


def _seed_on(seed: Tensor, device) -> Tensor:
    """The seed on the data's device (a copy only for a caller-supplied seed elsewhere)."""
    return seed if seed.device == device else seed.to(device)


def _host_seed(seed: Tensor) -> int:
    """The seed as a host int (torch reference path only): element 0 of draw_seed's pair or a
    caller's 1-element seed."""
    return int(seed.reshape(-1)[0].item())


def _torch_keep(seed: int, shape, group: int, device) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    r = torch.rand(n // max(group, 1), generator=gen)
    return r.repeat_interleave(group).reshape(shape).to(device)


def _out_like(x: Tensor, residual: Optional[Tensor]) -> Tensor:
    if residual is None or residual.dtype == x.dtype:
        return torch.empty_like(x)
    return torch.empty_like(x, dtype=torch.result_type(x, residual))


def _dropout_impl(x: Tensor, residual: Optional[Tensor], seed: Tensor, p: float,
                  group: int) -> Tensor:
    """``[residual +] x * keep / (1 - p)``, keep regenerated from ``seed`` (0 < p < 1)."""
    out = _out_like(x, residual)
    if backend_of(x) == "torch":  # reference path: host seed (free on CPU)
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        keep = _torch_keep(_host_seed(seed), x.shape, group, x.device) > p
        y = torch.where(keep, x.to(acc) * (1.0 / (1.0 - p)), 0.0)
        if residual is not None:
            y = y + residual.to(acc)
        return out.copy_(y)
    return (_kd or _kernels()).launch_dropout(x, out, _seed_on(seed, out.device), p,
                                              residual=residual, group=group)


def _dropout_fake(x, residual, seed, p, group):
    return _out_like(x, residual)


def _dropout_setup(ctx, inputs, output):
    x, residual, seed, p, group = inputs
    ctx.p, ctx.group = p, group
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.save_for_backward(seed)


def _dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    dx = dropout_op(grad, None, seed, ctx.p, ctx.group).to(ctx.x_dtype)
    dres = grad.to(ctx.res_dtype) if ctx.res_dtype is not None else None
    return dx, dres, None, None, None


dropout_op = fast_op("dropout", _dropout_impl, fake=_dropout_fake, setup_context=_dropout_setup,
                     backward=_dropout_backward)


# --------------------------------------------------------------------------------------------
# public functional API
# --------------------------------------------------------------------------------------------
def _check(x, p, training, name="x"):
    float_tensor(name, x)
    if type(p) is not float or not 0.0 <= p <= 1.0:
        p = check_probability("p", p)
    if training is not True and training is not False:
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    return p


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """:func:`torch.nn.functional.dropout`: zero each element with probability ``p``, scale the
    survivors by ``1/(1-p)``. ``p == 0`` or ``training=False`` returns ``x`` (no launch);
    ``p == 1`` returns zeros.

    >>> import torch, tilefuse
    >>> y = tilefuse.ops.dropout(torch.ones(1000), p=0.25)
    >>> bool(((y == 0) | (y == 4 / 3)).all())
    True
    """
    p = _check(x, p, training)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    return dropout_op(x, None, draw_seed(x.device), p, 1)


def dropout_add(x: Tensor, residual: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """``residual + dropout(x, p)`` in one pass (the transformer residual pattern).

    ``residual`` must be broadcastable to ``x``'s shape; dtypes promote as in torch.

    >>> import torch, tilefuse
    >>> h, r = torch.randn(4, 8), torch.randn(4, 8)
    >>> bool(torch.equal(tilefuse.ops.dropout_add(h, r, p=0.1, training=False), r + h))
    True
    """
    p = _check(x, p, training)
    float_tensor("residual", residual)
    same_device(x=x, residual=residual)
    same_shape = residual.shape == x.shape
    if not same_shape:
        check_broadcastable("residual", residual, x.shape)
    if not training or p == 0.0:
        return residual + x
    if p == 1.0:
        return residual + x * 0.0
    return dropout_op(x, residual if same_shape else residual.expand(x.shape),
                      draw_seed(x.device), p, 1)


def dropout2d(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """:func:`torch.nn.functional.dropout2d`: zero whole channels. ``x`` is ``(N, C, H, W)``
    (NCHW or channels_last; the output keeps the layout) or unbatched ``(C, H, W)``.

    >>> import torch, tilefuse
    >>> y = tilefuse.ops.dropout2d(torch.ones(2, 6, 3, 3), p=0.5)
    >>> bool(((y == 0).all(dim=(2, 3)) | (y == 2).all(dim=(2, 3))).all())
    True
    """
    p = _check(x, p, training)
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    group = x.shape[-1] * x.shape[-2]
    if group == 0:
        return x * 1.0
    return dropout_op(x, None, draw_seed(x.device), p, group)


# --------------------------------------------------------------------------------------------
# mixup: lam * x + (1 - lam) * x[perm] in one Triton pass (used by tilefuse.regularize.mixup)
# --------------------------------------------------------------------------------------------
def _rows_view(t: Tensor):
    """``t`` as an (N, D) row-major view of its memory when it is dense with the batch dim
    outermost (contiguous or channels_last), else None."""
    N = t.shape[0]
    D = t.numel() // N if N else 0
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(
        memory_format=torch.channels_last))
    if dense and (N <= 1 or t.stride(0) == D):
        return t.as_strided((N, D), (D, 1))
    return None


def _mixup_impl(x: Tensor, perm: Tensor, lam: float) -> Tensor:
    """``lam * x + (1 - lam) * x[perm]`` over the first dim; the output keeps ``x``'s layout
    when it is contiguous or channels_last (other layouts are read through one copy)."""
    if backend_of(x) == "torch":
        return torch.empty_like(x).copy_(torch.lerp(x.index_select(0, perm), x, lam))
    launch_mixup = (_kd or _kernels()).launch_mixup
    out = torch.empty_like(x)
    src = x if _rows_view(x) is not None else x.contiguous()
    if _rows_view(out) is None or src.stride() != out.stride():
        tmp = torch.empty_like(src)
        launch_mixup(_rows_view(src), perm, _rows_view(tmp), lam)
        return out.copy_(tmp)
    launch_mixup(_rows_view(src), perm, _rows_view(out), lam)
    return out


def _mixup_fake(x, perm, lam):
    return torch.empty_like(x)


def _mixup_setup(ctx, inputs, output):
    ctx.lam = inputs[2]
    ctx.save_for_backward(inputs[1])


def _mixup_backward(ctx, grad):
    (perm,) = ctx.saved_tensors
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    # dx[m] = lam*g[m] + (1-lam)*g[inv[m]]: the same kernel with the inverse permutation
    return mixup_op(grad, inv, ctx.lam), None, None


mixup_op = fast_op("mixup", _mixup_impl, fake=_mixup_fake, setup_context=_mixup_setup,
                   backward=_mixup_backward)


# --------------------------------------------------------------------------------------------
# DropConnect: y = act(x @ (W * keep / (1-p))^T + b), keep regenerated from the seed
# --------------------------------------------------------------------------------------------
def _dc_impl(a: Tensor, b: Tensor, bias: Optional[Tensor], seed: Tensor, p: float,
             stride_k: int, stride_n: int, activation: int, act_param: float,
             save_pre: bool) -> Tuple[Tensor, Tensor]:
    """``act(a (M, K) @ (b (K, N) * keep) / (1-p) + bias)`` -> (out, pre-activation or empty);
    keep[k, n] comes from the logical index ``k*stride_k + n*stride_n`` (so a transposed operand
    can share the mask of the original)."""
    M, K = a.shape
    N = b.shape[1]
    if backend_of(a) == "torch":  # reference path: host seed (free on CPU)
        s = _host_seed(seed)
        idx = (torch.arange(K, device=a.device)[:, None] * stride_k
               + torch.arange(N, device=a.device)[None, :] * stride_n)
        keep = (_torch_keep(s, (K * N,), 1, a.device)[idx.flatten()].reshape(K, N) > p)
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        z = a.to(acc) @ torch.where(keep, b.to(acc), 0.0) * (1.0 / (1.0 - p))
        if bias is not None:
            z = z + bias.to(acc)
        pre = z.to(a.dtype) if save_pre else a.new_empty(0)
        return torch_activation(z, NAMES[activation], act_param).to(a.dtype), pre
    device = a.device
    out = torch.empty((M, N), device=device, dtype=a.dtype)  # 2-D: no batch views
    pre = torch.empty((M, N), device=device, dtype=a.dtype) if save_pre else None
    (_km or _matmul_kernels()).launch_matmul(
        a, b, out, bias=bias, pre=pre, activation=activation, act_param=act_param,
        dropconnect=(_seed_on(seed, device), p, stride_k, stride_n))
    return out, (pre if pre is not None else a.new_empty(0))


def _dc_fake(a, b, bias, seed, p, stride_k, stride_n, activation, act_param, save_pre):
    M, N = a.shape[0], b.shape[1]
    return a.new_empty((M, N)), (a.new_empty((M, N)) if save_pre else a.new_empty(0))


def dropconnect_mm(a: Tensor, b: Tensor, seed: Tensor, p: float, stride_k: int,
                   stride_n: int) -> Tensor:
    """``a @ (b * keep) / (1-p)`` (no bias, no activation)."""
    return dropconnect_op(a, b, None, seed, p, stride_k, stride_n, 0, 0.0, False)[0]


def _dc_setup(ctx, inputs, output):
    a, b, bias, seed, p, stride_k, stride_n, activation, act_param, save_pre = inputs
    ctx.p, ctx.sk, ctx.sn = p, stride_k, stride_n
    ctx.activation, ctx.act_param = activation, act_param
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(a, b, seed, output[1])
    ctx.set_materialize_grads(False)  # the pre-activation output's gradient is never used


def _dc_backward(ctx, grad, grad_pre):
    a, b, seed, pre = ctx.saved_tensors
    if grad is None:  # only the (internal) pre-activation output was used
        grad = torch.zeros(pre.shape if pre.numel() else (a.shape[0], b.shape[1]),
                           device=a.device, dtype=a.dtype)
    if ctx.activation != 0:
        if pre.numel() == 0 and grad.numel() != 0:
            raise RuntimeError("tilefuse.dropconnect_linear: pre-activation was not saved")
        dz = activation_backward_op(grad, pre, ctx.activation, ctx.act_param, a.dtype)
    else:
        dz = grad.to(a.dtype)
    need = ctx.needs_input_grad
    da = db = dbias = None
    if need[0]:  # dz @ (b*keep)^T: operand b^T, same mask with swapped index strides
        da = dropconnect_mm(dz, b.t(), seed, ctx.p, ctx.sn, ctx.sk)
    if need[1]:  # (a^T @ dz) * keep / (1-p): the mask on b's logical index
        db = _masked_grad(a.t().matmul(dz), seed, ctx.p, ctx.sk, ctx.sn)
    if ctx.bias_dtype is not None and need[2]:
        acc = torch.float64 if dz.dtype == torch.float64 else torch.float32
        dbias = dz.sum(0, dtype=acc).to(ctx.bias_dtype)
    return da, db, dbias, None, None, None, None, None, None, None


def _masked_grad(g: Tensor, seed: Tensor, p: float, sk: int, sn: int) -> Tensor:
    """``g (K, N) * keep / (1-p)`` with keep[k, n] from the index ``k*sk + n*sn``: the dropout
    kernel's logical-index mask on ``g`` (row-major) or on ``g^T``, with the same seed."""
    K, N = g.shape
    if sn == 1 and sk == N:
        return dropout_op(g, None, seed, p, 1)
    if sk == 1 and sn == K:
        return dropout_op(g.t(), None, seed, p, 1).t()
    raise ValueError("dropconnect mask strides must describe a dense (K, N) or (N, K) weight")


dropconnect_op = fast_op("dropconnect_linear", _dc_impl, fake=_dc_fake, setup_context=_dc_setup,
                         backward=_dc_backward)


def dropconnect_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, p: float = 0.5,
                       training: bool = True, activation=None) -> Tensor:
    """``act(x @ dropconnect(weight)^T + bias)``: DropConnect (Wan et al. 2013) with the weight
    mask applied inside the matmul kernel's load path, bias and activation in its epilogue; the
    dropped weight is never materialised and backward regenerates the mask from the seed.
    Eval / ``p == 0`` is the plain fused linear. Under ``torch.autocast`` the inputs are cast
    to the autocast dtype, as for ``torch.nn.functional.linear``.

    >>> import torch, tilefuse
    >>> w = torch.randn(3, 5)
    >>> tilefuse.ops.dropconnect_linear(torch.randn(2, 5), w, p=0.5, activation="relu").shape
    torch.Size([2, 3])
    """
    float_tensor("x", x)
    if x.dim() < 1:
        check_tensor("x", x, min_ndim=1)
    float_tensor("weight", weight)
    if weight.dim() != 2:
        check_tensor("weight", weight, ndim=2)
    if bias is not None:
        float_tensor("bias", bias)
        if bias.dim() != 1:
            check_tensor("bias", bias, ndim=1)
    same_device(x=x, weight=weight, bias=bias)
    if autocast_maybe_on():
        x, weight, bias = _autocast.lower(x, weight, bias)  # linear's autocast policy
    dtype = x.dtype
    if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        check_same_dtype(x=x, weight=weight, bias=bias)
    p = _check(x, p, training)
    if not training or p == 0.0:
        return fused_linear(x, weight, bias, activation=activation)
    if p == 1.0:
        return fused_linear(x, weight * 0.0, bias, activation=activation)
    N, K = weight.shape
    x_shape = x.shape
    if x_shape[-1] != K:
        raise ValueError(f"x has {x_shape[-1]} features but weight expects in_features={K} "
                         f"(weight shape {tuple(weight.shape)})")
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    act, act_param = act_code(activation)
    save_pre = act != 0 and needs_grad(x, weight, bias)
    flat = len(x_shape) == 2  # already (M, K): no reshape in or out
    # b = weight^T (K, N); weight[n, k] has logical index n*K + k: stride_k=1, stride_n=K
    y, _ = dropconnect_op(x if flat else x.reshape(math.prod(x_shape[:-1]), K), weight.t(), bias,
                          draw_seed(x.device), p, 1, K, act, act_param, save_pre)
    return y if flat else y.reshape(tuple(x_shape[:-1]) + (N,))

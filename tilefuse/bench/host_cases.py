"""The cases of ``tilefuse bench host``: one tiny call of every public op of :mod:`tilefuse.ops`
(plus the ``tilefuse.optim.AdamW`` step) and the torch call it replaces.

Inputs are tiny (4x32 rows, 8-channel 4x4 / 8x8 images, 32x32 weights) so that the call is all
host cost. ``build(device)`` makes the inputs once and returns two zero-arg callables and a label
for the torch side. ``grad=True`` rows run with autograd on (inputs and parameters require grad);
the others run under ``torch.no_grad()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from tilefuse.bench.case import fwd, fwd_bwd


@dataclass
class HostCase:
    name: str       # row name, unique ("layer_norm_act/grad")
    op: str         # the public name it exercises ("layer_norm_act", "AdamW")
    build: Callable[[str], Tuple[Callable[[], object], Callable[[], object], str]]
    # build(device) -> (tilefuse call, torch call, what the torch call is)
    grad: bool = False  # False: both calls run under torch.no_grad()


def _t(*shape, device, grad=False, dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _linear(grad: bool, backward: bool, gelu: bool = True):
    def build(dev):
        import tilefuse

        x, w, b = _t(4, 32, device=dev, grad=grad), _t(32, 32, device=dev, grad=grad), \
            _t(32, device=dev, grad=grad)
        act = "gelu" if gelu else None
        ours = lambda x, w, b: tilefuse.ops.linear(x, w, b, activation=act)  # noqa: E731
        if gelu:
            ref = lambda x, w, b: F.gelu(F.linear(x, w, b))  # noqa: E731
            label = "F.gelu(F.linear(x, w, b))"
        else:
            ref, label = F.linear, "F.linear(x, w, b)"
        if backward:
            g = torch.ones(4, 32, device=dev)
            return fwd_bwd(ours, g, x, w, b), fwd_bwd(ref, g, x, w, b), label + ".backward(g)"
        return fwd(ours, x, w, b), fwd(ref, x, w, b), label
    return build


def _matmul(grad: bool = False):
    def build(dev):
        import tilefuse

        a, b = _t(4, 32, device=dev, grad=grad), _t(32, 32, device=dev, grad=grad)
        return fwd(tilefuse.ops.matmul, a, b), fwd(torch.matmul, a, b), "torch.matmul(a, b)"
    return build


def _layer_norm(grad: bool):
    def build(dev):
        import tilefuse

        x, w, b = _t(4, 32, device=dev, grad=grad), _t(32, device=dev, grad=grad), \
            _t(32, device=dev, grad=grad)
        return (lambda: tilefuse.ops.layer_norm_act(x, (32,), w, b, activation="gelu"),
                lambda: F.gelu(F.layer_norm(x, (32,), w, b)), "F.gelu(F.layer_norm(x, ...))")
    return build


def _rms_norm(grad: bool = False):
    def build(dev):
        import tilefuse

        x, w = _t(4, 32, device=dev, grad=grad), _t(32, device=dev, grad=grad)
        return (lambda: tilefuse.ops.rms_norm_act(x, (32,), w, activation="silu"),
                lambda: F.silu(F.rms_norm(x, (32,), w)), "F.silu(F.rms_norm(x, ...))")
    return build


def _group_norm(grad: bool = False):
    def build(dev):
        import tilefuse

        x, w, b = (_t(2, 8, 4, 4, device=dev, grad=grad), _t(8, device=dev, grad=grad),
                   _t(8, device=dev, grad=grad))
        return (lambda: tilefuse.ops.group_norm_act(x, 4, w, b, activation="relu"),
                lambda: F.relu(F.group_norm(x, 4, w, b)), "F.relu(F.group_norm(x, 4, ...))")
    return build


def _batch_norm(training: bool, grad: bool = False):
    def build(dev):
        import tilefuse

        x, w, b = (_t(4, 8, 4, 4, device=dev, grad=grad), _t(8, device=dev, grad=grad),
                   _t(8, device=dev, grad=grad))
        rm, rv = torch.zeros(8, device=dev), torch.ones(8, device=dev)
        rm2, rv2 = rm.clone(), rv.clone()
        return (lambda: tilefuse.ops.batch_norm_act(x, rm, rv, w, b, training=training,
                                                    activation="relu"),
                lambda: F.relu(F.batch_norm(x, rm2, rv2, w, b, training=training)),
                f"F.relu(F.batch_norm(x, ..., training={training}))")
    return build


def _depthwise(grad: bool = False):
    def build(dev):
        import tilefuse

        x, w, b = (_t(1, 8, 8, 8, device=dev, grad=grad), _t(8, 1, 3, 3, device=dev, grad=grad),
                   _t(8, device=dev, grad=grad))
        return (lambda: tilefuse.ops.depthwise_conv2d(x, w, b, padding=1),
                lambda: F.conv2d(x, w, b, padding=1, groups=8),
                "F.conv2d(x, w, b, groups=C) 3x3")
    return build


def _conv2d(grad: bool = False):
    def build(dev):
        import tilefuse

        x, w, b = (_t(1, 8, 8, 8, device=dev, grad=grad), _t(8, 8, 3, 3, device=dev, grad=grad),
                   _t(8, device=dev, grad=grad))
        return (lambda: tilefuse.ops.conv2d(x, w, b, padding=1, activation="relu"),
                lambda: F.relu(F.conv2d(x, w, b, padding=1)), "F.relu(F.conv2d(x, w, b)) 3x3")
    return build


def _fp8(kind: str):
    def build(dev):
        import tilefuse

        f8 = torch.float8_e4m3fn
        a = _t(4, 32, device=dev).to(f8)
        b = _t(32, 32, device=dev).to(f8).t()  # K-major, as _scaled_mm wants
        sa, sb = torch.tensor(0.5, device=dev), torch.tensor(0.25, device=dev)
        x = _t(4, 32, device=dev)
        if kind == "fp8_matmul":
            return (lambda: tilefuse.ops.fp8_matmul(a, b, sa, sb),
                    lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16),
                    "torch._scaled_mm(a, b, sa, sb)")
        if kind == "quantize_fp8_per_row":
            def ref():
                scale = x.abs().amax(-1, keepdim=True) / 448
                return (x / scale).to(f8), scale
            return (lambda: tilefuse.ops.quantize_fp8_per_row(x), ref,
                    "absmax/448, scale, cast to e4m3")
        if kind == "dequantize_fp8":
            s_row = torch.rand(4, 1, device=dev)
            return (lambda: tilefuse.ops.dequantize_fp8(a, s_row),
                    lambda: a.float() * s_row, "q.float() * scale")
        w, sw = _t(32, 32, device=dev).to(f8), torch.rand(32, device=dev)
        return (lambda: tilefuse.ops.fp8_linear(x, w, sw),
                lambda: F.linear(x, w.float() * sw[:, None]), "F.linear(x, q * scale)")
    return build


def _dropout(kind: str, grad: bool = False):
    def build(dev):
        import tilefuse

        x, r = _t(4, 32, device=dev, grad=grad), _t(4, 32, device=dev, grad=grad)
        if kind == "dropout2d":
            x = _t(2, 8, 4, 4, device=dev)
            return (lambda: tilefuse.ops.dropout2d(x, 0.1), lambda: F.dropout2d(x, 0.1),
                    "F.dropout2d(x, 0.1)")
        if kind == "dropout_add":
            return (lambda: tilefuse.ops.dropout_add(x, r, 0.1), lambda: F.dropout(x, 0.1) + r,
                    "F.dropout(x, 0.1) + r")
        return lambda: tilefuse.ops.dropout(x, 0.1), lambda: F.dropout(x, 0.1), \
            "F.dropout(x, 0.1)"
    return build


def _cross_entropy(grad: bool = False):
    def build(dev):
        import tilefuse

        logits, target = _t(4, 32, device=dev, grad=grad), torch.randint(0, 32, (4,), device=dev)
        return (lambda: tilefuse.ops.cross_entropy(logits, target, label_smoothing=0.1),
                lambda: F.cross_entropy(logits, target, label_smoothing=0.1),
                "F.cross_entropy(logits, target, label_smoothing=0.1)")
    return build


def _int8(kind: str):
    def build(dev):
        import tilefuse

        qa = torch.randint(-127, 128, (4, 32), device=dev, dtype=torch.int8)
        qw = torch.randint(-127, 128, (32, 32), device=dev, dtype=torch.int8)
        x, s, b = _t(4, 32, device=dev), torch.rand(32, device=dev) * 1e-2, _t(32, device=dev)
        if kind == "int8_matmul":
            return (lambda: tilefuse.ops.int8_matmul(qa, qw.t()), lambda: torch._int_mm(qa, qw.t()),
                    "torch._int_mm(a, b)")
        if kind == "quantize_per_row":
            def ref():
                scale = x.abs().amax(-1, keepdim=True) / 127
                return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale
            return lambda: tilefuse.ops.quantize_per_row(x), ref, "absmax/127, round, clamp, int8"
        if kind == "dequantize_per_row":
            s_row = torch.rand(4, 1, device=dev)
            return (lambda: tilefuse.ops.dequantize_per_row(qa, s_row),
                    lambda: qa.float() * s_row, "q.float() * scale")
        if kind == "w8a8_linear":
            def ref():
                sx = x.abs().amax(-1, keepdim=True) / 127
                qx = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
                return torch._int_mm(qx, qw.t()).float() * sx * s + b
            return (lambda: tilefuse.ops.w8a8_linear(x, qw, s, b), ref,
                    "quantize x per row + torch._int_mm + scales + bias")
        return (lambda: tilefuse.ops.weight_only_int8_linear(x, qw, s, b),
                lambda: F.linear(x, qw.float() * s[:, None], b), "F.linear(x, q * scale, b)")
    return build


def _dropconnect(dev):
    import tilefuse

    x, w, b = _t(4, 32, device=dev), _t(32, 32, device=dev), _t(32, device=dev)
    return (lambda: tilefuse.ops.dropconnect_linear(x, w, b, p=0.1),
            lambda: F.linear(x, F.dropout(w, 0.1), b), "F.linear(x, F.dropout(w, 0.1), b)")


def _params(dev):
    ps = [torch.nn.Parameter(_t(*((32, 32) if i % 2 else (32,)), device=dev)) for i in range(50)]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    return ps


def torch_adamw(params) -> Tuple[torch.optim.Optimizer, str]:
    """``torch.optim.AdamW(fused=True)`` where this torch runs it on these params, else
    ``foreach=True``; returns the optimizer and which one it is."""
    try:
        opt = torch.optim.AdamW(params, fused=True)
        opt.step()
        return opt, "torch.optim.AdamW(fused=True).step()"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True), "torch.optim.AdamW(foreach=True).step()"


def _adamw(dev):
    import tilefuse.optim

    ours = tilefuse.optim.AdamW(_params(dev))
    ref, label = torch_adamw(_params(dev))
    return ours.step, ref.step, label + ", 50 params"


CASES: List[HostCase] = [
    HostCase("linear", "linear", _linear(grad=False, backward=False, gelu=False)),
    HostCase("linear/grad", "linear", _linear(grad=True, backward=False, gelu=False), grad=True),
    HostCase("linear+gelu", "linear", _linear(grad=False, backward=False)),
    HostCase("linear+gelu/grad", "linear", _linear(grad=True, backward=False), grad=True),
    HostCase("linear+gelu/fwd+bwd", "linear", _linear(grad=True, backward=True), grad=True),
    HostCase("matmul", "matmul", _matmul()),
    HostCase("matmul/grad", "matmul", _matmul(grad=True), grad=True),
    HostCase("layer_norm_act", "layer_norm_act", _layer_norm(grad=False)),
    HostCase("layer_norm_act/grad", "layer_norm_act", _layer_norm(grad=True), grad=True),
    HostCase("rms_norm_act", "rms_norm_act", _rms_norm()),
    HostCase("rms_norm_act/grad", "rms_norm_act", _rms_norm(grad=True), grad=True),
    HostCase("group_norm_act", "group_norm_act", _group_norm()),
    HostCase("group_norm_act/grad", "group_norm_act", _group_norm(grad=True), grad=True),
    HostCase("batch_norm_act/eval+relu", "batch_norm_act", _batch_norm(training=False)),
    HostCase("batch_norm_act/train", "batch_norm_act", _batch_norm(training=True)),
    HostCase("batch_norm_act/train+grad", "batch_norm_act",
             _batch_norm(training=True, grad=True), grad=True),
    HostCase("depthwise_conv2d/3x3", "depthwise_conv2d", _depthwise()),
    HostCase("depthwise_conv2d/3x3/grad", "depthwise_conv2d", _depthwise(grad=True), grad=True),
    HostCase("conv2d/3x3+relu", "conv2d", _conv2d()),
    HostCase("conv2d/3x3+relu/grad", "conv2d", _conv2d(grad=True), grad=True),
    HostCase("dropout", "dropout", _dropout("dropout")),
    HostCase("dropout/grad", "dropout", _dropout("dropout", grad=True), grad=True),
    HostCase("dropout_add", "dropout_add", _dropout("dropout_add")),
    HostCase("dropout2d", "dropout2d", _dropout("dropout2d")),
    HostCase("cross_entropy/ls=0.1", "cross_entropy", _cross_entropy()),
    HostCase("cross_entropy/ls=0.1/grad", "cross_entropy", _cross_entropy(grad=True),
             grad=True),
    HostCase("int8_matmul", "int8_matmul", _int8("int8_matmul")),
    HostCase("quantize_per_row", "quantize_per_row", _int8("quantize_per_row")),
    HostCase("dequantize_per_row", "dequantize_per_row", _int8("dequantize_per_row")),
    HostCase("w8a8_linear", "w8a8_linear", _int8("w8a8_linear")),
    HostCase("weight_only_int8_linear", "weight_only_int8_linear", _int8("weight_only")),
    HostCase("dropconnect_linear", "dropconnect_linear", _dropconnect),
    HostCase("fp8_matmul", "fp8_matmul", _fp8("fp8_matmul")),
    HostCase("quantize_fp8_per_row", "quantize_fp8_per_row", _fp8("quantize_fp8_per_row")),
    HostCase("dequantize_fp8", "dequantize_fp8", _fp8("dequantize_fp8")),
    HostCase("fp8_linear", "fp8_linear", _fp8("fp8_linear")),
    HostCase("AdamW.step", "AdamW", _adamw),
]

"""Scenarios for tools/aot_check.py: exercise tilefuse's public ops (per kernel family) so every
kernel / constexpr combination is launched, and run them under an ``aot_record.Recorder``.

Each family's generator yields ``(name, fn)`` pairs; ``fn()`` calls the public ops on small CPU
tensors. torch and tilefuse are passed in / imported lazily (after ``aot_check._prepare_env``).
"""
from __future__ import annotations

import itertools
import os
import re
import sys
import traceback

from aot_record import Recorder, first_lines

def _registry():
    """tilefuse/registry.py loaded by path: it imports nothing, and importing the ``tilefuse``
    package here would import triton before ``aot_check._prepare_env`` has set it up."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tilefuse",
                        "registry.py")
    spec = importlib.util.spec_from_file_location("_tilefuse_registry", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


FAMILIES = tuple(_registry().FAMILIES)  # the kernel families, from the op registry


# ------------------------------------------------------------------------------------------------
# drivers: exercise the public API so every kernel family / constexpr combination is launched
# ------------------------------------------------------------------------------------------------
ACTS = ("relu", "relu6", ("leaky_relu", 0.2), "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")


def _with_tf32(torch, fn):
    """``fn`` run with torch's TF32 matmul flag set (restored after): the fp32 GEMMs' TF32 path."""
    def run():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    return run


def _scenarios_matmul(torch, tf):
    ops = tf.ops
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for M in (8, 48, 256):  # the three heuristic tile classes
            a = torch.randn(M, 96, dtype=dt)
            w = torch.randn(128, 96, dtype=dt)
            yield f"linear {dt} M={M}", lambda a=a, w=w: ops.linear(a, w)
        a = torch.randn(256, 96, dtype=dt, requires_grad=True)
        w = torch.randn(128, 96, dtype=dt, requires_grad=True)
        bias = torch.randn(128, dtype=dt, requires_grad=True)
        res = torch.randn(256, 128, dtype=dt)
        for act in ACTS:
            def fwd_bwd(act=act, a=a, w=w, bias=bias, res=res):
                y = ops.linear(a, w, bias=bias, activation=act, residual=res)
                y.backward(torch.ones_like(y))
            yield f"linear {dt} act={act} bias+res fwd+bwd", fwd_bwd
        # batched matmul, broadcast residual, odd sizes
        yield f"matmul {dt} batched", lambda dt=dt: ops.matmul(
            torch.randn(3, 70, 33, dtype=dt), torch.randn(3, 33, 65, dtype=dt),
            residual=torch.randn(65, dtype=dt))
        yield f"matmul {dt} out fp32", lambda dt=dt: ops.matmul(
            torch.randn(64, 32, dtype=dt), torch.randn(32, 64, dtype=dt), out_dtype=torch.float32)

    yield "matmul fp32 tf32", _with_tf32(torch, lambda: ops.matmul(torch.randn(256, 64),
                                                                     torch.randn(64, 128)))

    # issue 19: the Hopper GEMM launches (persistent TMA kernel on aligned operands, split-K for
    # small M, the grouped-order kernel for operands TMA cannot take)
    for dt in (torch.bfloat16, torch.float16):
        x, w = torch.randn(4096, 4096, dtype=dt), torch.randn(4096, 4096, dtype=dt)
        yield f"linear 4096^3 {dt}", lambda x=x, w=w: ops.linear(x, w)
        yield f"linear 4096^3 {dt} bias+gelu", lambda x=x, w=w, dt=dt: ops.linear(
            x, w, torch.randn(4096, dtype=dt), activation="gelu")
        for M in (1, 16, 128):
            yield f"linear M={M} 4096x4096 {dt} split-K", lambda M=M, w=w, dt=dt: ops.linear(
                torch.randn(M, 4096, dtype=dt), w, torch.randn(4096, dtype=dt))
        yield f"linear {dt} K=4095 (unaligned: grouped-order fallback)", lambda dt=dt: ops.linear(
            torch.randn(512, 4095, dtype=dt), torch.randn(1024, 4095, dtype=dt))

    yield "linear 4096^3 fp32 tf32", _with_tf32(torch, lambda: ops.linear(
        torch.randn(4096, 4096), torch.randn(4096, 4096)))
    yield from _scenarios_gemm_ws(torch)
    yield "matmul fp64", lambda: ops.matmul(torch.randn(128, 64, dtype=torch.float64),
                                            torch.randn(64, 128, dtype=torch.float64))


def _scenarios_gemm_ws(torch):
    """The persistent TMA kernel with the ``WARP_SPEC`` tuning option (config only, never the
    heuristic's choice): 4096^3 bf16 at 128x256 and 128x128 tiles, with a GELU epilogue, and
    split-K at M=16 (docs/gemm.md)."""
    from tilefuse.kernels.matmul import launch_matmul

    x, w = torch.randn(4096, 4096, dtype=torch.bfloat16), torch.randn(4096, 4096,
                                                                       dtype=torch.bfloat16)
    ws = dict(GROUP_M=8, num_warps=4, num_stages=3, WARP_SPEC=True)
    for bn in (256, 128):
        cfg = dict(ws, BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64)
        yield f"linear 4096^3 torch.bfloat16 128x{bn} warp-specialized", (
            lambda cfg=cfg: launch_matmul(x, w.t(), torch.empty_like(x), config=cfg))
    gelu = dict(ws, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    yield "linear 4096^3 torch.bfloat16 bias+gelu warp-specialized", lambda: launch_matmul(
        x, w.t(), torch.empty_like(x), bias=torch.randn(4096, dtype=torch.bfloat16),
        activation=4, config=gelu)
    small = dict(ws, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4)
    yield "linear M=16 4096x4096 torch.bfloat16 split-K warp-specialized", lambda: launch_matmul(
        x[:16], w.t(), torch.empty(16, 4096, dtype=torch.bfloat16), config=small)


def _scenarios_depthwise(torch, tf):
    ops = tf.ops
    shapes = [  # (N, C, H, W, k, stride, pad, dil, mult)
        (2, 32, 56, 56, 3, 1, 1, 1, 1),
        (2, 64, 7, 7, 3, 1, 1, 1, 1),
        (2, 16, 28, 28, 5, 2, 2, 1, 1),
        (1, 8, 15, 17, 3, 1, 2, 2, 2),
        (1, 24, 14, 14, 7, 1, 3, 1, 1),
        (2, 32, 112, 112, 3, 2, 1, 1, 1),  # MobileNetV2's stride-2 3x3 layers
        (2, 32, 56, 56, 3, 2, 1, 1, 1),
    ]
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for (N, C, H, W, k, s, p, d, m) in shapes:
            for cl in (False, True):
                def run(N=N, C=C, H=H, W=W, k=k, s=s, p=p, d=d, m=m, cl=cl, dt=dt):
                    x = torch.randn(N, C, H, W, dtype=dt)
                    if cl:
                        x = x.to(memory_format=torch.channels_last)
                    x.requires_grad_(True)
                    w = torch.randn(C * m, 1, k, k, dtype=dt, requires_grad=True)
                    b = torch.randn(C * m, dtype=dt, requires_grad=True)
                    y = ops.depthwise_conv2d(x, w, b, stride=s, padding=p, dilation=d,
                                             activation="relu6")
                    y.backward(torch.ones_like(y))
                yield (f"dwconv {dt} {N}x{C}x{H}x{W} k{k} s{s} d{d} m{m} "
                       f"{'NHWC' if cl else 'NCHW'} fwd+bwd"), run
        x = torch.randn(2, 32, 14, 14, dtype=dt)
        w = torch.randn(32, 1, 3, 3, dtype=dt)
        for act in ACTS:
            yield f"dwconv {dt} act={act} residual", lambda x=x, w=w, act=act: \
                ops.depthwise_conv2d(x, w, padding=1, activation=act, residual=x)


def _scenarios_conv(torch, tf):
    """Dense conv2d (implicit GEMM): the ResNet-50 3x3 channels_last bf16 conv (fwd with the
    residual block epilogue, fwd+bwd), the 7x7 stride-2 stem, a 1x1, grouped/NCHW, every dtype."""
    ops = tf.ops
    cl = torch.channels_last
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        def res_block(dt=dt):  # ResNet-50 layer1 3x3: relu(conv + b + identity), batch 8
            x = torch.randn(8, 64, 56, 56, dtype=dt).to(memory_format=cl)
            w = torch.randn(64, 64, 3, 3, dtype=dt).to(memory_format=cl)
            ops.conv2d(x, w, torch.randn(64, dtype=dt), padding=1, residual=x,
                       post_activation="relu")
        yield f"conv {dt} resnet50 3x3 64ch NHWC bias+res+relu", res_block

        def fwd_bwd(dt=dt, N=8, C=128, H=28, k=3, s=1, act="relu"):
            x = torch.randn(N, C, H, H, dtype=dt).to(memory_format=cl).requires_grad_()
            w = torch.randn(C, C, k, k, dtype=dt).to(memory_format=cl).requires_grad_()
            b = torch.randn(C, dtype=dt, requires_grad=True)
            y = ops.conv2d(x, w, b, stride=s, padding=k // 2, activation=act)
            y.backward(torch.ones_like(y))
        yield f"conv {dt} resnet50 3x3 128ch NHWC relu fwd+bwd", fwd_bwd
        yield f"conv {dt} 3x3 s2 silu fwd+bwd", lambda dt=dt: fwd_bwd(dt, 4, 64, 28, 3, 2, "silu")
        yield f"conv {dt} stem 7x7 s2", lambda dt=dt: ops.conv2d(
            torch.randn(2, 3, 224, 224, dtype=dt).to(memory_format=cl),
            torch.randn(64, 3, 7, 7, dtype=dt), stride=2, padding=3, activation="relu")
        yield f"conv {dt} 1x1 256->64", lambda dt=dt: ops.conv2d(
            torch.randn(4, 256, 14, 14, dtype=dt).to(memory_format=cl),
            torch.randn(64, 256, 1, 1, dtype=dt))
        yield f"conv {dt} grouped NCHW", lambda dt=dt: ops.conv2d(
            torch.randn(2, 32, 15, 15, dtype=dt), torch.randn(64, 4, 3, 3, dtype=dt),
            padding=1, groups=8, activation="gelu")
    yield "conv fp64", lambda: ops.conv2d(torch.randn(2, 16, 9, 9, dtype=torch.float64),
                                          torch.randn(16, 16, 3, 3, dtype=torch.float64))

    def res_block_bwd(dt=torch.bfloat16):  # residual needing a gradient: du pass + fused act'
        x = torch.randn(8, 64, 56, 56, dtype=dt).to(memory_format=cl).requires_grad_()
        w = torch.randn(64, 64, 3, 3, dtype=dt).to(memory_format=cl).requires_grad_()
        r = torch.randn(8, 64, 56, 56, dtype=dt).to(memory_format=cl).requires_grad_()
        y = ops.conv2d(x, w, torch.randn(64, dtype=dt, requires_grad=True), padding=1,
                       activation="silu", residual=r, post_activation="relu")
        y.backward(torch.ones_like(y))
    yield "conv torch.bfloat16 resnet50 3x3 64ch NHWC silu+res+relu fwd+bwd", res_block_bwd

    # int8 (Int8Conv2d's kernel, tilefuse::int8_conv2d): W8A8 with per-image / per-input-pixel
    # activation scales (QUANT=1 / 2) and weight-only (QUANT=3), ResNet-50 layer1 shapes
    from tilefuse.fused.conv_int8 import int8_conv2d_op

    def int8_conv(scale, k=3, C=64, CO=64, H=56, q=None, act=1):
        q = torch.randint(-127, 127, (8, C, H, H), dtype=torch.int8).to(memory_format=cl) \
            if q is None else q
        w = torch.randint(-127, 127, (CO, C, k, k), dtype=torch.int8).to(memory_format=cl)
        return int8_conv2d_op(q, scale, w, torch.rand(CO), torch.randn(CO), None, [1, 1],
                              [k // 2, k // 2], [1, 1], [H, H], act, 0.0, 0, 0.0,
                              torch.bfloat16)
    yield "conv int8 resnet50 3x3 64ch NHWC W8A8 per-image -> bf16", lambda: int8_conv(
        torch.rand(8, 1, 1))
    yield "conv int8 resnet50 3x3 64ch NHWC W8A8 per-pixel -> bf16", lambda: int8_conv(
        torch.rand(8, 56, 56))
    yield "conv int8 1x1 256->64 NHWC W8A8 per-pixel -> bf16", lambda: int8_conv(
        torch.rand(8, 14, 14), k=1, C=256, H=14)
    yield "conv int8 3x3 64ch NHWC weight-only bf16", lambda: int8_conv(
        None, q=torch.randn(8, 64, 56, 56, dtype=torch.bfloat16).to(memory_format=cl))
    yield "conv int8 resnet50 3x3 64ch NHWC W8A8 static -> bf16", lambda: int8_conv(
        torch.rand(1), q=torch.randn(8, 64, 56, 56, dtype=torch.bfloat16).to(memory_format=cl))


def _scenarios_int8(torch, tf):
    ops = tf.ops
    # issue 19: W8A8 at 4096^3 (persistent TMA, 128x256x128) and decode sizes (split-K)
    qa = torch.randint(-127, 127, (4096, 4096), dtype=torch.int8)
    qw = torch.randint(-127, 127, (4096, 4096), dtype=torch.int8)
    yield "int8 W8A8 4096^3 raw", lambda: ops.int8_matmul(qa, qw.t())
    yield "int8 W8A8 4096^3 scaled -> bf16", lambda: ops.int8_matmul(
        qa, qw.t(), torch.rand(4096), torch.rand(4096), bias=torch.randn(4096),
        out_dtype=torch.bfloat16)
    for M in (1, 16, 128):
        yield f"int8 W8A8 M={M} 4096x4096 split-K", lambda M=M: ops.int8_matmul(
            qa[:M], qw.t(), torch.rand(M), torch.rand(4096), out_dtype=torch.bfloat16)
    yield "int8 W8A8 row-major B (grouped-order fallback)", lambda: ops.int8_matmul(
        qa[:256], qw.t().contiguous())
    from tilefuse.kernels.int8_matmul import launch_int8_matmul

    ws = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3,
              WARP_SPEC=True)  # the WARP_SPEC tuning option (docs/gemm.md)
    yield "int8 W8A8 4096^3 scaled -> bf16 warp-specialized", lambda: launch_int8_matmul(
        qa, qw.t(), torch.empty(4096, 4096, dtype=torch.bfloat16), torch.rand(4096),
        torch.rand(4096), torch.randn(4096), config=ws)
    for M in (8, 48, 256):
        a = torch.randint(-127, 127, (M, 256), dtype=torch.int8)
        b = torch.randint(-127, 127, (256, 128), dtype=torch.int8)
        yield f"int8_matmul raw M={M}", lambda a=a, b=b: ops.int8_matmul(a, b)
        for odt in (torch.float16, torch.bfloat16, torch.float32):
            yield f"int8_matmul scaled M={M} -> {odt}", lambda a=a, b=b, odt=odt: ops.int8_matmul(
                a, b, torch.rand(a.shape[0]), torch.rand(128), bias=torch.randn(128, dtype=odt),
                activation="gelu", residual=torch.randn(a.shape[0], 128, dtype=odt),
                out_dtype=odt)
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.randn(M, 256, dtype=dt)
            q, s = ops.quantize_per_row(torch.randn(128, 256))
            yield f"weight_only_int8_linear {dt} M={M}", lambda x=x, q=q, s=s, dt=dt: \
                ops.weight_only_int8_linear(x, q, s, bias=torch.randn(128, dtype=dt),
                                            activation="silu")
            yield f"w8a8_linear {dt} M={M}", lambda x=x, q=q, s=s, dt=dt: ops.w8a8_linear(
                x, q, s, bias=torch.randn(128, dtype=dt), residual=torch.randn(
                    x.shape[0], 128, dtype=dt))
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for (M, N) in ((4, 64), (300, 1000), (64, 4096), (8, 20000)):
            yield f"quantize_per_row {dt} {M}x{N}", lambda M=M, N=N, dt=dt: \
                ops.quantize_per_row(torch.randn(M, N, dtype=dt))
    # tilefuse::dequantize on int8: per-row / per-tensor (S_ROWS) and elementwise scales
    q = torch.randint(-127, 127, (4096, 4096), dtype=torch.int8)
    for odt in (torch.float32, torch.float16, torch.bfloat16):
        for sdt in (torch.float32, torch.float16, torch.bfloat16):
            yield f"dequantize_per_row per-row {sdt} -> {odt}", lambda odt=odt, sdt=sdt: \
                ops.dequantize_per_row(q, torch.rand(4096, 1, dtype=sdt), odt)
    yield "dequantize_per_row per-tensor 4x64", lambda: ops.dequantize_per_row(
        q[:4, :64], torch.rand((), dtype=torch.bfloat16))
    yield "dequantize_per_row elementwise -> bf16", lambda: ops.dequantize_per_row(
        q, torch.rand(4096, 4096, dtype=torch.float16), torch.bfloat16)


def _scenarios_fp8(torch, tf):
    ops = tf.ops
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    for M in (8, 48, 256):  # the three heuristic tile classes
        for adt, bdt in ((e4, e4), (e5, e5), (e4, e5)):
            a = torch.randn(M, 256).to(adt)
            w = torch.randn(128, 256).to(bdt)
            for odt in (torch.bfloat16, torch.float16, torch.float32):
                yield f"fp8_matmul {adt}x{bdt} M={M} -> {odt}", \
                    lambda a=a, w=w, odt=odt: ops.fp8_matmul(
                        a, w.t(), torch.rand(a.shape[0]), torch.rand(128),
                        bias=torch.randn(128, dtype=odt), activation="gelu",
                        residual=torch.randn(a.shape[0], 128, dtype=odt), out_dtype=odt)
        a, w = torch.randn(M, 256).to(e4), torch.randn(128, 256).to(e4)
        yield f"fp8_matmul fast_accum M={M}", lambda a=a, w=w: ops.fp8_matmul(
            a, w.t(), torch.ones(1), torch.ones(1), fast_accum=True)
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            x = torch.randn(M, 256, dtype=dt)
            yield f"fp8_linear {dt} M={M}", lambda x=x, w=w, dt=dt: ops.fp8_linear(
                x, w, torch.rand(128), bias=torch.randn(128, dtype=dt), activation="silu")
    for fmt in (e4, e5):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for (M, N) in ((4, 64), (300, 1000), (8, 20000)):
                yield f"quantize_fp8_per_row {dt} -> {fmt} {M}x{N}", lambda M=M, N=N, dt=dt, \
                    fmt=fmt: ops.quantize_fp8_per_row(torch.randn(M, N, dtype=dt), fmt)
    # tilefuse::dequantize on fp8 (decoded from the bits): per-row and per-column scales
    for fmt in (e4, e5):
        q = torch.randn(4096, 4096).to(fmt)
        for odt in (torch.float32, torch.float16, torch.bfloat16):
            yield f"dequantize_fp8 {fmt} per-row -> {odt}", lambda q=q, odt=odt: \
                ops.dequantize_fp8(q, torch.rand(4096, 1), odt)
        yield f"dequantize_fp8 {fmt} per-column bf16 scale -> bf16", lambda q=q: \
            ops.dequantize_fp8(q, torch.rand(4096, dtype=torch.bfloat16), torch.bfloat16)


def _scenarios_norm(torch, tf):
    ops = tf.ops
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for N in (64, 1000, 4096, 20000):  # one block ... multi-block rows
            for rms in (False, True):
                for act, use_res, affine in ((None, False, True), ("gelu", True, True),
                                             ("silu", False, False)):
                    def run(N=N, rms=rms, act=act, use_res=use_res, affine=affine, dt=dt):
                        x = torch.randn(8, N, dtype=dt, requires_grad=True)
                        w = torch.randn(N, dtype=dt, requires_grad=True) if affine else None
                        b = torch.randn(N, dtype=dt, requires_grad=True) if affine else None
                        r = torch.randn(8, N, dtype=dt, requires_grad=True) if use_res else None
                        if rms:
                            y = ops.rms_norm_act(x, (N,), w, activation=act, residual=r)
                        else:
                            y = ops.layer_norm_act(x, (N,), w, b, activation=act, residual=r)
                        y.backward(torch.ones_like(y))
                    yield (f"{'rms' if rms else 'layer'}_norm_act {dt} N={N} act={act} "
                           f"res={use_res} affine={affine} fwd+bwd"), run
        for (shape, groups) in (((4, 32, 16, 16), 8), ((2, 64, 7, 7), 32), ((2, 256, 32, 32), 4),
                                ((2, 12, 100), 3)):
            for cl in (False, True):
                if cl and len(shape) != 4:
                    continue
                def run(shape=shape, groups=groups, cl=cl, dt=dt):
                    x = torch.randn(*shape, dtype=dt)
                    if cl:
                        x = x.to(memory_format=torch.channels_last)
                    x.requires_grad_(True)
                    C = shape[1]
                    w = torch.randn(C, dtype=dt, requires_grad=True)
                    b = torch.randn(C, dtype=dt, requires_grad=True)
                    with torch.no_grad():  # no stats stored; the second call is the plan's
                        for _ in range(2):
                            ops.group_norm_act(x.detach(), groups, w, b, activation="silu")
                    y = ops.group_norm_act(x, groups, w, b, activation="silu")
                    y.backward(torch.ones_like(y))
                yield f"group_norm_act {dt} {shape} G={groups} cl={cl} fwd+bwd", run
        for shape in ((8, 64, 14, 14), (32, 128), (4, 256, 7, 7), (2, 16, 100)):
            for training in (True, False):
                for cl in (False, True):
                    if cl and len(shape) != 4:
                        continue
                    def run(shape=shape, training=training, cl=cl, dt=dt):
                        x = torch.randn(*shape, dtype=dt)
                        if cl:
                            x = x.to(memory_format=torch.channels_last)
                        x.requires_grad_(True)
                        C = shape[1]
                        rm, rv = torch.zeros(C), torch.ones(C)
                        w = torch.randn(C, requires_grad=True)
                        b = torch.randn(C, requires_grad=True)
                        y = ops.batch_norm_act(x, rm, rv, w, b, training=training,
                                               activation="relu", residual=x.detach())
                        y.backward(torch.ones_like(y))
                    yield f"batch_norm_act {dt} {shape} train={training} cl={cl} fwd+bwd", run
        yield from _scenarios_bn_small(torch, ops, dt)
        yield from _scenarios_norm_batch1(torch, ops, dt)
        yield f"instance_norm running stats {dt}", lambda dt=dt: _instance_norm_running(
            torch, tf, dt)
        # pre-norm residual stream (h stored, dh added) on every path; 8448 x 8192: the widest
        # rows-in-registers backward (BWD_MAX_BLOCK) with its prefetched next row block
        for M, N in ((8, 1000), (16384, 512), (8, 20000), (8448, 8192)):
            for rms in (False, True):
                def prenorm(M=M, N=N, rms=rms, dt=dt):  # (empty tensors: nothing runs)
                    x, r = (torch.empty(M, N, dtype=dt, requires_grad=True) for _ in range(2))
                    w = torch.randn(N, dtype=dt, requires_grad=True)
                    fn = ops.rms_norm_act if rms else ops.layer_norm_act
                    y, h = fn(x, N, w, activation="gelu", residual=r, prenorm=True)
                    torch.autograd.backward((y, h), (torch.empty_like(y), torch.empty_like(h)))
                yield (f"{'rms' if rms else 'layer'}_norm_act {dt} {M}x{N} prenorm fwd+bwd",
                       prenorm)


def _instance_norm_running(torch, tf, dt):
    """InstanceNorm with running stats: the in-kernel update (instance_running_kernel)."""
    m = tf.nn.InstanceNormAct2d(16, track_running_stats=True, activation="relu")
    m(torch.randn(4, 16, 8, 8, dtype=dt))


def _scenarios_bn_small(torch, ops, dt):
    """BatchNorm's one-program path (the padded (N*S, C) tile fits SMALL_TILE): training with
    the module's counter and ``momentum=None`` (cumulative average), twice without grad (the
    plan's launch stores no statistics), then with grad; eval without affine parameters."""
    for shape, cl in (((4, 8, 4, 4), False), ((4, 8, 4, 4), True), ((16, 256), False),
                      ((2, 3, 5), False)):
        for momentum, counter in ((0.1, False), (None, True)):
            def run(shape=shape, cl=cl, momentum=momentum, counter=counter, dt=dt):
                x = torch.randn(*shape, dtype=dt)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                C = shape[1]
                rm, rv = torch.zeros(C), torch.ones(C)
                nbt = torch.tensor(0) if counter else None
                w = torch.randn(C, requires_grad=True)
                b = torch.randn(C, requires_grad=True)
                kw = dict(training=True, momentum=momentum, num_batches_tracked=nbt,
                          activation="relu")
                with torch.no_grad():
                    for _ in range(2):
                        ops.batch_norm_act(x, rm, rv, w, b, **kw)
                xg = x.clone().requires_grad_(True)
                y = ops.batch_norm_act(xg, rm, rv, w, b, residual=x, **kw)
                y.backward(torch.ones_like(y))
                y = ops.batch_norm_act(xg, rm, rv, training=False, activation="gelu")
                y.backward(torch.ones_like(y))
            yield (f"batch_norm_act {dt} {shape} cl={cl} momentum={momentum} "
                   f"counter={counter} small"), run


def _scenarios_norm_batch1(torch, ops, dt):
    """Issue 17's sm_90 targets: GroupNorm 1x320x64x64 (32 groups) and BatchNorm 1x64x56x56
    (and 4x64x56x56: NCHW walked per sample), both layouts, fwd+bwd."""
    for cl in (False, True):
        def gn(cl=cl, dt=dt):
            x = torch.randn(1, 320, 64, 64, dtype=dt)
            x = x.to(memory_format=torch.channels_last) if cl else x
            x.requires_grad_(True)
            w = torch.randn(320, dtype=dt, requires_grad=True)
            b = torch.randn(320, dtype=dt, requires_grad=True)
            y = ops.group_norm_act(x, 32, w, b, activation="silu")
            y.backward(torch.ones_like(y))
        yield f"group_norm_act {dt} (1, 320, 64, 64) G=32 cl={cl} batch1 fwd+bwd", gn
        for n, trainings in ((1, (True, False)), (4, (True,))):
            for training in trainings:
                def bn(cl=cl, dt=dt, n=n, training=training):
                    x = torch.randn(n, 64, 56, 56, dtype=dt)
                    x = x.to(memory_format=torch.channels_last) if cl else x
                    x.requires_grad_(True)
                    w = torch.randn(64, requires_grad=True)
                    b = torch.randn(64, requires_grad=True)
                    y = ops.batch_norm_act(x, torch.zeros(64), torch.ones(64), w, b,
                                           training=training, activation="relu")
                    y.backward(torch.ones_like(y))
                yield (f"batch_norm_act {dt} ({n}, 64, 56, 56) train={training} cl={cl} "
                       f"batch1 fwd+bwd"), bn


def _scenarios_dropout(torch, tf):
    ops = tf.ops
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((1000,), (64, 4096), (4, 16, 33, 9)):
            def run(shape=shape, dt=dt):
                x = torch.randn(*shape, dtype=dt, requires_grad=True)
                y = ops.dropout(x, 0.1)
                y.backward(torch.ones_like(y))
            yield f"dropout {dt} {shape} fwd+bwd", run
            yield f"dropout_add {dt} {shape}", lambda shape=shape, dt=dt: ops.dropout_add(
                torch.randn(*shape, dtype=dt), torch.randn(*shape, dtype=dt), 0.2)
        yield f"dropout strided {dt}", lambda dt=dt: ops.dropout(
            torch.randn(64, 128, dtype=dt).t(), 0.3)
        yield f"dropout_add broadcast residual {dt}", lambda dt=dt: ops.dropout_add(
            torch.randn(8, 64, dtype=dt), torch.randn(64, dtype=dt).expand(8, 64), 0.3)
        yield f"dropout2d {dt}", lambda dt=dt: ops.dropout2d(
            torch.randn(4, 16, 14, 14, dtype=dt), 0.2)
        yield f"dropout2d channels_last {dt}", lambda dt=dt: ops.dropout2d(
            torch.randn(4, 16, 14, 14, dtype=dt).to(memory_format=torch.channels_last), 0.2)
        for V in (10, 1000, 32000, 50257):
            def ce(V=V, dt=dt):
                logits = torch.randn(16, V, dtype=dt, requires_grad=True)
                target = torch.randint(0, V, (16,))
                loss = ops.cross_entropy(logits, target, label_smoothing=0.1)
                loss.backward()
                with torch.no_grad():
                    ops.cross_entropy(logits, target)
            yield f"cross_entropy {dt} V={V} fwd+bwd", ce

        def dc(dt=dt):
            x = torch.randn(32, 64, dtype=dt, requires_grad=True)
            w = torch.randn(128, 64, dtype=dt, requires_grad=True)
            y = ops.dropconnect_linear(x, w, torch.randn(128, dtype=dt), p=0.3,
                                       activation="relu")
            y.backward(torch.ones_like(y))
        yield f"dropconnect_linear {dt} fwd+bwd", dc
        try:
            import tilefuse.regularize as R
        except ImportError:  # pragma: no cover
            continue
        yield f"mixup {dt}", lambda dt=dt: R.mixup(torch.randn(8, 3, 16, 16, dtype=dt),
                                                   torch.randint(0, 10, (8,)), 0.4,
                                                   num_classes=10)


def _scenarios_optim(torch, tf):
    from tilefuse import optim as O

    def make(dt):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(*s, dtype=dt)) for s in ((300, 17), (5000,), (3,))]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    cases = [("AdamW", dict(lr=1e-3, weight_decay=0.01)), ("AdamW", dict(lr=1e-3, amsgrad=True)),
             ("Adam", dict(lr=1e-3)), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
             ("SGD", dict(lr=0.1)), ("RMSprop", dict(lr=1e-3, momentum=0.9, centered=True)),
             ("Adagrad", dict(lr=1e-2)), ("Lion", dict(lr=1e-4, weight_decay=0.1))]
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for name, kw in cases:
            def step(name=name, kw=kw, dt=dt):
                cls = getattr(O, name)
                try:
                    opt = cls(make(dt), **kw)
                except TypeError:  # option not supported by this optimizer
                    kw2 = {k: v for k, v in kw.items() if k in ("lr", "momentum", "weight_decay")}
                    opt = cls(make(dt), **kw2)
                opt.step()
                opt.step()
            yield f"{name} {dt} {kw}", step
        yield f"AdamW master_weights {dt}", lambda dt=dt: _opt_master(O, make, dt)
        yield f"AdamW step(max_grad_norm) {dt}", lambda dt=dt: O.AdamW(make(dt), lr=1e-3).step(
            max_grad_norm=1.0)
        for nt in (2.0, 1.0, float("inf")):
            yield f"clip_grad_norm_ {dt} norm={nt}", lambda dt=dt, nt=nt: O.clip_grad_norm_(
                make(dt), 1.0, norm_type=nt)
        yield f"GradNormMonitor {dt}", lambda dt=dt: _monitor(O, make, dt)


def _opt_master(O, make, dt):
    try:
        opt = O.AdamW(make(dt), lr=1e-3, master_weights=True)
    except TypeError:
        return
    opt.step()


def _monitor(O, make, dt):
    import torch

    ps = make(dt)
    model = torch.nn.Module()
    for i, p in enumerate(ps):
        model.register_parameter(f"p{i}", p)
    try:
        mon = O.GradNormMonitor(model)
    except TypeError:
        mon = O.GradNormMonitor(ps)
    mon.norms() if callable(getattr(mon, "norms", None)) else None


DRIVERS = {"matmul": _scenarios_matmul, "depthwise": _scenarios_depthwise, "int8": _scenarios_int8,
           "conv": _scenarios_conv,
           "fp8": _scenarios_fp8,
           "norm": _scenarios_norm, "dropout": _scenarios_dropout, "optim": _scenarios_optim}


def _host_scenarios(family):
    """Every registered op of ``family`` through its ``tilefuse bench host`` cases (tiny fp32
    calls, forward and, for the /grad rows, backward): the compile check covers a new op from
    its registry entry alone; the family drivers above add the dtypes, shapes and flags."""
    from tilefuse.bench.host_cases import CASES

    ops = {s.name for s in _registry().ops_of(family)}
    for case in CASES:
        if case.op in ops:
            def run(case=case):
                ours, _, _ = case.build("cpu")
                out = ours()
                if case.grad:
                    outs = out if isinstance(out, (tuple, list)) else (out,)
                    for o in outs:
                        if getattr(o, "requires_grad", False):
                            o.sum().backward()
            yield f"host:{case.name}", run


def drive(families, rec: Recorder, cuda_heuristics: bool, only: str | None, verbose: bool):
    """Run the scenarios of ``families`` under the recorder; returns driver errors."""
    import torch

    import tilefuse as tf

    errors = []
    with rec.patched(cuda_heuristics=cuda_heuristics):
        for fam in families:
            rec.family = fam
            for name, fn in itertools.chain(DRIVERS[fam](torch, tf), _host_scenarios(fam)):
                if only and not re.search(only, name):
                    continue
                rec.scenario = name
                before = rec.n_calls
                try:
                    fn()
                    if rec.n_calls == before:
                        errors.append(dict(family=fam, scenario=name, where="-", level="note",
                                           error="no Triton launch recorded (op took a "
                                                 "non-Triton path)"))
                except Exception as e:  # noqa: BLE001
                    tb = traceback.extract_tb(e.__traceback__)
                    where = next((f"{os.path.relpath(f.filename)}:{f.lineno}" for f in reversed(tb)
                                  if "tilefuse" in f.filename), "?")
                    errors.append(dict(family=fam, scenario=name, where=where,
                                       error=f"{type(e).__name__}: {first_lines(str(e), 3)}"))
                if verbose:
                    print(f"  [{fam}] {name}: {rec.n_calls - before} launches", file=sys.stderr)
    return errors


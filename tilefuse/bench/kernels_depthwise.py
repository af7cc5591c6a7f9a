"""Depthwise conv benchmark cases: MobileNetV2 / EfficientNet-B0 depthwise layers with their
bias + activation (relu6 / silu), the BN already folded (inference form).

Implementations per case:

* ``tilefuse``: :func:`tilefuse.ops.depthwise_conv2d` (one kernel: conv + bias + act);
* ``eager``: ``act(F.conv2d(x, w, b, groups=C))`` (cuDNN conv, then the activation);
* ``compile``: the eager function under :func:`torch.compile` (GPU only: compiling on CPU for a
  tiny case costs more than the whole benchmark);
* ``vendor``: ``F.conv2d(x, w, b, groups=C)`` alone (cuDNN, no activation): the anchor.

Each layer runs in NCHW and channels_last (cuDNN's channels_last grouped conv has cliffs,
pytorch#34977). ``fwd+bwd`` cases time forward + backward w.r.t. x, w and b. Bytes are an analytic
lower bound: x read once, y written once, weights/bias once (backward: dy, x read, dx written,
dw/db written, plus the forward); memory-bound, reported as GB/s. Flops: 2 * k*k MACs per output.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from tilefuse.bench.case import BenchCase, fwd, fwd_bwd

# name, (C, H, W), kernel, stride, activation
LAYERS = {
    "tiny": [("tiny_16x16x8_k3_s1", (8, 16, 16), 3, 1, "relu6")],
    "full": [
        ("mbv2_112x112x32_k3_s1", (32, 112, 112), 3, 1, "relu6"),
        ("mbv2_112x112x96_k3_s2", (96, 112, 112), 3, 2, "relu6"),
        ("mbv2_56x56x144_k3_s2", (144, 56, 56), 3, 2, "relu6"),
        ("effb0_14x14x480_k5_s1", (480, 14, 14), 5, 1, "silu"),
        ("effb0_28x28x240_k5_s2", (240, 28, 28), 5, 2, "silu"),
        ("mbv2_7x7x960_k3_s1", (960, 7, 7), 3, 1, "relu6"),
    ],
}
BATCH = {"tiny": 2, "full": 64}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}
_ACT = {"relu6": F.relu6, "silu": F.silu}


def _make(kind, act, stride, pad):
    if kind == "tilefuse":
        import tilefuse

        def f(x, w, b):
            return tilefuse.ops.depthwise_conv2d(x, w, b, stride, pad, activation=act)
    elif kind == "vendor":
        def f(x, w, b):
            return F.conv2d(x, w, b, stride, pad, 1, x.shape[1])
    else:
        def f(x, w, b):
            return _ACT[act](F.conv2d(x, w, b, stride, pad, 1, x.shape[1]))
    return f


def cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"depthwise benchmarks take floating dtypes, got {dtype}")
    dname = DTYPE_NAMES[dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    n = BATCH[size]
    out: List[BenchCase] = []
    for name, (c, h, w_), k, stride, act in LAYERS[size]:
        pad = k // 2
        oh, ow = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
        gen = torch.Generator(device="cpu").manual_seed(0)
        x0 = torch.randn(n, c, h, w_, generator=gen).to(device=device, dtype=dtype)
        wt = (torch.randn(c, 1, k, k, generator=gen) / k).to(device=device, dtype=dtype)
        bias = torch.randn(c, generator=gen).to(device=device, dtype=dtype)
        x_elems, y_elems, p_elems = n * c * h * w_, n * c * oh * ow, c * (k * k + 1)
        fwd_bytes = (x_elems + y_elems + p_elems) * es
        bwd_bytes = fwd_bytes + (y_elems + 2 * x_elems + p_elems) * es
        flops = 2.0 * y_elems * k * k
        shape = {"N": n, "C": c, "H": h, "W": w_, "k": k, "stride": stride, "act": act}
        kinds = ["tilefuse", "eager", "vendor"] + (["compile"] if device != "cpu" else [])
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = x0.contiguous(memory_format=fmt)
            fns = {}
            for kind in kinds:
                f = _make(kind, act, stride, pad)
                if kind == "compile":
                    f = torch.compile(_make("eager", act, stride, pad), dynamic=False)
                fns[kind] = fwd(f, x, wt, bias)
            out.append(BenchCase(
                family="depthwise", name=f"fwd/{name}/{layout}", shape=dict(shape, layout=layout),
                dtype=dname, fns=fns, flops=flops, bytes=fwd_bytes, bound="memory"))
            xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, wt, bias))
            g = torch.randn(n, c, oh, ow, generator=gen).to(device=device, dtype=dtype)
            g = g.contiguous(memory_format=fmt)
            bwd_fns = {}
            for kind in ("tilefuse", "eager"):
                bwd_fns[kind] = fwd_bwd(_make(kind, act, stride, pad), g, xg, wg, bg)
            out.append(BenchCase(
                family="depthwise", name=f"fwd+bwd/{name}/{layout}",
                shape=dict(shape, layout=layout), dtype=dname, fns=bwd_fns, flops=3 * flops,
                bytes=bwd_bytes, bound="memory",
                note="backward: dz = dy*act'(z), dx transposed depthwise, dw deterministic"))
    return out

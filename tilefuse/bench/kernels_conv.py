"""Dense conv2d benchmark cases: ResNet-50 / EfficientNet-B0 / MobileNetV2 layers as they run in
inference (conv -> BN -> activation (-> + identity -> relu for the ResNet block's last conv)),
channels_last (the layout these networks run in on GPUs).

Implementations per case:

* ``tilefuse``: :func:`tilefuse.ops.conv2d` with the BN folded into weight/bias and the
  activation / residual / post-activation in the epilogue (one kernel);
* ``eager``: ``F.conv2d`` (cuDNN) then ``F.batch_norm`` (eval), the activation and the residual
  add as separate torch ops (what an unpatched model runs);
* ``compile``: the eager function under :func:`torch.compile` (GPU only: compiling on CPU for a
  tiny case costs more than the whole benchmark);
* ``vendor``: ``F.conv2d`` alone with the folded weights (cuDNN, no epilogue): the anchor.

``int8/<layer>`` (inference): the folded conv as ``tilefuse.nn.Int8Conv2d`` (W8A8, per-image
dynamic activation scales, the int8 implicit-GEMM kernel with the whole epilogue) against the
float conv alone (``vendor``), reported against the int8 peak.

``fwd+bwd`` cases (training: BN cannot be folded, so the eager side is conv -> BN(train) -> act,
ours conv -> bias -> act with the gradient through the fused activation) time forward + backward
w.r.t. x and w. Flops: ``2 * N*OH*OW * C_out * C_in/groups * kH*kW`` per forward.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from tilefuse.bench.case import BenchCase, fwd, fwd_bwd

# name, (C_in, H, W), C_out, kernel, stride, activation, residual block end
LAYERS = {
    "tiny": [("tiny_8x8x8_k3_res", (8, 8, 8), 8, 3, 1, "none", True),
             ("tiny_8x8x8_k3_s2", (8, 8, 8), 16, 3, 2, "silu", False)],
    "full": [
        ("rn50_stem_224_k7_s2", (3, 224, 224), 64, 7, 2, "relu", False),
        ("rn50_56x56x64_k3", (64, 56, 56), 64, 3, 1, "relu", False),
        ("rn50_56x56x64_1x1_to256_res", (64, 56, 56), 256, 1, 1, "none", True),
        ("rn50_28x28x128_k3", (128, 28, 28), 128, 3, 1, "relu", False),
        ("rn50_14x14x256_k3", (256, 14, 14), 256, 3, 1, "relu", False),
        ("rn50_7x7x512_k3_res", (512, 7, 7), 512, 3, 1, "none", True),
        ("effb0_stem_224_k3_s2", (3, 224, 224), 32, 3, 2, "silu", False),
        ("effb0_28x28x40_1x1_to240", (40, 28, 28), 240, 1, 1, "silu", False),
        ("mbv2_56x56x24_1x1_to144", (24, 56, 56), 144, 1, 1, "relu6", False),
        ("mbv2_7x7x320_1x1_to1280", (320, 7, 7), 1280, 1, 1, "relu6", False),
    ],
}
BATCH = {"tiny": 2, "full": 32}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}
_ACT = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "none": lambda t: t}


def _bn_params(c, gen, device, dtype):
    mean, var = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (mean, var, gamma, beta)]


def _eager(act, stride, pad, bn, residual):
    mean, var, gamma, beta = bn

    def f(x, w, r=None):
        y = _ACT[act](F.batch_norm(F.conv2d(x, w, None, stride, pad), mean, var, gamma, beta,
                                   False, 0.0, 1e-5))
        return F.relu(y + r) if residual else y
    return f


def _ours(act, stride, pad, bias, residual):
    import tilefuse

    def f(x, w, r=None):
        if residual:
            return tilefuse.ops.conv2d(x, w, bias, stride, pad, activation=act, residual=r,
                                       post_activation="relu")
        return tilefuse.ops.conv2d(x, w, bias, stride, pad, activation=act)
    return f


def _int8_case(name, x, w_fold, b_fold, stride, pad, act, r, shape, dname, flops, vendor):
    """The folded conv as ``tilefuse.nn.Int8Conv2d`` (W8A8: per-output-channel int8 weights,
    per-image dynamic activation scales, int32 accumulation, scales + bias + act (+ residual) in
    the epilogue of the int8 implicit GEMM) against the float conv alone (cuDNN)."""
    from tilefuse.nn.int8_conv import Int8Conv2d

    conv = torch.nn.Conv2d(x.shape[1], w_fold.shape[0], w_fold.shape[-1], stride, pad,
                           device=x.device, dtype=x.dtype)
    with torch.no_grad():
        conv.weight.copy_(w_fold)
        conv.bias.copy_(b_fold)
    q = Int8Conv2d.from_float(conv, act_scale="sample",
                              activation=None if act == "none" else act,
                              post_activation="relu" if r is not None else None)

    def run():
        with torch.no_grad():
            return q(x) if r is None else q(x, r)
    n, c, h, w = x.shape
    co, k = w_fold.shape[0], w_fold.shape[-1]
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    byts = float(2 * x.numel() + n * co * oh * ow * x.element_size() + w_fold.numel() + 4 * co)
    return BenchCase(family="conv", name=f"int8/{name}", shape=shape, dtype="int8",
                     fns={"tilefuse": run, "vendor": vendor}, flops=flops, bytes=byts,
                     bound="compute",
                     note=f"Int8Conv2d W8A8 (per-image activation scales) vs the {dname} conv "
                          f"alone (cuDNN)")


def cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"conv benchmarks take floating dtypes, got {dtype}")
    dname = DTYPE_NAMES[dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    n = BATCH[size]
    cl = torch.channels_last
    out: List[BenchCase] = []
    for name, (c, h, w_), co, k, stride, act, residual in LAYERS[size]:
        pad = k // 2
        oh, ow = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(n, c, h, w_, generator=gen).to(device=device, dtype=dtype,
                                                       memory_format=cl)
        wt = (torch.randn(co, c, k, k, generator=gen) / (c * k * k) ** 0.5).to(
            device=device, dtype=dtype, memory_format=cl)
        bn = _bn_params(co, gen, device, dtype)
        scale = bn[2] * (bn[1] + 1e-5).rsqrt()
        w_fold = (wt * scale.view(-1, 1, 1, 1)).contiguous(memory_format=cl)
        b_fold = bn[3] - bn[0] * scale
        r = torch.randn(n, co, oh, ow, generator=gen).to(device=device, dtype=dtype,
                                                         memory_format=cl) if residual else None
        flops = 2.0 * n * oh * ow * co * c * k * k
        byts = (x.numel() + n * co * oh * ow * (2 if residual else 1) + wt.numel()) * es
        shape = {"N": n, "C": c, "H": h, "W": w_, "C_out": co, "k": k, "stride": stride,
                 "act": act, "residual": residual, "layout": "channels_last"}
        eager = _eager(act, stride, pad, bn, residual)
        fns = {"tilefuse": fwd(_ours(act, stride, pad, b_fold, residual), x, w_fold, r),
               "eager": fwd(eager, x, wt, r),
               "vendor": fwd(F.conv2d, x, w_fold, b_fold, stride, pad)}
        if device != "cpu":
            fns["compile"] = fwd(torch.compile(eager, dynamic=False), x, wt, r)
        out.append(BenchCase(family="conv", name=f"fwd/{name}", shape=shape, dtype=dname,
                             fns=fns, flops=flops, bytes=byts, bound="compute",
                             note="BN folded + act (+ residual + relu) in the epilogue"))
        if dtype != torch.float64:
            out.append(_int8_case(name, x, w_fold, b_fold, stride, pad, act, r, shape, dname,
                                  flops, fns["vendor"]))
        if residual:
            continue
        xg, wg = x.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()
        bg = torch.zeros(co, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(n, co, oh, ow, generator=gen).to(device=device, dtype=dtype,
                                                         memory_format=cl)
        ours_t = _ours(act, stride, pad, bg, False)

        def eager_t(x, w, act=act, stride=stride, pad=pad, co=co):
            y = F.conv2d(x, w, None, stride, pad)
            return _ACT[act](F.batch_norm(y, None, None, training=True))
        bwd_fns = {"tilefuse": fwd_bwd(ours_t, g, xg, wg), "eager": fwd_bwd(eager_t, g, xg, wg)}
        out.append(BenchCase(family="conv", name=f"fwd+bwd/{name}", shape=shape, dtype=dname,
                             fns=bwd_fns, flops=3 * flops, bytes=3 * byts, bound="compute",
                             note="ours: conv+bias+act (BN not foldable in training); eager: "
                                  "conv -> BN(train) -> act"))
    return out

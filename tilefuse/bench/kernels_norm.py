"""Normalization + activation benchmark cases: LayerNorm, RMSNorm, GroupNorm, BatchNorm.

Implementations per case:

* ``tilefuse``: the fused op (:func:`tilefuse.ops.layer_norm_act`, ...): one kernel forward;
* ``eager``: torch's norm followed by the activation (two kernels forward, more backward);
* ``compile``: the eager function under :func:`torch.compile` (built lazily on first call);
* ``vendor``: torch's native norm kernel alone, no activation: it does less work than the
  others; the anchor for "how close to a plain norm is the fused one".

``fwd`` cases time the forward; ``fwd+bwd`` time forward + backward w.r.t. x, weight and bias.
Bytes are an analytic lower bound: every activation-sized tensor read or written once per pass
(forward: x (+ residual) in, y out; backward: dy and x (+ residual) in, dx (+ d residual) out),
parameters and statistics ignored. A GPU run reports GB/s and % of HBM bandwidth from it; the
full shapes are several times the H200's 60 MB L2 so the number is an HBM number.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from tilefuse.bench.case import BenchCase, LazyCompiled, fwd, fwd_bwd

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}

SHAPES = {
    # rows x hidden for LN / RMS; (N, C, H, W, groups) for GN; (N, C, H, W) for BN
    "tiny": {"rows": [(64, 96)], "gn": [(2, 16, 8, 8, 4)], "bn": [(4, 8, 8, 8)]},
    "full": {"rows": [(16384, 4096), (65536, 1024)], "gn": [(32, 512, 64, 64, 32)],
             "bn": [(64, 256, 56, 56)]},
}


def _case(out, family, name, shape, dname, impls, args, grad_args, g, elems, es, n_in):
    fwd_bytes = (n_in + 1) * elems * es
    bwd_bytes = (2 * n_in + 1) * elems * es   # dy, x (, residual) in; dx (, d residual) out
    out.append(BenchCase(family=family, name=f"fwd/{name}", shape=shape, dtype=dname,
                         fns={k: fwd(f, *args) for k, f in impls.items()},
                         bytes=float(fwd_bytes), bound="memory",
                         note="vendor = torch's norm alone, no activation"))
    out.append(BenchCase(family=family, name=f"fwd+bwd/{name}", shape=shape, dtype=dname,
                         fns={k: fwd_bwd(f, g, *grad_args) for k, f in impls.items()},
                         bytes=float(fwd_bytes + bwd_bytes), bound="memory",
                         note="vendor = torch's norm alone, no activation"))


def _ln_ours(x, w, b):
    import tilefuse
    return tilefuse.ops.layer_norm_act(x, x.shape[-1:], w, b, activation="gelu")


def _ln_eager(x, w, b):
    return F.gelu(F.layer_norm(x, x.shape[-1:], w, b))


def _ln_vendor(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b)


def _rms_ours(x, w):
    import tilefuse
    return tilefuse.ops.rms_norm_act(x, x.shape[-1:], w, activation="silu")


def _rms_eager(x, w):
    return F.silu(F.rms_norm(x, x.shape[-1:], w))


def _rms_vendor(x, w):
    return F.rms_norm(x, x.shape[-1:], w)


def _gn_ours(x, w, b):
    import tilefuse
    return tilefuse.ops.group_norm_act(x, _GN_GROUPS[x.shape[1]], w, b, activation="silu")


def _gn_eager(x, w, b):
    return F.silu(F.group_norm(x, _GN_GROUPS[x.shape[1]], w, b))


def _gn_vendor(x, w, b):
    return F.group_norm(x, _GN_GROUPS[x.shape[1]], w, b)


_GN_GROUPS: dict = {}


def _bn_ours(x, rm, rv, w, b, r):
    import tilefuse
    return tilefuse.ops.batch_norm_act(x, rm, rv, w, b, training=True, activation="relu",
                                       residual=r)


def _bn_eager(x, rm, rv, w, b, r):
    return F.relu(F.batch_norm(x, rm, rv, w, b, training=True) + r)


def _bn_vendor(x, rm, rv, w, b, r):
    return F.batch_norm(x, rm, rv, w, b, training=True)


def cases(device: str, dtype: torch.dtype, size: str) -> List[BenchCase]:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"norm benchmarks take floating dtypes, got {dtype}")
    dname = DTYPE_NAMES[dtype]
    es = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, grad=False, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    out: List[BenchCase] = []
    shapes = SHAPES[size]
    for M, N in shapes["rows"]:
        x, w, b, g = rand(M, N), rand(N, shift=1.0), rand(N), rand(M, N)
        xg, wg, bg = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        impls = {"tilefuse": _ln_ours, "eager": _ln_eager,
                 "compile": LazyCompiled(_ln_eager), "vendor": _ln_vendor}
        _case(out, "layer_norm", f"{M}x{N}/gelu", {"M": M, "N": N}, dname, impls, (x, w, b),
              (xg, wg, bg), g, M * N, es, 1)
        impls = {"tilefuse": _rms_ours, "eager": _rms_eager,
                 "compile": LazyCompiled(_rms_eager), "vendor": _rms_vendor}
        _case(out, "rms_norm", f"{M}x{N}/silu", {"M": M, "N": N}, dname, impls, (x, w),
              (xg, wg), g, M * N, es, 1)
    for n, c, h, wd, groups in shapes["gn"]:
        _GN_GROUPS[c] = groups
        x, w, b, g = rand(n, c, h, wd), rand(c, shift=1.0), rand(c), rand(n, c, h, wd)
        xg, wg, bg = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        impls = {"tilefuse": _gn_ours, "eager": _gn_eager,
                 "compile": LazyCompiled(_gn_eager), "vendor": _gn_vendor}
        _case(out, "group_norm", f"{n}x{c}x{h}x{wd}/g{groups}/silu",
              {"N": n, "C": c, "H": h, "W": wd, "groups": groups}, dname, impls, (x, w, b),
              (xg, wg, bg), g, n * c * h * wd, es, 1)
    for n, c, h, wd in shapes["bn"]:
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = rand(n, c, h, wd).to(memory_format=fmt)
            r = rand(n, c, h, wd).to(memory_format=fmt)
            g = rand(n, c, h, wd).to(memory_format=fmt)
            rm = torch.zeros(c, device=device, dtype=dtype)
            rv = torch.ones(c, device=device, dtype=dtype)
            w, b = rand(c, shift=1.0), rand(c)
            xg, wg, bg, rg = (t.detach().clone().requires_grad_(True) for t in (x, w, b, r))
            impls = {"tilefuse": _bn_ours, "eager": _bn_eager,
                     "compile": LazyCompiled(_bn_eager), "vendor": _bn_vendor}
            _case(out, "batch_norm", f"{n}x{c}x{h}x{wd}/{layout}/train+res+relu",
                  {"N": n, "C": c, "H": h, "W": wd, "layout": layout}, dname, impls,
                  (x, rm, rv, w, b, r), (xg, rm, rv, wg, bg, rg), g, n * c * h * wd, es, 2)
    return out

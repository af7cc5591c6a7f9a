"""Tuning space of the dense conv2d implicit GEMMs (:mod:`tilefuse.kernels.conv_fwd`,
:mod:`tilefuse.kernels.conv_bwd`).

Key (what the launchers pass, :func:`tilefuse.kernels.conv_fwd.conv_key`): ``kind`` (``fwd``,
``dgrad`` or ``wgrad``), the GEMM's ``M, N, K`` (fwd: ``N*OH*OW`` pixels x ``C_out/groups`` x
``C_in/groups`` per tap; dgrad: ``N*H*W`` x ``C_in/groups`` x ``C_out/groups``; wgrad:
``C_out/groups`` x ``C_in/groups`` x ``N*OH*OW``), ``KH, KW``, ``stride``, ``dtype``, and
optionally ``layout="nhwc"`` and ``tf32``. Bucket: the kind, next powers of two of M, N, K (at
least 16), the kernel size, stride, dtype, layout and tf32. Config:
``BLOCK_M/N/K, GROUP_M, num_warps, num_stages`` (wgrad ignores ``GROUP_M``).

Pruning follows the matmul space (:mod:`tilefuse.autotune.matmul_space`): blocks clamped to the
bucket, ``num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K * elem`` within shared memory, 4..128
accumulator values per thread (64 for fp64), warps/stages collapsed in the interpreter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tilefuse.autotune.matmul_space import DTYPES, MatmulSpace, canonical_dtype
from tilefuse.autotune.space import Problem, next_pow2, register_space

KINDS = ("fwd", "dgrad", "wgrad")


def _geometry(key):
    """A conv problem whose ``kind`` GEMM has about the key's M, N, K (same bucket)."""
    kind, M, N, K = key["kind"], int(key["M"]), int(key["N"]), int(key["K"])
    kh, kw, s = int(key.get("KH", 3)), int(key.get("KW", 3)), int(key.get("stride", 1))
    if kind == "fwd":
        pixels, cout, cin = M, N, K
    elif kind == "dgrad":
        pixels, cin, cout = -(-M // (s * s)), N, K
    else:
        cout, cin, pixels = M, N, K
    ow = max(1, int(math.sqrt(pixels)))
    oh = -(-pixels // ow)
    return cin, cout, oh * s, ow * s, (kh, kw), s, ((kh - 1) // 2, (kw - 1) // 2)


class ConvSpace(MatmulSpace):
    name = "conv2d"
    required = MatmulSpace.required

    def sources(self):
        from tilefuse.kernels import activations, conv_bwd, conv_fwd

        return (conv_fwd.conv2d_fwd_kernel, conv_bwd.conv2d_dgrad_kernel,
                conv_bwd.conv2d_wgrad_kernel, conv_fwd.tap_step, conv_fwd.tile_dot,
                conv_bwd.dz_tile, activations)

    def bucket(self, key):
        kind = key.get("kind", "fwd")
        if kind not in KINDS:
            raise ValueError(f"conv2d key kind must be one of {KINDS}, got {kind!r}")
        M, N, K = (max(16, next_pow2(int(key[d]))) for d in "MNK")
        return (f"{kind},M={M},N={N},K={K},k={key.get('KH', 3)}x{key.get('KW', 3)},"
                f"s={key.get('stride', 1)},{canonical_dtype(key['dtype'])}"
                + (",nhwc" if key.get("layout") == "nhwc" else "")
                + (",tf32" if key.get("tf32") else ""))

    def default(self, key):
        from tilefuse.kernels.conv_fwd import heuristic_config

        return heuristic_config(int(key["M"]), int(key["N"]), int(key["K"]),
                                DTYPES[canonical_dtype(key["dtype"])])

    def prepare(self, key, device):
        from tilefuse.kernels.conv_bwd import launch_conv2d_dgrad, launch_conv2d_wgrad
        from tilefuse.kernels.conv_fwd import launch_conv2d_fwd

        dtype = DTYPES[canonical_dtype(key["dtype"])]
        cin, cout, H, W, k, s, pad = _geometry(key)
        gen = torch.Generator(device="cpu").manual_seed(0)
        fmt = torch.channels_last if key.get("layout") == "nhwc" else torch.contiguous_format

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        x = rand(1, cin, H, W).contiguous(memory_format=fmt)
        w = rand(cout, cin, *k) / math.sqrt(cin * k[0] * k[1])
        x64, w64 = x.double(), w.double()
        ref64 = F.conv2d(x64, w64, None, s, pad)
        dz = rand(*ref64.shape).contiguous(memory_format=fmt)
        tf32 = bool(dtype == torch.float32 and key.get("tf32", False))
        geo = dict(stride=(s, s), padding=pad, dilation=(1, 1), groups=1)
        kind = key["kind"]
        if kind == "fwd":
            def run(cfg):
                y = torch.empty(ref64.shape, device=device, dtype=dtype, memory_format=fmt)
                return launch_conv2d_fwd(x, w, y, allow_tf32=tf32, config=cfg, **geo)
        else:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                dz.double(), x64, w64, None, [s, s], list(pad), [1, 1], False, [0, 0], 1,
                [kind == "dgrad", kind == "wgrad", False])
            ref64 = gx if kind == "dgrad" else gw

            def run(cfg):
                if kind == "dgrad":
                    return launch_conv2d_dgrad(dz, w, torch.empty_like(x), allow_tf32=tf32,
                                               config=cfg, **geo)
                return launch_conv2d_wgrad(dz, x, k, allow_tf32=tf32, config=cfg, **geo)

        floor = {torch.float64: 1e-10, torch.float32: 1e-4 if not tf32 else 1e-2,
                 torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
        reduction = {"fwd": cin, "dgrad": cout, "wgrad": dz[0, 0].numel()}[kind]
        scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
        tol = floor * scale * max(1.0, math.sqrt(reduction * k[0] * k[1] / 64))

        def check(out):
            if out.numel() == 0:
                return True
            err = (out.double() - ref64).abs().max().item()
            return err == err and err <= tol  # NaN fails

        macs = dz.numel() * cin * k[0] * k[1]
        return Problem(run=run, check=check, info=dict(flops=2.0 * macs, tol=tol))

    def parse_shape(self, spec):
        """``{"kind": "fwd", "M": .., "N": .., "K": .., "KH": 3, "KW": 3, "stride": 1,
        "dtype": "bf16", "layout": "nhwc"}`` or the string ``"fwd MxNxK k3 s1"``."""
        spec = {"shape": spec} if isinstance(spec, str) else dict(spec)
        if isinstance(spec.get("shape"), str):
            for part in spec.pop("shape").lower().split():
                if part in KINDS:
                    spec["kind"] = part
                elif part.startswith("k") and part[1:].isdigit():
                    spec["KH"] = spec["KW"] = int(part[1:])
                elif part.startswith("s") and part[1:].isdigit():
                    spec["stride"] = int(part[1:])
                elif part in ("nhwc", "channels_last"):
                    spec["layout"] = "nhwc"
                else:
                    dims = part.replace("x", " ").split()
                    if len(dims) != 3:
                        raise ValueError(f"conv2d shape part {part!r}: expected 'MxNxK'")
                    spec.update(zip("MNK", dims))
        try:
            key = dict(kind=spec.get("kind", "fwd"), **{d: int(spec[d]) for d in "MNK"},
                       KH=int(spec.get("KH", 3)), KW=int(spec.get("KW", 3)),
                       stride=int(spec.get("stride", 1)))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"conv2d shape {spec!r}: needs integer M, N and K") from None
        if key["kind"] not in KINDS or min(key[d] for d in "MNK") <= 0:
            raise ValueError(f"conv2d shape {spec!r}: kind in {KINDS}, positive M, N, K")
        key["dtype"] = canonical_dtype(spec.get("dtype") or "float32")
        if spec.get("layout") == "nhwc":
            key["layout"] = "nhwc"
        if spec.get("tf32"):
            key["tf32"] = True
        return key

    def default_shapes(self, device):
        if device == "cpu":
            return [dict(kind="fwd", M=32, N=16, K=8, KH=3, KW=3, stride=1)]
        # ResNet-50 3x3 / 1x1 layers at batch 32, channels_last bf16 is the fast path
        shapes = [("fwd", 32 * 56 * 56, 64, 64, 3, 1), ("fwd", 32 * 28 * 28, 128, 128, 3, 1),
                  ("fwd", 32 * 14 * 14, 256, 256, 3, 1), ("fwd", 32 * 7 * 7, 512, 512, 3, 1),
                  ("fwd", 32 * 56 * 56, 256, 64, 1, 1), ("fwd", 32 * 112 * 112, 64, 3, 7, 2),
                  ("dgrad", 32 * 56 * 56, 64, 64, 3, 1), ("wgrad", 64, 64, 32 * 56 * 56, 3, 1)]
        return [dict(kind=kd, M=m, N=n, K=k, KH=ks, KW=ks, stride=s, layout="nhwc")
                for kd, m, n, k, ks, s in shapes]

    def describe(self, key):
        return (f"{key.get('kind', 'fwd')} {key['M']}x{key['N']}x{key['K']} "
                f"k{key.get('KH', 3)}x{key.get('KW', 3)} s{key.get('stride', 1)} "
                f"{canonical_dtype(key['dtype'])}" + (" nhwc" if key.get("layout") else ""))


register_space(ConvSpace())

"""Tuning space of the fused matmul (:mod:`tilefuse.kernels.matmul`).

Bucket: next power of two of M, N and K (at least 16), dtype and the epilogue flags
``(activation, has_bias, has_residual)`` that ``get_config`` passes, B's layout, TF32, and
``tma`` when the persistent TMA kernel runs the problem (sm_90, aligned operands: set by
``get_config`` and by :meth:`MatmulSpace.parse_shape` on such a device). Config:
``BLOCK_M/N/K, GROUP_M, num_warps, num_stages``, ``SPLIT_K`` (K split over that many programs,
fp32 partials + a fixed-order reduction; small M) and, for ``tma`` keys, ``TMA`` (1: the
persistent kernel, 0: the grouped-order kernel on the same operands).

Pruning (before anything is compiled):

* shape: a block never exceeds the bucket's power of two (tiles are clamped, then de-duplicated);
* shared memory: ``num_stages * (BLOCK_M*BLOCK_K + BLOCK_K*BLOCK_N) * elem_size`` must fit the
  device's opt-in shared memory;
* registers: the accumulator holds at most 128 fp32 (64 fp64) values and at least 4 per thread;
* GROUP_M values >= the number of row blocks behave identically: only one is kept;
* split-K: only for M <= 256, never for fp64, each split keeps >= 2 K tiles;
* TMA: the persistent kernel's TMA-store tile (BLOCK_M x BLOCK_N) counts in shared memory;
* interpreter: num_warps / num_stages have no effect there, they collapse to (4, 1).
"""
from __future__ import annotations

import itertools

import torch

from tilefuse.autotune.space import (GEMM_KEYS, KernelSpace, Limits, Problem, next_pow2,
                                     parse_gemm_shape, register_space, unique_gemm_configs)

SPLITS = (2, 4, 8, 16)  # split-K variants tried for small M
SMALL_M = 256


def unique_split_configs(configs, M: int) -> list:
    """:func:`unique_gemm_configs` within each (SPLIT_K, TMA, WARP_SPEC) class, order kept."""
    seen, out = set(), []
    groups: dict = {}
    for c in configs:
        groups.setdefault((c.get("SPLIT_K", 1), c.get("TMA", 1), c.get("WARP_SPEC", 0)),
                          []).append(c)
    for group in groups.values():
        for c in unique_gemm_configs(group, M):
            ident = tuple(sorted(c.items()))
            if ident not in seen:
                seen.add(ident)
                out.append(c)
    order = {id(c): i for i, c in enumerate(configs)}
    return sorted(out, key=lambda c: order[id(c)])


def split_variants(configs, M: int, K: int) -> list:
    """Each config with SPLIT_K in :data:`SPLITS` (small M only; >= 2 K tiles per split)."""
    if M > SMALL_M:
        return []
    out = []
    for c in configs:
        for s in SPLITS:
            if -(-K // c["BLOCK_K"]) >= 2 * s:
                out.append(dict(c, SPLIT_K=s))
    return out


def ws_variants(configs) -> list:
    """The persistent TMA kernel's warp-specialized variant of ``configs`` (``WARP_SPEC=1``:
    launched with 4 warps that Triton's Hopper pass turns into a producer and two consumer warp
    groups; tools/aot_check.py compiles it without spills under triton 3.6 and 3.9). Only tuning
    can pick it: the heuristic never does (GPU speed unmeasured)."""
    return [dict(c, TMA=1, WARP_SPEC=1, SPLIT_K=1) for c in configs]


def consumer_warps(c) -> int:
    """Warps holding the accumulator: 8 (two consumer warp groups) for a ``WARP_SPEC`` launch."""
    return 8 if c.get("WARP_SPEC") else c["num_warps"]


def tma_device() -> bool:
    """Whether the current CUDA device runs the persistent TMA kernel (sm_90)."""
    import torch

    if not torch.cuda.is_available():
        return False
    from tilefuse.kernels.gemm_common import tma_capable

    return tma_capable(torch.cuda.current_device())

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
                 "float": "float32", "fp64": "float64", "double": "float64"}

# Curated first-try list (Triton tutorial 03 plus small-M tiles): the quick search used when
# tuning on first use; the exhaustive CLI search adds the full product below.
_CURATED = [
    # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages
    (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3),
    (128, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4),
    (64, 256, 32, 8, 4, 4), (128, 32, 32, 8, 4, 4), (64, 64, 64, 8, 4, 3),
    (64, 32, 32, 8, 2, 5), (32, 64, 32, 8, 2, 5), (32, 128, 64, 8, 4, 3),
    (16, 64, 64, 8, 4, 3), (16, 128, 64, 8, 4, 4), (16, 32, 128, 8, 2, 3),
]
_PRODUCT = dict(BLOCK_M=(16, 32, 64, 128, 256), BLOCK_N=(16, 32, 64, 128, 256),
                BLOCK_K=(32, 64, 128), GROUP_M=(1, 8), num_warps=(2, 4, 8),
                num_stages=(2, 3, 4, 5))
_KEYS = GEMM_KEYS


def canonical_dtype(name) -> str:
    if isinstance(name, torch.dtype):
        name = str(name).replace("torch.", "")
    name = str(name).lower().replace("torch.", "")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not tunable for matmul; expected one of "
                         f"{', '.join(sorted(DTYPES))} (or fp16/bf16/fp32/fp64)")
    return name


def _flags(key) -> tuple:
    flags = tuple(key.get("flags") or (0, False, False))
    act = int(flags[0]) if len(flags) > 0 else 0
    bias = bool(flags[1]) if len(flags) > 1 else False
    res = bool(flags[2]) if len(flags) > 2 else False
    return act, bias, res


def _aligned(key, dtype) -> bool:
    """Contiguous operands of this shape meet TMA's 16-byte stride rule."""
    es = torch.empty((), dtype=dtype).element_size()
    b_stride = key["K"] if key.get("layout") == "nt" else key["N"]
    return (key["K"] * es) % 16 == 0 and (b_stride * es) % 16 == 0


def _dims(key) -> tuple:
    return int(key["M"]), int(key["N"]), int(key["K"])


class MatmulSpace(KernelSpace):
    name = "matmul"
    required = _KEYS

    def sources(self):
        from tilefuse.kernels import activations, gemm_common, matmul

        return (matmul.matmul_kernel, gemm_common.tile_offsets, gemm_common.k_tile_range,
                activations)

    def bucket(self, key):
        M, N, K = _dims(key)
        act, bias, res = _flags(key)
        return (f"M={max(16, next_pow2(M))},N={max(16, next_pow2(N))},K={max(16, next_pow2(K))},"
                f"{canonical_dtype(key['dtype'])},act={act},bias={int(bias)},res={int(res)}"
                + (",nt" if key.get("layout") == "nt" else "")
                + (",tf32" if key.get("tf32") else "") + (",tma" if key.get("tma") else ""))

    def default(self, key):
        from tilefuse.kernels.matmul import heuristic_config

        M, N, K = _dims(key)
        act, _, res = _flags(key)
        return heuristic_config(M, N, K, DTYPES[canonical_dtype(key["dtype"])],
                                tma=bool(key.get("tma")), heavy_epilogue=bool(act or res))

    # ------------------------------------------------------------------------ pruning
    def prune(self, configs, key, limits: Limits):
        """Clamp to the shape, drop what cannot fit, de-duplicate equivalent configs."""
        M, N, K = _dims(key)
        dtype = DTYPES[canonical_dtype(key["dtype"])]
        elem = torch.empty((), dtype=dtype).element_size()
        acc_words = 2 if dtype == torch.float64 else 1
        cap_m, cap_n, cap_k = (max(16, next_pow2(d)) for d in (M, N, K))
        kept = []
        for cfg in configs:
            c = dict(cfg)
            c["BLOCK_M"] = min(c["BLOCK_M"], cap_m)
            c["BLOCK_N"] = min(c["BLOCK_N"], cap_n)
            c["BLOCK_K"] = min(c["BLOCK_K"], cap_k)
            c["SPLIT_K"] = int(c.get("SPLIT_K", 1))
            if key.get("tma"):
                c["TMA"] = int(c.get("TMA", 1))
            else:
                c.pop("TMA", None)
            if not (c.get("TMA") and c.get("WARP_SPEC")):
                c.pop("WARP_SPEC", None)
            if c["SPLIT_K"] > 1 and (M > SMALL_M or dtype == torch.float64
                                     or -(-K // c["BLOCK_K"]) < 2 * c["SPLIT_K"]):
                continue
            if limits.interpreter:
                c["num_warps"], c["num_stages"] = 4, 1
            else:
                smem = c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * elem
                if c.get("TMA"):
                    smem += c["BLOCK_M"] * c["BLOCK_N"] * elem  # the TMA-store staging tile
                if smem > limits.shared_mem:
                    continue
                per_thread = (c["BLOCK_M"] * c["BLOCK_N"] * acc_words
                              / (32 * consumer_warps(c)))
                if per_thread > 128 or per_thread < 4:
                    continue
            kept.append(c)
        return unique_split_configs(kept, M)

    def candidates(self, key, limits, exhaustive=False):
        M, _, K = _dims(key)
        base = [dict(zip(_KEYS, t)) for t in _CURATED]
        if exhaustive:
            base += [dict(zip(_KEYS, t)) for t in itertools.product(*_PRODUCT.values())]
        configs = [self.default(key)] + base + split_variants(base[:len(_CURATED)], M, K)
        if key.get("tma"):  # the grouped-order kernel on the same operands, for comparison
            configs += [dict(c, TMA=0) for c in configs[:len(_CURATED) + 1]]
            configs += ws_variants(base[:3])
        return self.prune(configs, key, limits)

    # ------------------------------------------------------------------------ problems
    def prepare(self, key, device):
        from tilefuse.activations import NAMES, torch_activation
        from tilefuse.kernels.matmul import launch_matmul

        M, N, K = _dims(key)
        dtype = DTYPES[canonical_dtype(key["dtype"])]
        act, has_bias, has_res = _flags(key)
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        a = rand(M, K)  # 2-D operands, as linear launches them (the TMA path takes only 2-D)
        # "nt": B read with K contiguous (linear's weight.T), else row-major B
        b = rand(N, K).t() if key.get("layout") == "nt" else rand(K, N)
        bias = rand(N) if has_bias else None
        res = rand(M, N) if has_res else None
        c = torch.empty((M, N), device=device, dtype=dtype)
        tf32 = bool(dtype == torch.float32 and key.get("tf32", False))

        def run(cfg):
            return launch_matmul(a, b, c, bias=bias, residual=res, activation=act,
                                 config=cfg, allow_tf32=tf32)

        def reference(compute):
            z = a.to(compute) @ b.to(compute)
            if bias is not None:
                z = z + bias.to(compute)
            y = torch_activation(z, NAMES.get(act, "none"), 0.0)
            return y + res.to(compute) if res is not None else y

        ref64 = reference(torch.float64)
        eager = reference(dtype).to(dtype)
        eager_err = (eager.double() - ref64).abs().max().item() if ref64.numel() else 0.0
        floor = {torch.float64: 1e-10, torch.float32: 1e-4 if not tf32 else 1e-2,
                 torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
        scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
        tol = 8 * eager_err + floor * scale

        def check(out):
            if out.numel() == 0:
                return True
            err = (out.double() - ref64).abs().max().item()
            return err == err and err <= tol  # NaN fails

        return Problem(run=run, check=check, info=dict(flops=2.0 * M * N * K, tol=tol))

    def parse_shape(self, spec):
        key, spec = parse_gemm_shape("matmul", spec)
        if spec.get("dtype"):
            key["dtype"] = canonical_dtype(spec["dtype"])
        if spec.get("layout") in ("nt", "nn"):
            if spec["layout"] == "nt":
                key["layout"] = "nt"
        elif spec.get("layout") is not None:
            raise ValueError(f"matmul shape {spec!r}: layout must be 'nn' or 'nt'")
        if spec.get("tf32"):
            key["tf32"] = True
        dtype = DTYPES[key.get("dtype", "float32")]
        if spec.get("tma", (tma_device() and (dtype in (torch.float16, torch.bfloat16)
                                               or (dtype == torch.float32 and key.get("tf32")))
                            and _aligned(key, dtype))):
            key["tma"] = True
        act = spec.get("activation", 0)
        if isinstance(act, str):
            from tilefuse.activations import ACTIVATIONS, parse_activation

            act = ACTIVATIONS[parse_activation(act)[0]][0]
        key["flags"] = tuple(spec.get("flags") or (int(act), bool(spec.get("bias", False)),
                                                   bool(spec.get("residual", False))))
        return key

    def default_shapes(self, device):  # noqa: D102
        if device == "cpu":
            return [dict(M=16, N=32, K=16), dict(M=33, N=17, K=29)]
        return [dict(M=m, N=n, K=k) for m, n, k in (
            (1, 4096, 4096), (16, 4096, 4096), (128, 768, 768), (128, 3072, 768),
            (128, 768, 3072), (512, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096),
            (8192, 8192, 8192))]

    def describe(self, key):
        act, bias, res = _flags(key)
        extra = "".join(s for s, on in ((f"+act{act}", act), ("+bias", bias), ("+res", res)) if on)
        return f"{key['M']}x{key['N']}x{key['K']} {canonical_dtype(key['dtype'])}{extra}"


register_space(MatmulSpace())

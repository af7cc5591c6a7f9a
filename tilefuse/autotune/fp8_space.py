"""Tuning space of the fp8 GEMM (:mod:`tilefuse.kernels.fp8_matmul`).

Key (what ``get_config`` passes): ``M, N, K``. Bucket: next power of two of M and N (at least
16) and of K (at least 32). An optional ``dtype`` (the output dtype: ``bfloat16`` by default,
``float16`` or ``float32``) only shapes the problem the tuner builds; e4m3 and e5m2 operands
share one bucket (same bytes, same MMA shape).
Config: ``BLOCK_M/N/K, GROUP_M, num_warps, num_stages``.

Pruning (before anything is compiled):

* shape: blocks never exceed the bucket's power of two (clamped, then de-duplicated);
* MMA: every block >= 16 and ``BLOCK_K >= 32`` (fp8 MMA consumes K in steps of 32);
* shared memory: ``num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K`` bytes (1-byte operands) within
  the device's opt-in limit (227 KiB on Hopper, 99 KiB on Ada);
* registers: 4..128 fp32 accumulator values per thread;
* GROUP_M values >= the number of row blocks collapse; in the interpreter warps/stages collapse
  to (4, 1).
"""
from __future__ import annotations

import itertools

import torch

from tilefuse.autotune.space import (GEMM_KEYS, KernelSpace, Limits, Problem, next_pow2,
                                     parse_gemm_shape, register_space, unique_gemm_configs)

_KEYS = GEMM_KEYS
_OUT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32"}

# BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; best guesses first (Triton's fp8
# tutorial tiles, then Ada-sized ones, then decode shapes)
_CURATED = [
    (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 4, 4), (128, 256, 64, 8, 8, 4), (64, 256, 128, 8, 4, 3),
    (128, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4), (64, 128, 256, 8, 4, 3),
    (64, 64, 128, 8, 4, 4), (32, 64, 256, 8, 4, 3), (16, 64, 256, 8, 4, 4),
    (16, 128, 128, 8, 4, 4), (16, 32, 256, 8, 4, 4), (16, 64, 128, 8, 2, 5),
]
_PRODUCT = dict(BLOCK_M=(16, 32, 64, 128, 256), BLOCK_N=(16, 32, 64, 128, 256),
                BLOCK_K=(32, 64, 128, 256), GROUP_M=(1, 8), num_warps=(2, 4, 8),
                num_stages=(2, 3, 4, 5))


def out_dtype_name(dtype) -> str:
    name = str(dtype or "bfloat16").lower().replace("torch.", "")
    name = _ALIASES.get(name, name)
    if name not in _OUT:
        raise ValueError(f"fp8_matmul dtype {dtype!r}: expected the output dtype bfloat16, "
                         f"float16 or float32")
    return name


def _dims(key) -> tuple:
    return int(key["M"]), int(key["N"]), int(key["K"])


def _caps(key) -> tuple:
    M, N, K = _dims(key)
    return max(16, next_pow2(M)), max(16, next_pow2(N)), max(32, next_pow2(K))


class Fp8MatmulSpace(KernelSpace):
    name = "fp8_matmul"
    required = _KEYS

    def sources(self):
        from tilefuse.kernels import activations, fp8_matmul, gemm_common, matmul

        return (fp8_matmul.fp8_matmul_kernel, fp8_matmul.scaled_epilogue, matmul.grouped_pid,
                gemm_common.tile_offsets, activations)

    def bucket(self, key):
        cm, cn, ck = _caps(key)
        return f"M={cm},N={cn},K={ck}"

    def default(self, key):
        from tilefuse.kernels.fp8_matmul import heuristic_config

        return heuristic_config(*_dims(key))

    def prune(self, configs, key, limits: Limits):
        cap_m, cap_n, cap_k = _caps(key)
        kept = []
        for cfg in configs:
            c = {k: int(cfg[k]) for k in _KEYS}
            c["BLOCK_M"] = min(c["BLOCK_M"], cap_m)
            c["BLOCK_N"] = min(c["BLOCK_N"], cap_n)
            c["BLOCK_K"] = min(c["BLOCK_K"], cap_k)
            if min(c["BLOCK_M"], c["BLOCK_N"]) < 16 or c["BLOCK_K"] < 32:
                continue
            if limits.interpreter:
                c["num_warps"], c["num_stages"] = 4, 1
            else:
                smem = c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"]
                if smem > limits.shared_mem:
                    continue
                per_thread = c["BLOCK_M"] * c["BLOCK_N"] / (32 * c["num_warps"])
                if per_thread > 128 or per_thread < 4:
                    continue
            kept.append(c)
        return unique_gemm_configs(kept, int(key["M"]))

    def candidates(self, key, limits, exhaustive=False):
        configs = [self.default(key)] + [dict(zip(_KEYS, t)) for t in _CURATED]
        if exhaustive:
            configs += [dict(zip(_KEYS, t)) for t in itertools.product(
                *(_PRODUCT[k] for k in _KEYS))]
        return self.prune(configs, key, limits)

    def prepare(self, key, device):
        """Operands as Fp8Linear passes them: A (M, K) e4m3 row-major, B = qweight.t() (K, N
        with K contiguous), per-row A scales, per-column B scales and a bias; checked
        elementwise against fp64 on the same fp8 values within the output rounding plus the
        accumulation error (fp32 in the interpreter; Hopper's reduced-precision partial sums,
        promoted every K block, on a GPU)."""
        from tilefuse.kernels.fp8_matmul import launch_fp8_matmul

        M, N, K = _dims(key)
        out_dtype = _OUT[out_dtype_name(key.get("dtype"))]
        gen = torch.Generator(device="cpu").manual_seed(0)
        e4 = torch.float8_e4m3fn
        a = (torch.randn(M, K, generator=gen) * 8).to(e4).to(device)
        b = (torch.randn(N, K, generator=gen) * 8).to(e4).to(device).t()
        a_scale = (torch.rand(M, generator=gen) + 0.5).div(64).to(device)
        b_scale = (torch.rand(N, generator=gen) + 0.5).div(64).to(device)
        bias = torch.randn(N, generator=gen).to(device)
        c = torch.empty((M, N), device=device, dtype=out_dtype)

        def run(cfg):
            return launch_fp8_matmul(a, b, c, a_scale, b_scale, bias=bias, config=cfg)

        a64, b64 = a.double(), b.double()
        scale = a_scale.double()[:, None] * b_scale.double()[None, :]
        ref = (a64 @ b64) * scale + bias.double()
        bound = (a64.abs() @ b64.abs()) * scale + bias.double().abs()
        out_eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
                   torch.float32: 2.0 ** -22}[out_dtype]
        acc_eps = (K + 4) * 2.0 ** -24 + (2.0 ** -10 if str(device) != "cpu" else 0.0)
        tol = out_eps * ref.abs() + acc_eps * bound + 1e-30

        def check(out):
            return bool(((out.double() - ref).abs() <= tol).all())  # NaN fails

        return Problem(run=run, check=check, info=dict(ops=2.0 * M * N * K))

    def parse_shape(self, spec):
        key, spec = parse_gemm_shape("fp8_matmul", spec, word="dtype")
        key["dtype"] = out_dtype_name(spec.get("dtype"))
        return key

    def default_shapes(self, device):
        if device == "cpu":
            return [dict(M=16, N=32, K=64, dtype="bfloat16"), dict(M=5, N=20, K=40,
                                                                  dtype="float32")]
        if torch.cuda.get_device_capability(device) < (8, 9):
            return []  # no fp8 tensor cores: nothing to tune (fp8_matmul raises there)
        # LLM linears (4096x4096 weight: decode, small batch, prefill; a 4096x11008 MLP) and
        # BERT-base (32 x 128 tokens, 768 <-> 3072)
        shapes = [dict(M=m, N=4096, K=4096) for m in (1, 64, 256, 4096)]
        shapes += [dict(M=4096, N=11008, K=4096), dict(M=4096, N=4096, K=11008),
                   dict(M=4096, N=3072, K=768), dict(M=4096, N=768, K=3072)]
        return [dict(s, dtype="bfloat16") for s in shapes]

    def describe(self, key):
        return f"{key['M']}x{key['N']}x{key['K']} fp8 -> {out_dtype_name(key.get('dtype'))}"


register_space(Fp8MatmulSpace())

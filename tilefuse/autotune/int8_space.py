"""Tuning space of the int8 GEMM (:mod:`tilefuse.kernels.int8_matmul`).

Key (what ``get_config`` passes): ``M, N, K`` and ``mode``: ``w8a8`` (int8 x int8, int32
accumulation), ``w8a16`` (fp16/bf16 activations x int8 weight) or ``w8a32`` (fp32 activations).
Bucket: next power of two of M, N and K (at least 16; K at least 32) and the mode. An optional
``dtype`` only shapes the problem the tuner builds: the activation dtype for weight-only modes,
the output dtype for ``w8a8`` (``int32`` = the raw accumulator, checked exactly).
Config: ``BLOCK_M/N/K, GROUP_M, num_warps, num_stages``, ``SPLIT_K`` (split-K for small M:
int32 partials for ``w8a8``, fp32 otherwise, fixed-order reduction) and, for keys marked ``tma``
(W8A8 on an sm_90 device, which ``get_config`` and :meth:`Int8MatmulSpace.parse_shape` set),
``TMA`` (1: the persistent TMA kernel, 0: the grouped-order kernel on the same operands).

Pruning (before anything is compiled):

* shape: blocks never exceed the bucket's power of two (clamped, then de-duplicated);
* MMA: ``w8a8`` needs ``BLOCK_K >= 32`` (int8 MMA consumes K in steps of 32), every ``tl.dot``
  needs blocks >= 16; ``w8a32`` (an fp32 "ieee" dot, no tensor cores) keeps ``BLOCK_K <= 32``;
* shared memory: ``num_stages * (BLOCK_M*BLOCK_K*a_elem + BLOCK_K*BLOCK_N)`` (int8 B) plus, for
  the weight-only modes, one dequantized B tile ``BLOCK_K*BLOCK_N*a_elem``, within the device's
  opt-in limit;
* registers: 4..128 accumulator values per thread (4..64 for ``w8a32``, which also holds fp32
  operand fragments);
* GROUP_M values >= the number of row blocks collapse; in the interpreter warps/stages collapse
  to (4, 1);
* split-K only for M <= 256 with >= 2 K tiles per split; TMA configs count the TMA-store tile.
"""
from __future__ import annotations

import itertools

import torch

from tilefuse.autotune.matmul_space import (SMALL_M, consumer_warps, split_variants, tma_device,
                                            unique_split_configs, ws_variants)
from tilefuse.autotune.space import (GEMM_KEYS, KernelSpace, Limits, Problem, next_pow2,
                                     parse_gemm_shape, register_space)

MODES = ("w8a8", "w8a16", "w8a32")
_KEYS = GEMM_KEYS
_FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
            "float": "float32", "fp64": "float64", "double": "float64", "int": "int32",
            "i32": "int32"}
_DEFAULT_DTYPE = {"w8a8": "float16", "w8a16": "float16", "w8a32": "float32"}

# BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; best guesses first
_CURATED = {
    "w8a8": [
        (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 8, 3),
        (128, 128, 64, 8, 4, 4), (128, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4),
        (64, 64, 128, 8, 4, 4), (64, 256, 128, 8, 8, 3), (32, 64, 256, 8, 4, 3),
        (32, 128, 128, 8, 4, 4), (16, 32, 256, 8, 4, 4), (16, 64, 256, 8, 4, 3),
        (16, 128, 128, 8, 4, 4), (16, 64, 128, 8, 2, 5), (16, 256, 64, 8, 4, 4),
    ],
    "w8a16": [
        (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3),
        (128, 128, 32, 8, 4, 4), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 3), (64, 256, 32, 8, 4, 4), (32, 64, 128, 8, 4, 3),
        (32, 128, 64, 8, 4, 4), (16, 32, 128, 8, 4, 4), (16, 64, 128, 8, 4, 3),
        (16, 128, 64, 8, 4, 4), (16, 64, 64, 8, 2, 5), (16, 256, 64, 8, 4, 3),
    ],
    "w8a32": [
        (16, 64, 16, 8, 4, 3), (64, 64, 16, 8, 4, 3), (32, 64, 32, 8, 4, 3), (16, 32, 32, 8, 2, 3),
        (64, 32, 16, 8, 4, 3), (32, 32, 32, 8, 4, 2), (16, 128, 16, 8, 4, 3), (128, 64, 16, 8, 8, 3),
        (64, 128, 16, 8, 8, 2), (16, 64, 32, 8, 4, 4),
    ],
}
_PRODUCT_K = {"w8a8": (32, 64, 128, 256), "w8a16": (32, 64, 128), "w8a32": (16, 32)}
_PRODUCT = dict(BLOCK_M=(16, 32, 64, 128, 256), BLOCK_N=(16, 32, 64, 128, 256), GROUP_M=(1, 8),
                num_warps=(2, 4, 8), num_stages=(2, 3, 4, 5))


def _dtype_name(name) -> str:
    if isinstance(name, torch.dtype):
        name = str(name)
    name = str(name).lower().replace("torch.", "")
    return _ALIASES.get(name, name)


def normalize(mode, dtype=None) -> tuple:
    """(mode, dtype) made consistent: weight-only modes follow the activation dtype (fp32 is
    ``w8a32``, fp16/bf16 ``w8a16``); ``w8a8`` takes a float output dtype or ``int32`` (raw)."""
    mode = str(mode or "").lower() or None
    dtype = _dtype_name(dtype) if dtype is not None else None
    if dtype in MODES:  # "1x4096x4096 w8a16" in a shapes file: the dtype slot names the mode
        mode, dtype = dtype, None
    if dtype in ("int8",):
        mode, dtype = mode or "w8a8", None
    if mode is None:
        mode = {"int32": "w8a8", "float32": "w8a32"}.get(dtype, "w8a16")
    if mode in ("w8", "weight-only", "weight_only"):
        mode = "w8a32" if dtype == "float32" else "w8a16"
    if mode not in MODES:
        raise ValueError(f"int8_matmul mode {mode!r}: expected one of {', '.join(MODES)}")
    if dtype is None:
        dtype = _DEFAULT_DTYPE[mode]
    if dtype not in _FLOATS and dtype != "int32":
        raise ValueError(f"int8_matmul dtype {dtype!r}: expected float16, bfloat16, float32 "
                         "(or int32: raw accumulator, w8a8 only)")
    if mode != "w8a8":
        if dtype == "int32":
            raise ValueError("int8_matmul: int32 output (raw accumulator) needs mode w8a8")
        mode = "w8a32" if dtype == "float32" else "w8a16"
    return mode, dtype


def _dims(key) -> tuple:
    return int(key["M"]), int(key["N"]), int(key["K"])


def _caps(key, mode) -> tuple:
    M, N, K = _dims(key)
    return max(16, next_pow2(M)), max(16, next_pow2(N)), max(32 if mode == "w8a8" else 16,
                                                              next_pow2(K))


class Int8MatmulSpace(KernelSpace):
    name = "int8_matmul"
    required = _KEYS

    def sources(self):
        from tilefuse.kernels import activations, gemm_common, int8_matmul, matmul

        return (int8_matmul.int8_matmul_kernel, matmul.grouped_pid, gemm_common.tile_offsets,
                gemm_common.k_tile_range, activations)

    def bucket(self, key):
        mode = normalize(key.get("mode"), key.get("dtype"))[0]
        cm, cn, ck = _caps(key, mode)
        return f"M={cm},N={cn},K={ck},{mode}" + (",tma" if key.get("tma") else "")

    def default(self, key):
        from tilefuse.kernels.int8_matmul import heuristic_config

        mode = normalize(key.get("mode"), key.get("dtype"))[0]
        M, N, K = _dims(key)
        return heuristic_config(M, N, K, mode == "w8a8", mode == "w8a32",
                                tma=bool(key.get("tma")))

    # ------------------------------------------------------------------------ pruning
    def prune(self, configs, key, limits: Limits):
        mode, dtype = normalize(key.get("mode"), key.get("dtype"))
        M = int(key["M"])
        cap_m, cap_n, cap_k = _caps(key, mode)
        a_elem = 1 if mode == "w8a8" else (4 if mode == "w8a32" else 2)
        max_acc = 64 if mode == "w8a32" else 128
        kept = []
        for cfg in configs:
            c = {k: int(cfg[k]) for k in _KEYS}
            c["SPLIT_K"] = int(cfg.get("SPLIT_K", 1))
            if key.get("tma"):
                c["TMA"] = int(cfg.get("TMA", 1))
                if c["TMA"] and cfg.get("WARP_SPEC"):
                    c["WARP_SPEC"] = 1
            c["BLOCK_M"] = min(c["BLOCK_M"], cap_m)
            c["BLOCK_N"] = min(c["BLOCK_N"], cap_n)
            c["BLOCK_K"] = min(c["BLOCK_K"], cap_k)
            if min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) < 16:
                continue
            if mode == "w8a8" and c["BLOCK_K"] < 32:
                continue
            if mode == "w8a32" and c["BLOCK_K"] > 32:
                continue
            if c["SPLIT_K"] > 1 and (M > SMALL_M
                                     or -(-int(key["K"]) // c["BLOCK_K"]) < 2 * c["SPLIT_K"]):
                continue
            if limits.interpreter:
                c["num_warps"], c["num_stages"] = 4, 1
            else:
                smem = c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] * a_elem
                                          + c["BLOCK_K"] * c["BLOCK_N"])
                if mode != "w8a8":
                    smem += c["BLOCK_K"] * c["BLOCK_N"] * a_elem  # the dequantized B tile
                if c.get("TMA"):
                    smem += c["BLOCK_M"] * c["BLOCK_N"] * 4  # TMA-store staging (<= 4 B/elem)
                if smem > limits.shared_mem:
                    continue
                per_thread = c["BLOCK_M"] * c["BLOCK_N"] / (32 * consumer_warps(c))
                if per_thread > max_acc or per_thread < 4:
                    continue
            kept.append(c)
        return unique_split_configs(kept, M)

    def candidates(self, key, limits, exhaustive=False):
        mode = normalize(key.get("mode"), key.get("dtype"))[0]
        curated = [dict(zip(_KEYS, t)) for t in _CURATED[mode]]
        configs = [self.default(key)] + curated + split_variants(curated, int(key["M"]),
                                                                 int(key["K"]))
        if key.get("tma"):  # the grouped-order kernel on the same operands, for comparison
            configs += [dict(c, TMA=0) for c in configs[:len(curated) + 1]]
            configs += ws_variants(curated[:3])
        if exhaustive:
            for bm, bn, bk, g, w, s in itertools.product(
                    _PRODUCT["BLOCK_M"], _PRODUCT["BLOCK_N"], _PRODUCT_K[mode], _PRODUCT["GROUP_M"],
                    _PRODUCT["num_warps"], _PRODUCT["num_stages"]):
                configs.append(dict(zip(_KEYS, (bm, bn, bk, g, w, s))))
        return self.prune(configs, key, limits)

    # ------------------------------------------------------------------------ problems
    def prepare(self, key, device):
        """Operands as the int8 linear passes them: A (M, K) row-major, B = qweight.t() (K, N with
        K contiguous), per-row A scales (w8a8), per-column B scales and a bias. ``int32``: the raw
        accumulator, checked for exact equality; else checked elementwise against fp64 within
        the output rounding plus fp32 accumulation error."""
        from tilefuse.kernels.int8_matmul import launch_int8_matmul

        mode, dtype = normalize(key.get("mode"), key.get("dtype"))
        M, N, K = _dims(key)
        gen = torch.Generator(device="cpu").manual_seed(0)

        def qrand(*shape):
            return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)

        b = qrand(N, K).to(device).t()  # (K, N), K contiguous
        raw = dtype == "int32"
        if mode == "w8a8":
            a = qrand(M, K).to(device)
            a_scale = (torch.rand(M, generator=gen) + 0.5).div(127).to(device)
            out_dtype = torch.int32 if raw else _FLOATS[dtype]
        else:
            a_dtype = _FLOATS[dtype]
            a = torch.randn(M, K, generator=gen).to(device=device, dtype=a_dtype)
            a_scale, out_dtype = None, a_dtype
        b_scale = None if raw else (torch.rand(N, generator=gen) + 0.5).div(127).to(device)
        bias = None if raw else torch.randn(N, generator=gen).to(device)
        c = torch.empty((M, N), device=device, dtype=out_dtype)

        def run(cfg):
            return launch_int8_matmul(a, b, c, a_scale=a_scale, b_scale=b_scale, bias=bias,
                                      config=cfg)

        acc = a.double() @ b.double()  # exact for int8 operands (|sum| < 2^53)
        if raw:
            ref = acc.to(torch.int32)

            def check(out):
                return torch.equal(out, ref)

            return Problem(run=run, check=check, info=dict(ops=2.0 * M * N * K, exact=True))
        bound = a.double().abs() @ b.double().abs()  # magnitude of the terms summed
        scale = b_scale.double()[None, :]
        if a_scale is not None:
            scale = scale * a_scale.double()[:, None]
        ref = acc * scale + bias.double()
        out_eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
                   torch.float32: 2.0 ** -22}[out_dtype]
        # output rounding + fp32 accumulation / epilogue rounding (K terms, 2^-24 each)
        tol = out_eps * ref.abs() + (K + 4) * 2.0 ** -24 * (bound * scale + bias.double().abs())
        tol = tol + 1e-30

        def check(out):
            err = (out.double() - ref).abs()
            return bool((err <= tol).all())  # NaN fails

        return Problem(run=run, check=check, info=dict(ops=2.0 * M * N * K))

    def parse_shape(self, spec):
        # "1x4096x4096 w8a16" or "... int32"
        key, spec = parse_gemm_shape("int8_matmul", spec, word="mode",
                                     word_key=lambda w: "mode" if w in MODES else "dtype")
        key["mode"], key["dtype"] = normalize(spec.get("mode"), spec.get("dtype"))
        if spec.get("tma", key["mode"] == "w8a8" and key["K"] % 16 == 0 and tma_device()):
            key["tma"] = True  # the tuner's operands (A row-major, B = qweight.t()) take TMA
        return key

    def default_shapes(self, device):
        if device == "cpu":
            return [dict(M=16, N=32, K=64, mode="w8a8", dtype="int32"),
                    dict(M=5, N=20, K=40, mode="w8a16", dtype="float16"),
                    dict(M=3, N=16, K=24, mode="w8a32", dtype="float32")]
        # LLM-style linear layers with a 4096x4096 weight: decode (M=1; every M <= 16 shares
        # its bucket), small batch, prefill
        shapes = [dict(M=m, N=4096, K=4096, mode="w8a8", dtype="float16")
                  for m in (1, 64, 256, 4096)]
        shapes += [dict(M=m, N=4096, K=4096, mode="w8a16", dtype="float16")
                   for m in (1, 64, 256, 4096)]
        shapes += [dict(M=m, N=4096, K=4096, mode="w8a32", dtype="float32") for m in (1, 256)]
        return shapes

    def describe(self, key):
        mode, dtype = normalize(key.get("mode"), key.get("dtype"))
        return f"{key['M']}x{key['N']}x{key['K']} {mode} {dtype}"


register_space(Int8MatmulSpace())

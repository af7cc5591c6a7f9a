"""Tuning space of the LayerNorm / RMSNorm forward row kernel (:mod:`tilefuse.kernels.norm`).

Key (what ``get_fwd_config`` passes): ``M`` rows, ``N`` width, ``dtype`` and ``rms``. Bucket:
next power of two of M and N, dtype, ``ln``/``rms``. Config: ``BLOCK_N`` (a whole row when
``BLOCK_N >= N``, kept in registers; else the chunk the looping path walks the row with),
``BLOCK_M`` (whole rows per program, one-block path only; the launcher uses 1 on the looping
path) and ``num_warps``. A config tuned at one N is valid for every N of its bucket: the launcher
derives the path from ``BLOCK_N >= N``.

Pruning (before anything is compiled):

* shape: ``BLOCK_N <= min(next_pow2(N), MAX_BLOCK)``, ``BLOCK_M <= next_pow2(M)``; a one-block
  tile ``BLOCK_M * BLOCK_N`` holds at most 16384 elements; the looping path keeps
  ``BLOCK_N >= 256`` (or the row's power of two, if smaller);
* registers: 1..64 fp32 tile values per thread (``BLOCK_M * BLOCK_N / (32 * num_warps)``);
* interpreter: num_warps has no effect there, it collapses to 4.

There is no shared-memory pruning: the kernel's only shared memory is the row-reduction scratch.
"""
from __future__ import annotations

import itertools

import torch

from tilefuse.autotune.space import KernelSpace, Limits, Problem, next_pow2, register_space

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
            "float": "float32", "fp64": "float64", "double": "float64"}
_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps")
MAX_TILE = 16384  # packed rows: elements of a BLOCK_M x BLOCK_N tile (one row may be wider)
_WARPS = (1, 2, 4, 8, 16, 32)


def canonical_dtype(name) -> str:
    name = str(name).lower().replace("torch.", "")
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not tunable for layer_norm; expected one of "
                         f"{', '.join(sorted(DTYPES))} (or fp16/bf16/fp32)")
    return name


def _pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def _max_block() -> int:
    from tilefuse.kernels import norm

    return next_pow2(norm.MAX_BLOCK)


class LayerNormSpace(KernelSpace):
    name = "layer_norm"
    required = _KEYS

    def sources(self):
        from tilefuse.kernels import activations, norm

        # the launcher is hashed too: it decides how BLOCK_M / BLOCK_N are interpreted
        return (norm.norm_fwd_kernel, norm._load_h, norm.launch_norm_fwd, activations)

    def bucket(self, key):
        return (f"M={next_pow2(int(key['M']))},N={next_pow2(int(key['N']))},"
                f"{canonical_dtype(key['dtype'])},{'rms' if key.get('rms') else 'ln'}")

    def default(self, key):
        from tilefuse.kernels.norm import heuristic_fwd_config

        return heuristic_fwd_config(int(key["M"]), int(key["N"]))

    def validate(self, config):
        if not super().validate(config):
            return False
        return (all(_pow2(config[k]) for k in _KEYS) and config["num_warps"] <= 32
                and config["BLOCK_M"] * config["BLOCK_N"] <= 4 * MAX_TILE)

    # ------------------------------------------------------------------------ pruning
    def prune(self, configs, key, limits: Limits):
        M, N = int(key["M"]), int(key["N"])
        cap_n = min(next_pow2(N), _max_block())
        cap_m = next_pow2(M)
        seen, out = set(), []
        for cfg in configs:
            c = {k: int(cfg[k]) for k in _KEYS}
            c["BLOCK_N"] = min(c["BLOCK_N"], cap_n)
            one = c["BLOCK_N"] >= N
            c["BLOCK_M"] = min(c["BLOCK_M"], cap_m) if one else 1
            if not all(_pow2(c[k]) for k in _KEYS):
                continue
            if one and c["BLOCK_M"] > 1 and c["BLOCK_M"] * c["BLOCK_N"] > MAX_TILE:
                continue
            if not one and c["BLOCK_N"] < min(256, cap_n):
                continue
            if limits.interpreter:
                c["num_warps"] = 4
            else:
                per_thread = c["BLOCK_M"] * c["BLOCK_N"] / (32 * c["num_warps"])
                if per_thread > 64 or per_thread < 1:
                    continue
            ident = tuple(c[k] for k in _KEYS)
            if ident not in seen:
                seen.add(ident)
                out.append(c)
        return out

    def candidates(self, key, limits, exhaustive=False):
        N = int(key["N"])
        cap_n = min(next_pow2(N), _max_block())
        configs = [self.default(key)]
        # whole-row tiles of 1..16384 elements, 16/8/4 values per thread (best guesses first)
        tiles = [t for t in (4096, 8192, 2048, 16384, 1024) if t >= cap_n] or [cap_n]
        for tile in tiles:
            for per_thread in ((8, 16, 4) if tile <= MAX_TILE else (32, 64)):
                warps = max(1, min(32, tile // (32 * per_thread)))
                configs.append(dict(BLOCK_M=max(1, tile // cap_n), BLOCK_N=cap_n, num_warps=warps))
        # the looping path with half / quarter rows
        for div, warps in ((2, 4), (2, 8), (4, 4)):
            configs.append(dict(BLOCK_M=1, BLOCK_N=max(16, cap_n // div), num_warps=warps))
        if exhaustive:
            blocks_n = [cap_n >> i for i in range(6) if cap_n >> i >= 16]
            blocks_m = [1 << i for i in range(15) if 1 << i <= MAX_TILE]
            configs += [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w)
                        for bn, bm, w in itertools.product(blocks_n, blocks_m, _WARPS)]
        return self.prune(configs, key, limits)

    # ------------------------------------------------------------------------ problems
    def prepare(self, key, device):
        """x (M, N) with a non-zero row mean, weight (and bias for LayerNorm), no residual or
        activation (they add elementwise work only); y checked elementwise against fp64 within
        the output dtype's rounding, rstd (and mean) within fp32 statistics error."""
        from tilefuse.kernels.norm import launch_norm_fwd

        M, N = int(key["M"]), int(key["N"])
        dtype = DTYPES[canonical_dtype(key.get("dtype", "float32"))]
        rms = bool(key.get("rms"))
        eps = 1e-5
        gen = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape, shift=0.0):
            return (torch.randn(*shape, generator=gen) + shift).to(device=device, dtype=dtype)

        x = rand(M, N, shift=3.0)
        weight = rand(N)
        bias = None if rms else rand(N)
        y = torch.empty((M, N), device=device, dtype=dtype)
        mean = None if rms else torch.empty(M, device=device, dtype=torch.float32)
        rstd = torch.empty(M, device=device, dtype=torch.float32)

        def run(cfg):
            launch_norm_fwd(x, None, weight, bias, y, mean, rstd, eps, rms, 0, 0.0, config=cfg)
            return y, mean, rstd

        h = x.double()
        mu = torch.zeros(M, 1, dtype=torch.float64, device=device) if rms else h.mean(1, True)
        r = 1.0 / torch.sqrt((h - mu).pow(2).mean(1, True) + eps)
        ref = (h - mu) * r * weight.double()
        if bias is not None:
            ref = ref + bias.double()
        out_eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
                   torch.float32: 2.0 ** -21}[dtype]
        # output rounding + fp32 statistics (N-term sums) carried through the normalisation
        stat = 4 * (N + 8) * 2.0 ** -24
        tol = out_eps * ref.abs() + stat * (((h - mu) * r).abs() * weight.double().abs() + 1)
        r1, mu1, h_mag = r[:, 0], mu[:, 0], h.abs().mean(1)
        del h, r, mu  # keep only what check() needs (large problems on the GPU)

        def check(out):
            yo, mo, ro = out
            if M == 0:
                return True
            if not bool(((yo.double() - ref).abs() <= tol).all()):
                return False
            if not bool(((ro.double() - r1).abs() <= stat * r1).all()):
                return False
            return mo is None or bool(((mo.double() - mu1).abs()
                                       <= stat * (h_mag + 1)).all())

        return Problem(run=run, check=check, info=dict(bytes=2.0 * M * N * x.element_size()))

    def parse_shape(self, spec):
        spec = {"shape": spec} if isinstance(spec, str) else dict(spec)
        if isinstance(spec.get("shape"), str):
            parts = spec["shape"].lower().replace("x", " ").replace(",", " ").split()
            if len(parts) != 2:
                raise ValueError(f"layer_norm shape {spec['shape']!r}: expected 'ROWSxWIDTH'")
            spec.update(zip("MN", parts))
        try:
            key = {d: int(spec[d]) for d in "MN"}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"layer_norm shape {spec!r}: needs integer M (rows) and N "
                             "(width)") from None
        if min(key.values()) <= 0:
            raise ValueError(f"layer_norm shape {spec!r}: M and N must be positive")
        if spec.get("dtype"):
            key["dtype"] = canonical_dtype(spec["dtype"])
        norm = str(spec.get("norm", "")).lower()
        if norm not in ("", "ln", "layer", "layer_norm", "layernorm", "rms", "rms_norm",
                        "rmsnorm"):
            raise ValueError(f"layer_norm shape {spec!r}: norm must be 'layer' or 'rms'")
        key["rms"] = bool(spec.get("rms", False)) or norm.startswith("rms")
        return key

    def default_shapes(self, device):
        if device == "cpu":
            return [dict(M=8, N=48, rms=False), dict(M=5, N=100, rms=True)]
        # transformer activations (tokens x hidden): BERT-base .. 8k-wide LLMs
        shapes = [dict(M=m, N=n, rms=False) for m in (4096, 16384) for n in (768, 1024, 4096, 8192)]
        shapes += [dict(M=m, N=n, rms=True) for m in (4096, 16384) for n in (4096, 8192)]
        return shapes

    def describe(self, key):
        return (f"{key['M']}x{key['N']} {canonical_dtype(key.get('dtype', 'float32'))} "
                f"{'rms' if key.get('rms') else 'ln'}")


register_space(LayerNormSpace())

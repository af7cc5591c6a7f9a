"""What a kernel family declares to be tunable: :class:`KernelSpace` and the registry.

A family registers one space object (usually at the bottom of its ``tilefuse/kernels/<family>.py``
or in ``tilefuse/autotune/<family>_space.py``)::

    from tilefuse.autotune import KernelSpace, register_space

    class LayerNormSpace(KernelSpace):
        name = "layer_norm"
        def sources(self):            return (layer_norm_fwd_kernel,)
        def bucket(self, key):        return f"N={next_pow2(key['N'])},dtype={key['dtype']}"
        def default(self, key):       return heuristic(key)
        def candidates(self, key, limits, exhaustive=False): return [...pruned configs...]
        def prepare(self, key, device): return Problem(run=..., check=...)

    register_space(LayerNormSpace())

and its launcher asks ``tilefuse.autotune.lookup("layer_norm", key, default)`` for a config.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from tilefuse.kernels import next_pow2  # noqa: F401  (re-exported to the spaces)


GEMM_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def unique_gemm_configs(configs: List[dict], M: int) -> List[dict]:
    """Drop GEMM configs equivalent to an earlier one (order kept): every GROUP_M >= the number
    of row blocks gives the same program order."""
    seen, out = set(), []
    for c in configs:
        row_blocks = -(-M // c["BLOCK_M"])
        ident = tuple(c[k] for k in GEMM_KEYS if k != "GROUP_M") + (min(c["GROUP_M"], row_blocks),)
        if ident not in seen:
            seen.add(ident)
            out.append(c)
    return out


def parse_gemm_shape(op: str, spec, word: Optional[str] = None,
                     word_key: Optional[Callable[[str], str]] = None) -> tuple:
    """``(key, spec)`` of a GEMM tuning shape: ``spec`` is a dict with ``M``, ``N``, ``K`` (and
    more) or a string ``"MxNxK"`` (kept under ``spec["shape"]``); ``key`` holds the positive ints
    ``M``, ``N``, ``K``. With ``word`` (what it is called in the usage message, e.g. ``"dtype"``)
    the string may end in one word, stored in ``spec`` under ``word_key(word)`` (default: under
    ``word``). Bad shapes raise a ValueError naming ``op``."""
    spec = {"shape": spec} if isinstance(spec, str) else dict(spec)
    if isinstance(spec.get("shape"), str):
        text = spec["shape"].lower()
        dims, *extra = (text.split() or [""]) if word else (text,)
        parts = dims.replace("x", " ").replace(",", " ").split()
        if len(parts) != 3 or len(extra) > 1:
            usage = f"MxNxK [{word}]" if word else "MxNxK"
            raise ValueError(f"{op} shape {spec['shape']!r}: expected {usage!r}")
        spec.update(zip("MNK", parts))
        if extra:
            spec[word_key(extra[0]) if word_key else word] = extra[0]
    try:
        key = {d: int(spec[d]) for d in "MNK"}
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{op} shape {spec!r}: needs integer M, N and K") from None
    if min(key.values()) <= 0:
        raise ValueError(f"{op} shape {spec!r}: M, N and K must be positive")
    return key, spec


@dataclass(frozen=True)
class Limits:
    """Hardware limits used to prune configs before they are compiled."""
    shared_mem: int = 232448      # bytes of shared memory per block (opt-in maximum)
    interpreter: bool = False     # num_warps / num_stages mean nothing in the interpreter
    capability: str = "-"


def device_limits(identity) -> Limits:
    """Limits of the device behind ``identity`` (a :class:`DeviceIdentity`)."""
    if not identity.is_cuda:
        return Limits(interpreter=True)
    shared = None
    try:
        from triton.runtime import driver

        props = driver.active.utils.get_device_properties(identity.index)
        shared = int(props["max_shared_mem"])
    except Exception:
        try:
            import torch

            props = torch.cuda.get_device_properties(identity.index)
            shared = int(getattr(props, "shared_memory_per_block_optin", 0)) or None
        except Exception:
            shared = None
    return Limits(shared_mem=shared or 101376, interpreter=False, capability=identity.capability)


@dataclass
class Problem:
    """One concrete problem, inputs allocated: ``run(config)`` launches the kernel once and returns
    its output; ``check(output)`` says whether that output is correct (configs that fail it are
    rejected, never stored)."""
    run: Callable[[dict], Any]
    check: Callable[[Any], bool] = lambda out: True
    info: Dict[str, Any] = field(default_factory=dict)


class KernelSpace:
    """Base class of a tunable kernel family. Subclasses override the methods below."""

    name: str = ""
    #: config keys every stored config must have, with int values (checked on load)
    required: tuple = ()
    #: no longer read: tuning on first use is opt-in for every family (TILEFUSE_AUTOTUNE=1 or
    #: ``tilefuse.autotune.tune_on_first_use(True)``); kept so spaces that set it still work
    tune_on_first_use: bool = False

    def sources(self) -> tuple:
        """Kernels / helpers / modules whose source text defines the kernel (hashed into the key)."""
        raise NotImplementedError

    def bucket(self, key: dict) -> str:
        """Stable string naming the group of problems that share one tuned config."""
        raise NotImplementedError

    def default(self, key: dict) -> dict:
        """The heuristic config (what runs when nothing is tuned)."""
        raise NotImplementedError

    def candidates(self, key: dict, limits: Limits, exhaustive: bool = False) -> List[dict]:
        """Pruned configs to try for ``key``, best guesses first."""
        raise NotImplementedError

    def prepare(self, key: dict, device: str) -> Problem:
        raise NotImplementedError

    # -- optional -------------------------------------------------------------------------
    def parse_shape(self, spec) -> dict:
        """A key from a user spec (dict from a shapes file); override for friendlier formats."""
        if not isinstance(spec, dict):
            raise ValueError(f"{self.name}: cannot parse shape {spec!r}")
        return dict(spec)

    def default_shapes(self, device: str) -> List[dict]:
        """Shapes ``tilefuse autotune`` tunes when none are given."""
        return []

    def describe(self, key: dict) -> str:
        return ",".join(f"{k}={v}" for k, v in key.items() if k != "kernel")

    def validate(self, config) -> bool:
        """Whether a stored config is usable (guards against hand-edited or foreign entries)."""
        if not isinstance(config, dict):
            return False
        for k in self.required:
            v = config.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                return False
        return True


_REGISTRY: Dict[str, KernelSpace] = {}
# built-in spaces, imported on first use so ``import tilefuse`` stays cheap
_BUILTIN = {"matmul": "tilefuse.autotune.matmul_space",
            "conv2d": "tilefuse.autotune.conv_space",
            "int8_matmul": "tilefuse.autotune.int8_space",
            "fp8_matmul": "tilefuse.autotune.fp8_space",
            "layer_norm": "tilefuse.autotune.norm_space"}


def register_space(space: KernelSpace) -> KernelSpace:
    """Register (or replace) the space of ``space.name``; returns it (usable as a decorator on
    an instance-returning factory)."""
    if not space.name:
        raise ValueError("a KernelSpace needs a non-empty name")
    _REGISTRY[space.name] = space
    return space


def get_space(name: str) -> Optional[KernelSpace]:
    """The registered space for ``name``, importing its module on first use; None if none."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for module in (_BUILTIN.get(name), f"tilefuse.kernels.{name}"):
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        if name in _REGISTRY:
            return _REGISTRY[name]
    return None


def registered_spaces() -> List[str]:
    for name in _BUILTIN:
        get_space(name)
    return sorted(_REGISTRY)


def geomean(values) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")

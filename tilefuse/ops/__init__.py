"""Functional fused ops. Each name dispatches CUDA -> Triton, CPU+interpreter -> Triton,
CPU -> torch (see :mod:`tilefuse._backend`).

The names are the entries of :data:`tilefuse.registry.OPS` (one declaration per op: where it is
defined, its kernel family, autocast policy, compile-check scenarios, benchmarks and fuzzer);
this module imports each from its ``module``."""
from importlib import import_module as _import

from tilefuse.registry import OPS as _OPS

__all__ = [_spec.name for _spec in _OPS]
for _spec in _OPS:
    globals()[_spec.name] = getattr(_import(_spec.module), _spec.name)
del _spec


def __dir__():
    return sorted(__all__)

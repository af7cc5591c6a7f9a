"""Per-GPU autotuning with a persistent tuning database (docs/autotune.md).

``lookup(kernel, key, default)`` is the one entry point launchers use; ``tilefuse autotune`` (see
:mod:`tilefuse.autotune.cli`) fills the database ahead of time. Lookups never tune unless
opted in (``TILEFUSE_AUTOTUNE=1`` or ``tune_on_first_use(True)``). Other kernel families make
themselves tunable by registering a :class:`KernelSpace` with :func:`register_space`.
"""
from __future__ import annotations

from tilefuse.autotune.chain import (  # noqa: F401
    autotune_enabled, cache_dir, cache_path, db_key, lookup, reset, shipped_table, stored_entry,
    table_path, tune_and_store, tune_on_first_use, user_db,
)
from tilefuse.autotune.db import TuningDB  # noqa: F401
from tilefuse.autotune.identity import DeviceIdentity, current_identity, source_hash  # noqa: F401
from tilefuse.autotune.space import (  # noqa: F401
    KernelSpace, Limits, Problem, get_space, next_pow2, register_space, registered_spaces,
)

__all__ = ["lookup", "cache_path", "cache_dir", "reset", "register_space", "get_space",
           "registered_spaces", "KernelSpace", "Limits", "Problem", "TuningDB", "current_identity",
           "tune", "record_shapes", "tune_on_first_use"]


def tune(kernel: str, key: dict, *, timer=None, budget_s=None, exhaustive=False,
         max_configs=None, store=True, device=None):
    """Tune ``kernel`` on problem ``key`` now; returns the DB entry (None if nothing worked).

    >>> tune("matmul", dict(M=128, N=256, K=64, dtype="float16"))  # doctest: +SKIP
    """
    from tilefuse.autotune.tuner import tune as _tune

    space = get_space(kernel)
    if space is None:
        raise ValueError(f"no tuning space registered for kernel {kernel!r}; known: "
                         f"{', '.join(registered_spaces())}")
    key = space.parse_shape(key)
    key.setdefault("dtype", "float32")
    identity = current_identity(device)
    if store:
        return tune_and_store(space, key, identity, timer=timer, budget_s=budget_s,
                              exhaustive=exhaustive, max_configs=max_configs)
    return _tune(space, key, identity=identity, timer=timer, budget_s=budget_s,
                 exhaustive=exhaustive, max_configs=max_configs)


def record_shapes(model, *inputs, **kwargs):
    """Run one forward of ``model`` and return the matmul problems its Linear layers use."""
    from tilefuse.autotune.shapes import record_shapes as _record

    return _record(model, *inputs, **kwargs)

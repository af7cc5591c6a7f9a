"""The lookup chain every launcher goes through.

    in-memory cache -> user DB ($TILEFUSE_CACHE_DIR or ~/.cache/tilefuse/<gpu>.json)
      -> table shipped in the package (tilefuse/autotune/tables/<gpu>.json)
      -> tune now (opt-in only: TILEFUSE_AUTOTUNE=1 or tune_on_first_use(True))
      -> the caller's heuristic default

By default the request path never blocks on tuning: a new shape gets its stored entry or the
heuristic; ``tilefuse autotune`` is how a GPU gets tuned. The in-memory caches are dropped
whenever this process writes or clears a DB file. Nothing here raises into the user's model: any
failure warns once and returns the default.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from tilefuse.autotune.db import TuningDB, on_write, warn_once
from tilefuse.autotune.identity import DeviceIdentity, current_identity, source_hash
from tilefuse._backend import interpreter_enabled
from tilefuse.autotune.space import KernelSpace, get_space

_INTERPRET = interpreter_enabled()

TABLES_DIR = Path(__file__).resolve().parent / "tables"
DEFAULT_TUNE_BUDGET_S = 20.0
#: timer used when tuning on first use (None: do_bench on CUDA, wall clock in the interpreter);
#: tests and embedders may replace it with any ``timer(fn, config) -> ms``
on_demand_timer = None

_memory: dict = {}            # (kernel, identity, bucket) -> config (None: nothing stored)
_fast: dict = {}              # (kernel, device index, key items) -> config or None: hot path
_MISS = object()
_dbs: dict = {}               # path -> TuningDB
_hashes: dict = {}            # kernel name -> source hash
_tune_lock = threading.RLock()
_tuning = threading.local()
_UNSET = object()
_first_use: bool | None = None  # tune_on_first_use() override; None: TILEFUSE_AUTOTUNE decides


def _drop_caches() -> None:
    """Forget resolved configs (not open DBs or hashes): the next lookup per key re-walks, and
    the launchers' per-signature launch parameters built from them are rebuilt."""
    from tilefuse.kernels import clear_launch_caches

    _memory.clear()
    _fast.clear()
    clear_launch_caches()


on_write(_drop_caches)  # any DB write or clear in this process invalidates the lookup caches


def cache_dir() -> Path:
    env = os.environ.get("TILEFUSE_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/tilefuse").expanduser()


def cache_path(identity: DeviceIdentity | None = None) -> Path:
    """The user DB file for ``identity`` (default: the current device)."""
    identity = identity or current_identity()
    return cache_dir() / f"{identity.slug}.json"


def table_path(identity: DeviceIdentity | None = None) -> Path:
    identity = identity or current_identity()
    return TABLES_DIR / f"{identity.slug}.json"


def _db(path: Path, identity: DeviceIdentity, read_only: bool) -> TuningDB:
    key = (str(path), read_only)
    db = _dbs.get(key)
    if db is None:
        db = _dbs[key] = TuningDB(path, read_only=read_only, device=identity.as_dict())
    return db


def user_db(identity: DeviceIdentity | None = None) -> TuningDB:
    identity = identity or current_identity()
    return _db(cache_path(identity), identity, read_only=False)


def shipped_table(identity: DeviceIdentity | None = None) -> TuningDB:
    identity = identity or current_identity()
    return _db(table_path(identity), identity, read_only=True)


def kernel_hash(space: KernelSpace) -> str:
    h = _hashes.get(space.name)
    if h is None:
        h = _hashes[space.name] = source_hash(*space.sources())
    return h


def db_key(space: KernelSpace, identity: DeviceIdentity, bucket: str) -> str:
    """kernel | source hash | GPU name | compute capability | triton version | shape bucket."""
    return "|".join((space.name, f"src={kernel_hash(space)}", identity.name,
                     f"sm={identity.capability}", f"triton={identity.triton}", bucket))


def tune_on_first_use(enabled=_UNSET):
    """Opt in (``True``) or out (``False``) of tuning a missing bucket inside the first call that
    needs it, for this process; ``None`` hands the decision back to ``TILEFUSE_AUTOTUNE``.
    Returns the previous override (``None``: none was set); no argument only reads it.

    Off by default: a first call with a new shape uses the stored entry or the heuristic and
    never blocks on tuning (up to ``TILEFUSE_AUTOTUNE_BUDGET_S`` per bucket when on)."""
    global _first_use
    previous = _first_use
    if enabled is not _UNSET:
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"tune_on_first_use: enabled must be True, False or None, "
                            f"got {enabled!r}")
        _first_use = enabled
        _drop_caches()  # buckets resolved to "nothing stored" may now be tuned
    return previous


def autotune_enabled(identity: DeviceIdentity, space: KernelSpace | None = None) -> bool:
    """Tune a missing bucket now? Only when opted in, by :func:`tune_on_first_use` (wins) or by
    ``TILEFUSE_AUTOTUNE=1`` (every family; never on plain CPU). Unset, ``0`` or anything else:
    never (stored entries are still used)."""
    if _first_use is not None:
        enabled = _first_use
    else:
        value = os.environ.get("TILEFUSE_AUTOTUNE", "").strip().lower()
        enabled = value in ("1", "true", "yes", "on")
    return enabled and identity.name != "cpu"


def _capturing() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    except Exception:
        return False


def stored_entry(space: KernelSpace, identity: DeviceIdentity, bucket: str):
    """(entry, source) from the user DB, else the shipped table, else (None, None)."""
    full = db_key(space, identity, bucket)
    for source, db in (("user", user_db(identity)), ("shipped", shipped_table(identity))):
        entry = db.get(full)
        if entry is not None and space.validate(entry.get("config")):
            return entry, source
    return None, None


def tune_and_store(space: KernelSpace, key: dict, identity: DeviceIdentity, **kw):
    """Tune ``key`` now, write the winner to the user DB and the memory cache; the entry or None."""
    from tilefuse.autotune.tuner import tune

    with _tune_lock:
        _tuning.active = True
        try:
            entry = tune(space, key, identity=identity, **kw)
        finally:
            _tuning.active = False
    if entry is not None:
        bucket = space.bucket(key)
        user_db(identity).update({db_key(space, identity, bucket): entry})  # drops the caches
        _fast.clear()
        _memory[(space.name, identity, bucket)] = dict(entry["config"])  # kept if unwritable
    return entry


def _lookup(kernel: str, key: dict):
    """The stored/tuned config for ``key`` or None (meaning: use the caller's default)."""
    space = get_space(kernel)
    if space is None:
        return None
    identity = current_identity(key.get("device"))
    bucket = space.bucket(key)
    mkey = (kernel, identity, bucket)
    if mkey in _memory:
        return _memory[mkey]
    entry, _ = stored_entry(space, identity, bucket)
    if entry is None and autotune_enabled(identity, space) and not _capturing() \
            and not getattr(_tuning, "active", False):
        budget = float(os.environ.get("TILEFUSE_AUTOTUNE_BUDGET_S", DEFAULT_TUNE_BUDGET_S))
        warn_once(f"tuning:{kernel}", f"tilefuse: autotuning {kernel} for new shapes on "
                  f"{identity.name} inside the first call (opted in by TILEFUSE_AUTOTUNE=1 or "
                  f"tune_on_first_use(True); results saved to {cache_path(identity)})")
        entry = tune_and_store(space, key, identity, budget_s=budget, timer=on_demand_timer)
    _memory[mkey] = dict(entry["config"]) if entry is not None else None
    return _memory[mkey]


def _device_token(key: dict):
    if "device" in key or _INTERPRET:
        return key.get("device")
    import torch

    return torch.cuda.current_device() if torch.cuda.is_initialized() else None


def lookup(kernel: str, key: dict, default: dict) -> dict:
    """Return the tuned config for ``kernel`` at ``key`` or ``default`` when none is known.

    Hot path (every launch): one dict probe on ``(kernel, device, key items)``; the chain runs
    once per key, and again only after this process writes or clears a DB file.
    """
    try:
        fkey = (kernel, _device_token(key), tuple(key.items()))
        cfg = _fast.get(fkey, _MISS)
    except TypeError:  # unhashable key values: skip the fast path
        fkey, cfg = None, _MISS
    if cfg is _MISS:
        try:
            cfg = _lookup(kernel, key)
        except Exception as e:  # never break the user's model over tuning
            warn_once(f"lookup:{kernel}:{type(e).__name__}", f"tilefuse autotune: lookup for "
                      f"{kernel} failed ({type(e).__name__}: {e}); using the heuristic config")
            return default
        if fkey is not None:
            _fast[fkey] = cfg
    return dict(cfg) if cfg is not None else default


def reset() -> None:
    """Forget everything cached in this process (memory cache, open DBs, source hashes)."""
    _drop_caches()
    _dbs.clear()
    _hashes.clear()

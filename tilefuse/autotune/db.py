"""The tuning database: one JSON file per GPU, safe under concurrent writers.

File layout (``FORMAT`` is bumped on incompatible changes; other versions are ignored)::

    {"format": 1, "kind": "tilefuse-autotune", "device": {...},
     "entries": {"<full key>": {"config": {...}, "time_ms": ..., "runner_up": [...], ...}}}

* Readers never lock: writers replace the file atomically (temp file in the same directory +
  ``os.replace``), so a reader sees the old or the new file, never half of one.
* Writers take a ``filelock`` on ``<file>.lock``, re-read the file and merge their entries into it
  (merge-on-write), so two processes tuning different shapes both keep their results; for the same
  key the faster measured time wins.
* A corrupt, truncated or foreign-version file is ignored with one warning and rebuilt on the next
  write. No failure here ever propagates to the user's model: I/O errors become warnings.

This module only depends on the standard library and ``filelock`` (optional).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings

FORMAT = 1
KIND = "tilefuse-autotune"
LOCK_TIMEOUT_S = 60.0

_warned: set = set()
_warn_lock = threading.Lock()
#: callables run after any TuningDB file of this process is written or removed (the lookup
#: chain registers one that drops its in-memory caches)
_on_write: list = []


def on_write(callback) -> None:
    """Run ``callback()`` after every successful write or clear of a DB file in this process."""
    if callback not in _on_write:
        _on_write.append(callback)


def _written() -> None:
    for cb in list(_on_write):
        cb()


def warn_once(tag: str, message: str) -> None:
    with _warn_lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _file_lock(path: str):
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover - filelock is a dependency; merge-on-write still helps
        import contextlib

        return contextlib.nullcontext()
    return FileLock(path + ".lock", timeout=LOCK_TIMEOUT_S)


class TuningDB:
    """Entries of one DB file. ``read_only`` DBs (tables shipped in the package) never write."""

    def __init__(self, path, read_only: bool = False, device: dict | None = None):
        self.path = os.fspath(path)
        self.read_only = read_only
        self.device = device or {}
        self._entries: dict | None = None
        self._mtime = None
        #: why the last ``update`` failed ("OSError: ..."), None after a successful one
        self.last_error: str | None = None

    # ---------------------------------------------------------------- reading
    def _read_file(self) -> dict:
        """Entries on disk; {} (with one warning) for a missing, corrupt or foreign file."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as e:
            warn_once(f"read:{self.path}", f"tilefuse autotune: cannot read {self.path} ({e}); "
                      "ignoring it")
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError is a ValueError
            if not isinstance(data, dict) or data.get("kind") != KIND:
                raise ValueError("not a tilefuse autotune database")
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            entries = data.get("entries")
            if not isinstance(entries, dict):
                raise ValueError("no 'entries' object")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            warn_once(f"corrupt:{self.path}", f"tilefuse autotune: ignoring unusable database "
                      f"{self.path} ({e}); it will be rebuilt on the next write")
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, dict)}

    def entries(self) -> dict:
        """All entries, re-read when the file changed since the last read."""
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            mtime = None
        if self._entries is None or mtime != self._mtime:
            self._entries = self._read_file()
            self._mtime = mtime
        return self._entries

    def get(self, key: str) -> dict | None:
        return self.entries().get(key)

    def __len__(self) -> int:
        return len(self.entries())

    # ---------------------------------------------------------------- writing
    @staticmethod
    def _better(new: dict, old: dict | None) -> bool:
        if old is None:
            return True
        try:
            return float(new.get("time_ms", float("inf"))) <= float(old.get("time_ms", float("inf")))
        except (TypeError, ValueError):
            return True

    def _write_file(self, entries: dict) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        data = {"format": FORMAT, "kind": KIND, "device": self.device,
                "entries": dict(sorted(entries.items()))}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def update(self, new_entries: dict, replace: bool = False) -> bool:
        """Merge ``new_entries`` into the file under the lock; True when written.

        Without ``replace`` an existing entry is kept when it has a faster ``time_ms``.
        """
        if self.read_only:
            raise PermissionError(f"{self.path} is a read-only table")
        try:
            with _file_lock(self.path):
                merged = self._read_file()
                for key, entry in new_entries.items():
                    if replace or self._better(entry, merged.get(key)):
                        merged[key] = entry
                self._write_file(merged)
        except Exception as e:  # Timeout, OSError, ...: never break the caller's model
            self.last_error = f"{type(e).__name__}: {e}"
            warn_once(f"write:{self.path}", f"tilefuse autotune: could not write {self.path} "
                      f"({self.last_error}); tuned configs are kept in memory only")
            return False
        self._entries = None
        self.last_error = None
        _written()
        return True

    def unwritable_reason(self) -> str | None:
        """Why a write to this file would surely fail (checked without writing), else None."""
        if self.read_only:
            return f"{self.path} is a read-only table"
        if os.path.lexists(self.path) and not os.path.isfile(self.path):
            return f"{self.path} exists and is not a file"
        directory = os.path.dirname(os.path.abspath(self.path))
        parent = directory
        while not os.path.lexists(parent):  # the nearest existing ancestor must be a writable dir
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            return f"{parent} is not a directory (needed for {directory})"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"no permission to write in {parent}"
        return None

    def clear(self) -> bool:
        """Remove the file; True when something was removed."""
        if self.read_only:
            raise PermissionError(f"{self.path} is a read-only table")
        with _file_lock(self.path):
            try:
                os.unlink(self.path)
                removed = True
            except FileNotFoundError:
                removed = False
        # the .lock file stays: deleting it could let two writers hold "the" lock at once
        self._entries = None
        _written()
        return removed

    def export(self, path, entries: dict | None = None) -> int:
        """Write ``entries`` (default: all) to ``path`` as a standalone table; returns the count."""
        out = TuningDB(path, device=self.device)
        entries = self.entries() if entries is None else entries
        out._write_file(entries)
        return len(entries)

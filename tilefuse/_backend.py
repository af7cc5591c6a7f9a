"""Backend dispatch: which implementation runs an op for given tensors.

=====================  ===========================  ==========================================
tensor device          environment                  backend
=====================  ===========================  ==========================================
cuda                   (default)                    ``triton``: compiled Triton kernels
cpu                    ``TRITON_INTERPRET=1``       ``triton``: same kernels, Triton interpreter
cpu                    (default)                    ``torch``: plain torch reference path
any                    ``TILEFUSE_BACKEND=torch``   ``torch``
cpu                    ``TILEFUSE_BACKEND=triton``  error unless ``TRITON_INTERPRET=1``
=====================  ===========================  ==========================================
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "torch")


class BackendError(RuntimeError):
    """Raised when the requested backend cannot run on the given device."""


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platforms without triton
        return False
    return True


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# Triton decides interpreter-vs-compiler when a kernel is decorated (at import), so the state is
# snapshotted once, when tilefuse is imported: set TRITON_INTERPRET before ``import tilefuse``.
_INTERPRET_AT_IMPORT = _env_interpret()


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRET_AT_IMPORT


def forced_backend(value: str | None = None) -> str | None:
    """The backend ``TILEFUSE_BACKEND`` forces (``value``: that variable's raw value, read from
    the environment when not given), or None for auto."""
    if value is None:
        value = os.environ.get("TILEFUSE_BACKEND", "")
    value = value.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise BackendError(
            f"TILEFUSE_BACKEND={value!r} is not valid; expected one of 'auto', 'triton', 'torch'")
    return value


def _resolve(device: torch.device, env) -> str:
    """The backend for ``device`` given ``TILEFUSE_BACKEND``'s raw value (bytes from
    ``os.environ``'s backing dict, or None when unset)."""
    forced = forced_backend("" if env is None else os.fsdecode(env))
    if forced == "torch":
        return "torch"
    if device.type == "cuda":
        if not has_triton():
            if forced == "triton":
                raise BackendError("TILEFUSE_BACKEND=triton but triton is not installed")
            return "torch"
        return "triton"
    if device.type == "cpu":
        if interpreter_enabled() and has_triton():
            return "triton"
        if forced == "triton":
            raise BackendError(
                "TILEFUSE_BACKEND=triton was requested for CPU tensors, but Triton kernels only run "
                "on CPU inside the Triton interpreter: set TRITON_INTERPRET=1 (before importing "
                "tilefuse) or use TILEFUSE_BACKEND=torch")
        return "torch"
    if forced == "triton":
        raise BackendError(f"no Triton backend for device type {device.type!r}")
    return "torch"


# (device, TILEFUSE_BACKEND value, interpreter) -> backend: every op asks on every call, so the
# answer is cached; the environment variable is still read per call (users flip it at run time)
_CACHE: dict = {}
# os.environ.get re-encodes the key on each call; its backing dict is what setenv updates
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey("TILEFUSE_BACKEND")  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - not CPython's os.environ
    _ENV_DATA = None


def _env_backend():
    if _ENV_DATA is not None:
        return _ENV_DATA.get(_ENV_KEY)
    return os.environ.get("TILEFUSE_BACKEND")  # pragma: no cover


def backend_for_device(device: torch.device | str) -> str:
    """Return ``'triton'`` or ``'torch'`` for tensors on ``device``."""
    env = _env_backend()
    key = (device, env, _INTERPRET_AT_IMPORT)
    try:
        return _CACHE[key]
    except KeyError:
        pass
    backend = _resolve(torch.device(device), env)  # raises (uncached) for invalid settings
    _CACHE[key] = backend
    return backend


def backend_for(*tensors) -> str:
    """Backend for the first tensor among ``tensors`` (others must be on the same device)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return backend_for_device(t.device)
    return backend_for_device("cpu")


def backend_of(t: torch.Tensor) -> str:
    """:func:`backend_for` of one tensor (the hot-path form)."""
    return backend_for_device(t.device)


def describe() -> dict:
    """A summary of the environment for ``tilefuse info``."""
    import platform
    import sys

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": None,
        "interpreter": interpreter_enabled(),
        "forced_backend": os.environ.get("TILEFUSE_BACKEND") or "auto",
        "device": "cpu",
        "capability": None,
    }
    if has_triton():
        import triton

        info["triton"] = triton.__version__
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    return info

"""Who is tuning: the device identity and the kernel source hash that key every DB entry.

A tuned config is only trusted on the exact (GPU name, compute capability, Triton version, kernel
source) it was measured on; any change is a new key, so a Triton upgrade or an edited kernel never
reuses stale timings. The Triton interpreter (CPU) is its own "device" so the whole loop can be
exercised in CI without polluting GPU entries.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import re
from dataclasses import dataclass

INTERPRETER_NAME = "triton-interpreter"


@dataclass(frozen=True)
class DeviceIdentity:
    name: str          # "NVIDIA H200", "triton-interpreter", "cpu"
    capability: str    # "9.0" on CUDA, "-" elsewhere
    triton: str        # triton.__version__ or "none"
    index: int = 0     # CUDA device index (not part of the key)

    @property
    def slug(self) -> str:
        """File-name form of the device name: ``nvidia-h200``."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "unknown"

    @property
    def is_cuda(self) -> bool:
        return self.name not in (INTERPRETER_NAME, "cpu")

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.is_cuda else "cpu"

    def as_dict(self) -> dict:
        return {"name": self.name, "capability": self.capability, "triton": self.triton}


def triton_version() -> str:
    try:
        import triton
    except Exception:  # pragma: no cover - platforms without triton
        return "none"
    return str(triton.__version__)


@functools.lru_cache(maxsize=None)
def _cuda_identity(index: int) -> DeviceIdentity:
    import torch

    name = torch.cuda.get_device_name(index)
    cap = "%d.%d" % torch.cuda.get_device_capability(index)
    return DeviceIdentity(name, cap, triton_version(), index)


def current_identity(device=None) -> DeviceIdentity:
    """Identity of ``device`` (a torch device, string or None = where Triton kernels run now).

    CPU tensors run Triton kernels only in the interpreter, so CPU maps to the interpreter identity
    when ``TRITON_INTERPRET=1`` was set at import, else to plain ``cpu`` (nothing to tune).
    """
    import torch

    from tilefuse._backend import interpreter_enabled

    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not interpreter_enabled():
            index = device.index if device.index is not None else torch.cuda.current_device()
            return _cuda_identity(index)
    elif not interpreter_enabled() and torch.cuda.is_available():
        return _cuda_identity(torch.cuda.current_device())
    if interpreter_enabled():
        return DeviceIdentity(INTERPRETER_NAME, "-", triton_version())
    return DeviceIdentity("cpu", "-", triton_version())


def _source_text(obj) -> str:
    if isinstance(obj, str):
        return obj
    fn = getattr(obj, "fn", None)  # triton JITFunction / InterpretedFunction wrap the Python fn
    return inspect.getsource(fn if fn is not None else obj)


def source_hash(*objs) -> str:
    """sha256 (first 16 hex digits) over the source of kernels, helpers or modules ``objs``."""
    h = hashlib.sha256()
    for obj in objs:
        h.update(_source_text(obj).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]

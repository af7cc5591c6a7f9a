"""Work-arounds for known bugs of the Triton/numpy versions tilefuse supports.

triton < 3.7 interpreter + numpy >= 2.4
    The interpreter of triton 3.6 (the release torch 2.11 pins) hands scalar kernel arguments to
    the kernel as 1-element numpy arrays and converts them with ``int(array)`` wherever Python
    needs an index, e.g. every ``for i in range(0, N, BLOCK)`` loop. numpy 2.4 made ``int()`` of
    an array with ``ndim > 0`` an error, so every kernel with a runtime loop bound fails with
    ``TypeError: only 0-dimensional arrays can be converted to Python scalars``. triton 3.7 fixed
    it (``int(data.squeeze())``); :func:`apply` installs the same fix on older releases. It only
    touches the interpreter (``TRITON_INTERPRET=1``): compiled GPU kernels never go through it.
"""
from __future__ import annotations

import functools


def _version(text: str) -> tuple:
    parts = []
    for p in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def interpreter_needs_index_fix(triton_version: str, numpy_version: str) -> bool:
    return _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4)


@functools.lru_cache(maxsize=None)
def apply() -> bool:
    """Install the work-arounds this environment needs; True if one was installed."""
    try:
        import numpy
        import triton
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - no triton / numpy: nothing to fix
        return False
    if not interpreter_needs_index_fix(triton.__version__, numpy.__version__):
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover - layout changed: leave triton alone
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # restored together with triton's own patches when the kernel call ends
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True

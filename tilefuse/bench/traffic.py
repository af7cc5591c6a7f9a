"""Memory traffic and launches of an op, counted in the Triton interpreter (no GPU needed).

The second of the project's no-GPU performance proxies (DEVELOPERS.md): inside
:func:`count_traffic`, every ``tl.load``/``tl.store`` of an interpreted kernel is counted by its
mask-true elements, and every launch (a Triton kernel, or a torch op other than a view or an
allocation) is counted too. Deterministic, so tests may assert budgets on them:

* ``issued_bytes``: bytes every load and store moved (a re-read counts again);
* ``distinct_bytes``: bytes at distinct addresses read, plus distinct addresses written;
* ``launches``: Triton kernel launches + torch ops (``kernels`` and ``torch_ops`` separately).

>>> import os, torch                                                   # doctest: +SKIP
>>> with count_traffic() as t:                                         # doctest: +SKIP
...     tilefuse.ops.layer_norm_act(x, x.shape[-1])
>>> t.issued_bytes / minimal_bytes(x, out)                              # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
from torch.utils._python_dispatch import TorchDispatchMode

# torch ops that neither compute nor move data: allocations, views, metadata
_FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view",
         "_unsafe_view", "as_strided", "reshape", "expand", "permute", "transpose", "t",
         "unsqueeze", "squeeze", "select", "slice", "alias", "detach", "lift_fresh",
         "_reshape_alias", "unfold", "diagonal", "split", "chunk", "unbind", "narrow", "view_as",
         "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "is_contiguous",
         "stride", "size", "numel", "_to_copy_noop", "set_", "resize_", "_local_scalar_dense")


@dataclasses.dataclass
class Traffic:
    issued_bytes: int = 0
    kernels: int = 0
    torch_ops: list = dataclasses.field(default_factory=list)
    _read: set = dataclasses.field(default_factory=set)
    _written: set = dataclasses.field(default_factory=set)
    _read_bytes: int = 0
    _written_bytes: int = 0
    _in_kernel: bool = False  # the interpreter's own tensor handling is not the op's

    @property
    def launches(self) -> int:
        return self.kernels + len(self.torch_ops)

    @property
    def distinct_bytes(self) -> int:
        return self._read_bytes + self._written_bytes

    def _add(self, addrs: np.ndarray, size: int, seen: set, store: bool) -> None:
        self.issued_bytes += int(addrs.size) * size
        new = set(addrs.tolist()) - seen
        seen.update(new)
        if store:
            self._written_bytes += len(new) * size
        else:
            self._read_bytes += len(new) * size


class _OpCounter(TorchDispatchMode):
    def __init__(self, traffic: Traffic):
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_") if func.overloadpacket else str(func)
        free = name in _FREE or func.overloadpacket.__name__ in _FREE
        if name == "_to_copy" or name == "to":  # a no-op cast is not a copy
            src = args[0]
            dtype = (kwargs or {}).get("dtype", src.dtype)
            free = dtype == src.dtype
        if not free and not self.traffic._in_kernel:
            self.traffic.torch_ops.append(name)
        return func(*args, **(kwargs or {}))


def _elem_size(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def count_traffic():
    """Count loads/stores and launches of everything run inside (interpreter lane only)."""
    from tilefuse._backend import interpreter_enabled

    if not interpreter_enabled():
        raise RuntimeError("count_traffic needs the Triton interpreter (TRITON_INTERPRET=1 set "
                           "before importing tilefuse)")
    import triton.runtime.interpreter as interp

    traffic = Traffic()
    builder = interp.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    run = interp.InterpretedFunction.run

    def counted_load(self, ptrs, mask, other, cache_policy, is_volatile):
        traffic._add(np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)], _elem_size(ptrs),
                     traffic._read, False)
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def counted_store(self, ptrs, value, mask, cache_policy):
        traffic._add(np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)], _elem_size(ptrs),
                     traffic._written, True)
        return store(self, ptrs, value, mask, cache_policy)

    def counted_run(self, *args, **kwargs):
        traffic.kernels += 1
        traffic._in_kernel = True
        try:
            return run(self, *args, **kwargs)
        finally:
            traffic._in_kernel = False

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    interp.InterpretedFunction.run = counted_run
    try:
        with _OpCounter(traffic):
            yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        interp.InterpretedFunction.run = run


def nbytes(*tensors) -> int:
    """Bytes of ``tensors`` (None skipped): the minimal traffic is reading each input once and
    writing each output once."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)

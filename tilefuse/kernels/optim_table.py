"""Host-side tables of the multi-tensor optimizer and norm kernels.

Addressing (no flat buffer, no pointer casts): all tensors of one *role* (param, grad, exp_avg, ...)
share a dtype, so each role is passed as one base tensor (the non-empty one at the lowest address)
and every tensor of that role is reached as ``base + offset`` with an int64 element offset
``(t.data_ptr() - base.data_ptr()) // itemsize``. A chunk table (``ctab``: tensor index,
``cstart``: first element) maps program ``pid`` to ``BLOCK`` elements of one tensor.

* :func:`tensor_table` / :func:`chunk_table`: one-shot tables (the norm and scale reductions).
* :class:`StepTable`: the persistent table of one optimizer bucket. One int64 buffer holds a row
  per tensor, ``[numel, off_role0, off_role1, ..., off_step, srow]``, followed by the scalar rows
  (float64 bit patterns: lr, betas, eps... one row per param group and kind, ``srow`` picks it).
  It is built once; at each step only what changed is rewritten on the host -- a role whose
  tensors moved (new gradients), a scalar row whose values changed (an LR scheduler) -- and the
  buffer then reaches the device in ONE copy from a fresh pinned staging buffer (none on the CPU,
  where the kernel reads the host buffer itself). Step counters (``off_step``) are the state's
  own ``step`` tensors, advanced on the device by the kernel; ``counters`` (int32, one per tensor)
  lets the last program of each tensor write its new step (see tilefuse.kernels.optim).
"""
from __future__ import annotations

import collections

import numpy as np
import torch
import triton

from tilefuse._backend import interpreter_enabled

_CHUNKS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
ALIGN = 16  # elements: the kernels' tl.multiple_of hint on role offsets (>= 16 bytes)


def block_size(numels=()) -> int:
    """Elements per program: 2048 (8 warps) compiled; in the interpreter, where every lane costs
    numpy work, the next power of two of the largest tensor (capped at 4096)."""
    if interpreter_enabled():
        return max(16, min(4096, triton.next_power_of_2(max(numels, default=1))))
    return 2048


def compute_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def chunk_table(numels, device, block: int, min_one: bool = False):
    """(ctab int32, cstart int64, n_chunks) for tensors of ``numels`` elements; cached by shape.
    ``min_one``: an empty tensor still gets one (fully masked) program (to advance its step)."""
    key = (str(device), tuple(numels), block, min_one)
    hit = _CHUNKS.get(key)
    if hit is not None:
        _CHUNKS.move_to_end(key)
        return hit
    counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
    if min_one:
        counts.clamp_(min=1)
    total = int(counts.sum())
    ctab = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    cstart = (torch.arange(total) - first[ctab]) * block
    hit = (ctab.to(torch.int32).to(device), cstart.to(device), total)
    _CHUNKS[key] = hit
    if len(_CHUNKS) > 64:
        _CHUNKS.popitem(last=False)
    return hit


def _offsets(ptrs, size: int, skip=()):
    """(index of the base, int64 element offsets) for data pointers ``ptrs`` (None: unused).
    Indices in ``skip`` (empty tensors, never dereferenced) are not base candidates and get 0."""
    arr = np.array([0 if p is None else p for p in ptrs], dtype=np.int64)
    unused = [i for i, p in enumerate(ptrs) if p is None] + list(skip)
    if unused:
        cand = arr.copy()
        cand[unused] = np.iinfo(np.int64).max
        i = int(cand.argmin())
        if ptrs[i] is None:  # every present tensor is empty: any present one is the base
            i = next(j for j, p in enumerate(ptrs) if p is not None)
    else:
        i = int(arr.argmin())
    diff = arr - arr[i]
    if unused:
        diff[unused] = 0
    if (diff % size).any():  # cannot happen for tensors the caller batches (checked there)
        raise RuntimeError("tilefuse.optim: tensor address not aligned to its element size")
    return i, diff // size


def tensor_table(roles):
    """``roles[r][i]``: the tensor of role r for item i (None where the role is unused).

    Returns (bases, ttab) with ``ttab[i] = [numel_i, off_i0, off_i1, ...]`` (int64 element offsets
    from each role's base tensor). Role 0 must be full."""
    first = roles[0]
    empty = [i for i, t in enumerate(first) if t.numel() == 0]
    bases, cols = [], [[t.numel() for t in first]]
    for role in roles:
        present = [t for t in role if t is not None]
        if not present:
            bases.append(first[0])
            cols.append([0] * len(first))
            continue
        i, col = _offsets([None if t is None else t.data_ptr() for t in role],
                          present[0].element_size(), empty)
        bases.append(role[i])
        cols.append(col)
    return bases, torch.from_numpy(np.stack([np.asarray(c, dtype=np.int64) for c in cols], 1))


class StepTable:
    """The persistent launch table of one optimizer bucket (see the module docstring).

    ``roles[r][i]``: tensor of role r for item i (role 0 full, None where unused); ``steps``: the
    items' step tensors (or None); ``srows[i]``: item i's scalar row; ``n_rows`` x ``width``
    scalars. ``update_role`` / ``set_scalars`` rewrite the host copy; ``sync`` sends it."""

    def __init__(self, roles, steps, srows, n_rows: int, width: int):
        first = roles[0]
        n = len(first)
        self.device = first[0].device
        self.dtype = first[0].dtype
        numels = [t.numel() for t in first]
        self._empty = [i for i, m in enumerate(numels) if m == 0]
        self.block = block_size(numels)
        # 8 elements per thread (two 128-bit fp32 accesses): <= 128 registers on sm_90
        self.num_warps = 8 if self.block >= 2048 else 4
        self.ctab, self.cstart, self.n_chunks = chunk_table(numels, self.device, self.block,
                                                            min_one=steps is not None)
        self.ncols = len(roles) + 3
        # the scalar rows start at an even word (16-byte aligned on the device), so kernels with
        # an even row width read them as 128-bit pairs (tilefuse.kernels.optim._pair)
        sc_off = -(-(n * self.ncols) // 2) * 2
        self._host = np.zeros(sc_off + n_rows * width, dtype=np.int64)
        self._tab = self._host[:n * self.ncols].reshape(n, self.ncols)
        self._sc = self._host[sc_off:].view(np.float64).reshape(n_rows, width)
        self._sc_vals = [None] * n_rows
        self._tab[:, 0] = numels
        self._tab[:, -1] = srows
        self.bases = []
        self._ptrs, self._size, self._base_idx = [], [], []
        for r, role in enumerate(roles):
            present = [t for t in role if t is not None]
            ptrs = [None if t is None else t.data_ptr() for t in role]
            size = present[0].element_size() if present else 1
            i, col = _offsets(ptrs, size, self._empty) if present else (0, 0)
            self.bases.append(role[i] if present else first[0])
            self._tab[:, r + 1] = col
            self._ptrs.append(ptrs)
            self._size.append(size)
            self._base_idx.append(i)
        self._nroles = len(roles)
        self._set_aligned()
        self.step_base = self.counters = None
        if steps is not None:
            i, col = _offsets([s.data_ptr() for s in steps], steps[0].element_size())
            self.step_base = steps[i]
            self._tab[:, -2] = col
            self.counters = torch.zeros(n, dtype=torch.int32, device=self.device)
        self._dirty = self._staged = self.device.type != "cpu"
        if self._staged:
            self.buf = torch.empty(self._host.shape, dtype=torch.int64, device=self.device)
        else:  # the kernel reads the host buffer itself
            self.buf = torch.from_numpy(self._host)
        self.sc = self.buf.view(torch.float64)[sc_off:]

    def update_role(self, r: int, tensors, ptrs):
        """Role ``r`` is now ``tensors`` (all present, data pointers ``ptrs``): rewrite its
        offsets if any moved; returns the role's base tensor for this launch."""
        if ptrs != self._ptrs[r]:
            i, col = _offsets(ptrs, self._size[r], self._empty)
            self._tab[:, r + 1] = col
            self._ptrs[r] = ptrs
            self._base_idx[r] = i
            self._set_aligned()
            self._dirty = True
        return tensors[self._base_idx[r]]

    def _set_aligned(self) -> None:
        """``aligned``: every role offset is a multiple of ALIGN elements (chunk starts are
        multiples of the block), so the kernels may hint ``tl.multiple_of`` and vectorize. Base
        pointers' own 16-byte alignment is specialized by Triton at launch."""
        self.aligned = not (self._tab[:, 1:self._nroles + 1] % ALIGN).any()

    def set_scalars(self, row: int, values: tuple) -> None:
        if values != self._sc_vals[row]:
            self._sc[row] = values
            self._sc_vals[row] = values
            self._dirty = True

    def sync(self) -> None:
        """Send the host buffer to the device if it changed: one copy from a fresh pinned buffer
        (torch's caching host allocator keeps it until the copy has run, so the host copy can
        be rewritten at the next step without waiting)."""
        if self._dirty and self._staged:
            staging = torch.empty(self._host.shape, dtype=torch.int64, pin_memory=True)
            staging.numpy()[:] = self._host
            self.buf.copy_(staging, non_blocking=True)
            self._dirty = False

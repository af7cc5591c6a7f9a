"""Multi-tensor reductions for grad clipping and grad-norm monitoring.

Same chunk / per-tensor tables as the update kernels (:mod:`tilefuse.kernels.optim_table`; one
launch covers every tensor of a (device, dtype) bucket). ``norm_partial_kernel`` writes one
partial per chunk -- the sum of squares, the sum of |x| or the max |x| -- with no atomics
(deterministic); the caller reduces the partials on device (total norm) or segment-sums them by
the chunk -> tensor map (per-tensor norms). ``scale_kernel`` multiplies every tensor by a device
scalar (the clip coefficient), so clipping never reads the norm back to the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse.kernels.optim import _base, _chunk, _ld, _st
from tilefuse.kernels.optim_table import (ALIGN, block_size, chunk_table, compute_dtype,
                                          tensor_table)


# roles: 0 tensor.  NORM: 2 -> sum of squares, 1 -> sum of |x|, 0 -> max |x| (the inf-norm)
@triton.jit
def norm_partial_kernel(ctab_ptr, cstart_ptr, ttab_ptr, x_ptr, out_ptr,
                        NORM: tl.constexpr, CDT: tl.constexpr, ALIGNED: tl.constexpr,
                        BLOCK: tl.constexpr):
    # program -> chunk of one tensor: scalar base + int32 lanes, unmasked when full (as the
    # update kernels in tilefuse.kernels.optim)
    t, row, n, live, start, ar, rem, full = _chunk(ctab_ptr, cstart_ptr, ttab_ptr, ctab_ptr, 2,
                                                    False, BLOCK)
    x = tl.abs(_ld(_base(x_ptr, row, 1, start, ALIGNED) + ar, rem, full, False).to(CDT))
    if NORM == 2:
        r = tl.sum(x * x, axis=0)
    elif NORM == 1:
        r = tl.sum(x, axis=0)
    else:  # tl.max drops NaN: put it back, as torch's inf-norm (and the sums above) keep it
        r = tl.max(x, axis=0)
        r = tl.where(tl.sum((x != x).to(tl.int32), axis=0) > 0, float("nan"), r)
    tl.store(out_ptr + tl.program_id(0), r)


@triton.jit
def scale_kernel(ctab_ptr, cstart_ptr, ttab_ptr, x_ptr, coef_ptr,
                 CDT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """x *= coef (a device scalar) for every tensor of the bucket: the clip step."""
    t, row, n, live, start, ar, rem, full = _chunk(ctab_ptr, cstart_ptr, ttab_ptr, ctab_ptr, 2,
                                                    False, BLOCK)
    x_p = _base(x_ptr, row, 1, start, ALIGNED) + ar
    x = _ld(x_p, rem, full, ALIGNED).to(CDT)
    _st(x_p, (x * tl.load(coef_ptr).to(CDT)).to(x_ptr.dtype.element_ty), rem, full)


def _aligned(ttab, base) -> bool:
    """Every tensor's element offset from the 16-byte aligned base is a multiple of ALIGN (see
    optim_table): tensor starts are 16-byte aligned."""
    return base.data_ptr() % 16 == 0 and not bool((ttab[:, 1] % ALIGN).any())


def launch_norm_partials(tensors, norm: int):
    """Per-chunk partial norms (sum of squares / sum |x| / max |x|) and the chunk -> tensor map."""
    device = tensors[0].device
    numels = [t.numel() for t in tensors]
    block = block_size(numels)
    ctab, cstart, n_chunks = chunk_table(numels, device, block)
    bases, ttab = tensor_table([tensors])
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    out = torch.empty(n_chunks, device=device, dtype=acc)
    norm_partial_kernel[(n_chunks,)](ctab, cstart, ttab.to(device, non_blocking=True), bases[0],
                                     out, NORM=norm, CDT=compute_dtype(acc),
                                     ALIGNED=_aligned(ttab, bases[0]), BLOCK=block, num_warps=4)
    return out, ctab


def launch_scale(tensors, coef: torch.Tensor) -> None:
    """tensors[i] *= coef (device scalar), one launch."""
    device = tensors[0].device
    numels = [t.numel() for t in tensors]
    block = block_size(numels)
    ctab, cstart, n_chunks = chunk_table(numels, device, block)
    bases, ttab = tensor_table([tensors])
    scale_kernel[(n_chunks,)](ctab, cstart, ttab.to(device, non_blocking=True), bases[0], coef,
                              CDT=compute_dtype(tensors[0].dtype),
                              ALIGNED=_aligned(ttab, bases[0]), BLOCK=block, num_warps=4)

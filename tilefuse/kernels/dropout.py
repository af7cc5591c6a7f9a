"""Counter-based (Philox) dropout kernels: ``out = [residual +] x * keep * scale``.

The keep decision for an element is a pure function of ``(seed, rng_index)``:
``keep = keep_mask(seed, rng_index // GROUP, p)`` (a Philox uniform > p), where ``rng_index`` is
the element's *logical* row-major index (int64, so tensors past 2^31 elements get distinct
counters) and ``GROUP`` is 1 for element dropout or ``H*W`` for channel dropout (Dropout2d).
The seed is an int64 *tensor* on the data's device, loaded inside the kernel
(:func:`load_seed`): no host sync, and a captured CUDA graph reads the value its replay's draw
wrote. ``tilefuse.fused.dropout.draw_seed`` gives a 16-byte aligned pair (the seed, then an unused
word) that the kernel reads with one 128-bit load; any other seed tensor (a caller's 0-d seed) is
first copied to such a pair (:func:`seed_pair`). Nothing but the seed is stored for backward: the backward pass runs the
same kernel on the incoming gradient and regenerates the identical mask, whatever the gradient's
memory layout, because the counter is logical.

Also here: :func:`mixup_kernel`, the batch mixup ``lam*x + (1-lam)*x[perm]`` in one pass (the
regularization family's other elementwise kernel).

Memory layout: the launcher permutes the dims into ``x``'s physical order (so loads/stores are
coalesced for channels_last and transposed views too), merges dims that are contiguous in every
operand, and passes up to four (size, stride) pairs per operand. A fully contiguous problem
compiles to the ``CONTIG`` fast path (no index arithmetic, one Philox call per four elements:
see :func:`keep_mask`). Problems that still need more than four dims after merging are the only
ones that get a ``.contiguous()`` copy.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, split_constexprs

MAX_DIMS = 4


RNG_Q = 256  # counter layout constant: part of the mask definition, never tune it


@triton.jit
def keep_mask(seed, ridx, p, Q: tl.constexpr):
    """Keep decision for the elements with logical rng indices ``ridx`` (any-shape int tile).

    One Philox call yields four uniforms, so indices are laid out in chunks of ``4*Q``: element
    ``ridx`` uses counter ``(ridx // 4Q) * Q + ridx % Q`` and output ``(ridx // Q) % 4``. The
    contiguous fast path of :func:`dropout_kernel` exploits this (one Philox call per four
    elements, each sub-block still a contiguous load); every other caller (strided path, channel
    dropout, DropConnect in the matmul kernel) calls this helper and gets the same bits."""
    ridx = ridx.to(tl.int64)
    counter = (ridx // (4 * Q)) * Q + ridx % Q
    lane = (ridx // Q) % 4
    r0, r1, r2, r3 = tl.rand4x(seed, counter)
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return r > p


@triton.jit
def load_seed(seed_ptr):
    """Element 0 of the int64 pair at ``seed_ptr``. Loading both words as a 2-vector and
    splitting it compiles to one ``ld.global.v2.b64`` (128-bit) when the pair is 16-byte aligned
    (Triton specializes on the pointer's alignment: an unaligned pair gets a correct 64-bit
    load); ``tl.load(seed_ptr)`` was the kernel's only scalar global load."""
    seed, _ = tl.split(tl.load(seed_ptr + tl.arange(0, 2)))
    return seed


def seed_pair(seed: torch.Tensor) -> torch.Tensor:
    """``seed`` as the contiguous 2-element tensor :func:`load_seed` reads (element 0 is the
    seed). ``draw_seed``'s pair passes through; a caller-supplied 0-d (or 1-element) seed is
    copied to ``[seed, seed]`` on its device (one tiny op, on the caller's seed only)."""
    if seed.numel() == 2 and seed.dim() == 1 and seed.is_contiguous():
        return seed
    if seed.numel() != 1:
        raise ValueError(f"seed: expected a 1-element or 2-element integer tensor, got shape "
                         f"{tuple(seed.shape)}")
    return seed.reshape(1).repeat(2)


@triton.jit
def _scaled(x, keep, scale_hi, scale_lo, ACC_DTYPE: tl.constexpr):
    if ACC_DTYPE == tl.float64:  # float args are fp32: 1/(1-p) to ~48 bits as a hi/lo pair
        xs = x * scale_hi + x * scale_lo
    else:
        xs = x * scale_hi
    return tl.where(keep, xs, 0.0)


@triton.jit
def _contig_lane(x_ptr, res_ptr, out_ptr, offs, m, keep, scale_hi, scale_lo,
                 HAS_RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC_DTYPE)
    y = _scaled(x, keep, scale_hi, scale_lo, ACC_DTYPE)
    if HAS_RESIDUAL:
        y = y + tl.load(res_ptr + offs, mask=m, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def dropout_kernel(
    x_ptr, res_ptr, out_ptr, seed_ptr, p, scale_hi, scale_lo, n_elements, GROUP,
    S1, S2, S3,
    sx0, sx1, sx2, sx3, sr0, sr1, sr2, sr3, so0, so1, so2, so3, sl0, sl1, sl2, sl3,
    HAS_RESIDUAL: tl.constexpr, CONTIG: tl.constexpr, GROUPED: tl.constexpr,
    ACC_DTYPE: tl.constexpr, Q: tl.constexpr, CH: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # VEC: a power of two dividing n_elements (CONTIG) or S3 (strided), so the bounds masks are
    # constant over VEC elements and masked accesses still vectorize when the size is not a
    # multiple of 16 (the only divisibility Triton's launcher specializes on)
    # (x // VEC) * VEC == x: an op result carries the hint (tl.multiple_of on an argument is lost)
    if CONTIG:
        n_elements = (n_elements // VEC) * VEC
    else:
        S3 = (S3 // VEC) * VEC
    seed = load_seed(seed_ptr)  # on the device: no host read, CUDA-graph replayable
    if CONTIG:
        # BLOCK = CH chunks of 4*Q elements; one Philox call per (chunk, j) feeds 4 elements
        chunk = pid * CH + tl.arange(0, CH).to(tl.int64)
        j = tl.arange(0, Q).to(tl.int64)
        r0, r1, r2, r3 = tl.rand4x(seed, chunk[:, None] * Q + j[None, :])
        base = chunk[:, None] * (4 * Q) + j[None, :]
        _contig_lane(x_ptr, res_ptr, out_ptr, base, base < n_elements, r0 > p,
                     scale_hi, scale_lo, HAS_RESIDUAL, ACC_DTYPE)
        _contig_lane(x_ptr, res_ptr, out_ptr, base + Q, base + Q < n_elements, r1 > p,
                     scale_hi, scale_lo, HAS_RESIDUAL, ACC_DTYPE)
        _contig_lane(x_ptr, res_ptr, out_ptr, base + 2 * Q, base + 2 * Q < n_elements, r2 > p,
                     scale_hi, scale_lo, HAS_RESIDUAL, ACC_DTYPE)
        _contig_lane(x_ptr, res_ptr, out_ptr, base + 3 * Q, base + 3 * Q < n_elements, r3 > p,
                     scale_hi, scale_lo, HAS_RESIDUAL, ACC_DTYPE)
    else:
        # 2-D tile (BLOCK_R merged outer rows) x (BLOCK_C innermost elements): the innermost
        # offsets stay a contiguous arange, so unit-stride operands vectorize (128-bit accesses)
        n_cb = tl.cdiv(S3, BLOCK_C)
        r = (pid // n_cb) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        i3 = (pid % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        i2 = r % S2
        t = r // S2
        i1 = t % S1
        i0 = t // S1
        m = (r < n_elements // S3)[:, None] & (i3 < S3)[None, :]
        ridx = (i0 * sl0 + i1 * sl1 + i2 * sl2)[:, None] + i3[None, :] * sl3
        if GROUPED:
            ridx = ridx // GROUP
        keep = keep_mask(seed, ridx, p, Q)
        xo = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None] + i3[None, :] * sx3
        x = tl.load(x_ptr + xo, mask=m, other=0.0).to(ACC_DTYPE)
        y = _scaled(x, keep, scale_hi, scale_lo, ACC_DTYPE)
        if HAS_RESIDUAL:
            ro = (i0 * sr0 + i1 * sr1 + i2 * sr2)[:, None] + i3[None, :] * sr3
            y = y + tl.load(res_ptr + ro, mask=m, other=0.0).to(ACC_DTYPE)
        oo = (i0 * so0 + i1 * so1 + i2 * so2)[:, None] + i3[None, :] * so3
        tl.store(out_ptr + oo, y.to(out_ptr.dtype.element_ty), mask=m)


def _plan(shape, strides_list):
    """Permute dims into the first operand's physical order and merge dims contiguous in every
    operand (incl. the logical-index strides, last in ``strides_list``). Returns (sizes,
    [strides per operand]) with size-1 dims dropped, or None when more than MAX_DIMS remain."""
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    lead = strides_list[0]
    # stable sort by the lead operand's strides, largest first (ties keep logical order)
    dims.sort(key=lambda d: -abs(lead[d]))
    sizes = []
    strides = [[] for _ in strides_list]
    for d in dims:
        if sizes and all(st[-1] == s[d] * shape[d] for st, s in zip(strides, strides_list)):
            sizes[-1] *= shape[d]
            for st, s in zip(strides, strides_list):
                st[-1] = s[d]
            continue
        sizes.append(shape[d])
        for st, s in zip(strides, strides_list):
            st.append(s[d])
    if len(sizes) > MAX_DIMS:
        return None
    pad = MAX_DIMS - len(sizes)
    sizes = [1] * pad + sizes
    strides = [[0] * pad + st for st in strides]
    return sizes, strides


def _logical_strides(shape):
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]


# GPU block: 4096 elements = 4 warps x 32 lanes x 32 elements, i.e. several 128-bit accesses per
# thread for 32-bit and 16-bit dtypes (1024-element blocks gave scalar 32-bit accesses)
GPU_BLOCK = 4096
STRIDED_GPU_BLOCK = 1024


def _block(n: int, is_cuda: bool) -> int:
    if interpreter_enabled() or not is_cuda:  # few big programs
        return max(4 * RNG_Q, min(1 << 16, triton.next_power_of_2(n)))
    return GPU_BLOCK


def _tile(inner: int, block: int):
    """(BLOCK_R, BLOCK_C) of the strided path: the innermost dim as wide as possible."""
    bc = min(block, max(16, triton.next_power_of_2(inner)))
    return block // bc, bc


_LAUNCH = launch_cache()
_F32 = struct.Struct("f")


def fp32_round(v: float) -> float:
    """``v`` rounded to the nearest fp32 (as ``float(torch.tensor(v, dtype=torch.float32))``,
    without the tensor)."""
    return _F32.unpack(_F32.pack(v))[0]


def _launch_params(shape, x_strides, r_strides, o_strides, group: int, out_dtype, is_cuda: bool):
    """(grid, the arguments after ``n_elements`` (sizes, strides, constexprs) as one tuple,
    launch options) of one dropout problem signature, or None when more than MAX_DIMS dims
    remain after merging (the launcher then copies)."""
    shape = list(shape)
    has_res = r_strides is not None
    strides = [list(x_strides), list(r_strides if has_res else x_strides), list(o_strides)]
    plan = _plan(shape, strides + [_logical_strides(shape)])
    if plan is None:
        return None
    n = 1
    for s in shape:
        n *= s
    sizes, (sx, sr, so, sl) = plan
    contig = (group == 1 and sizes[:3] == [1, 1, 1] and sx[3] == 1 and so[3] == 1
              and sl[3] == 1 and (not has_res or sr[3] == 1))
    block = _block(n, is_cuda)
    # the strided path draws one Philox per element (int64 index math): 1024 elements per
    # program keep it under ~100 registers; still 8 elements (>= one 128-bit access) per thread
    gpu = is_cuda and not interpreter_enabled()
    block_r, block_c = _tile(sizes[3], STRIDED_GPU_BLOCK if gpu and not contig else block)
    if contig:
        n_prog = triton.cdiv(n, block)
    else:
        n_prog = triton.cdiv(n // sizes[3], block_r) * triton.cdiv(sizes[3], block_c)
    vec = 16 // out_dtype.itemsize
    while (n if contig else sizes[3]) % vec:
        vec //= 2
    ints = (int(group), sizes[1], sizes[2], sizes[3], *sx, *sr, *so, *sl)
    consts, opts = split_constexprs(dropout_kernel, _DROPOUT_RUNTIME, dict(
        HAS_RESIDUAL=has_res, CONTIG=bool(contig), GROUPED=group > 1,
        ACC_DTYPE=tl.float64 if out_dtype == torch.float64 else tl.float32,
        Q=RNG_Q, CH=block // (4 * RNG_Q), BLOCK=block, BLOCK_R=block_r, BLOCK_C=block_c,
        VEC=vec, num_warps=4))
    return (n_prog,), ints + consts, opts


_DROPOUT_RUNTIME = dropout_kernel.arg_names.index("HAS_RESIDUAL")


def launch_dropout(x: torch.Tensor, out: torch.Tensor, seed: torch.Tensor, p: float,
                   residual=None, group: int = 1) -> torch.Tensor:
    """``out = [residual +] dropout(x)`` for same-shape ``x``, ``out`` and ``residual`` (any
    strides; ``residual`` may be an expanded view). ``group`` > 1 shares one keep decision per
    ``group`` consecutive logical elements (channel dropout). ``seed`` is an int64 tensor on
    ``out``'s device (draw_seed's pair, or a 1-element seed: see :func:`seed_pair`), read by the
    kernel (never on the host). The layout plan of a
    signature (shape, strides, group, dtype) is computed once
    (:func:`tilefuse.kernels.launch_cache`)."""
    n = x.numel()
    if n == 0:
        return out
    has_res = residual is not None
    key = (x.shape, x.stride(), residual.stride() if has_res else None, out.stride(), group,
           out.dtype, x.is_cuda)
    params = _LAUNCH.get(key)
    if params is None:
        params = _launch_params(*key)
        _LAUNCH[key] = params if params is not None else False
    if not params:  # > 4 dims after merging: one documented copy of the strided inputs
        x = x.contiguous()
        residual = residual.contiguous() if has_res else None
        tmp = torch.empty(x.shape, dtype=out.dtype, device=out.device)
        launch_dropout(x, tmp, seed, p, residual, group)
        out.copy_(tmp)
        return out
    grid, tail, opts = params
    scale = 1.0 / (1.0 - p)
    scale_hi = fp32_round(scale)
    dropout_kernel[grid](x, residual if has_res else x, out, seed_pair(seed), float(p), scale_hi,
                         scale - scale_hi, n, *tail, **opts)
    return out


# ------------------------------------------------------------------------------------------------
# mixup: out[n] = lam * x[n] + (1 - lam) * x[perm[n]]  (one pass: 2 reads, 1 write per element)
# ------------------------------------------------------------------------------------------------
@triton.jit
def mixup_kernel(x_ptr, perm_ptr, out_ptr, D, stride_xn, stride_on, lam,
                 ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = cols < D
    src = tl.load(perm_ptr + n).to(tl.int64)
    a = tl.load(x_ptr + n * stride_xn + cols, mask=m, other=0.0).to(ACC_DTYPE)
    b = tl.load(x_ptr + src * stride_xn + cols, mask=m, other=0.0).to(ACC_DTYPE)
    y = b + lam * (a - b)  # torch.lerp(b, a, lam)
    tl.store(out_ptr + n * stride_on + cols, y.to(out_ptr.dtype.element_ty), mask=m)


_MIXUP_LAUNCH = launch_cache()


def _mixup_params(N: int, D: int, out_dtype, is_cuda: bool):
    if interpreter_enabled() or not is_cuda:
        block = max(16, min(1 << 14, triton.next_power_of_2(D)))
    else:
        block = 2048
    return ((N, triton.cdiv(D, block)),) + split_constexprs(mixup_kernel, _MIXUP_RUNTIME, dict(
        ACC_DTYPE=tl.float64 if out_dtype == torch.float64 else tl.float32, BLOCK_D=block,
        num_warps=4))


_MIXUP_RUNTIME = mixup_kernel.arg_names.index("ACC_DTYPE")


def launch_mixup(x2: torch.Tensor, perm: torch.Tensor, out: torch.Tensor, lam: float):
    """x2, out: (N, D) with unit column stride; perm: (N,) int64 on the same device."""
    N, D = x2.shape
    if N == 0 or D == 0:
        return out
    key = (N, D, out.dtype, x2.is_cuda)
    params = _MIXUP_LAUNCH.get(key)
    if params is None:
        params = _MIXUP_LAUNCH[key] = _mixup_params(*key)
    grid, consts, opts = params
    mixup_kernel[grid](x2, perm, out, D, x2.stride(0), out.stride(0), float(lam), *consts, **opts)
    return out

"""Persistent TMA GEMM for Hopper (sm_90): fp16/bf16, fp32 with TF32 and int8 x int8.

One kernel for :func:`tilefuse.ops.matmul`/``linear`` and :func:`tilefuse.ops.int8_matmul`
(W8A8): ``C = act((A @ B) * a_scale * b_scale + bias) + residual`` for 2-D A (M, K), B (K, N).

* Operands are read through device-side tensor descriptors (``tl.make_tensor_descriptor``),
  so every tile load is one TMA copy (``cp.async.bulk.tensor``) into shared memory feeding
  ``wgmma``; out-of-range rows, columns and the K tail are zero-filled by TMA (no masks, no
  wrapped offsets). Each operand may be row- or column-major (``A_ROW``/``B_ROW``: which dim is
  contiguous); the descriptor follows the memory and the tile is transposed in registers.
* Persistent: the grid is ``min(NUM_SMS, work)`` programs, each walking work items
  ``pid, pid + NUM_SMS, ...`` (``tl.range(..., flatten=True)``: the compiler pipelines the flat
  loop across tile boundaries); tiles are taken in the grouped order of
  :func:`tilefuse.kernels.gemm_common.grouped_pid`.
* Split-K (``SPLIT_K > 1``, small M): a work item is (split, tile); the tile's fp32/int32
  accumulator goes to the (SPLIT_K, M, N) workspace and
  :func:`tilefuse.kernels.gemm_common.splitk_reduce_kernel` applies the epilogue.
* Epilogue: :func:`tilefuse.kernels.gemm_common.gemm_epilogue` (the classic kernels' helper),
  then a TMA store when ``C`` allows it (``C_TMA``: row stride and base 16-byte aligned) or a
  masked store.

TMA descriptors need a global-memory workspace on the GPU (``triton.set_allocator``): installed
once by :func:`ensure_allocator` (a torch allocation on the launch's stream). Warp
specialization of the persistent loop (``tl.range(..., warp_specialize=WARP_SPEC)``) is a
tuning option (config ``WARP_SPEC``, :data:`WS_WARPS`), off in the heuristic (docs/gemm.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import split_constexprs
from tilefuse.kernels.gemm_common import gemm_epilogue, grouped_pid, store_partial


@triton.jit
def gemm_tma_kernel(
    a_ptr, b_ptr, c_ptr, ws_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, res_ptr, pre_ptr,
    M, N, K, stride_a, stride_b, stride_cm, stride_cn, stride_rm, stride_rn,
    stride_as, stride_bs, stride_bias, stride_ws,
    A_ROW: tl.constexpr, B_ROW: tl.constexpr, C_TMA: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INT_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EPI_DTYPE: tl.constexpr, HAS_A_SCALE: tl.constexpr,
    HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr,
    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_SMS: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    if A_ROW:  # A (M, K) with K contiguous
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_a, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    else:      # A stored as (K, M) with M contiguous (e.g. x.T in a weight gradient)
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[K, M], strides=[stride_a, 1],
                                           block_shape=[BLOCK_K, BLOCK_M])
    if B_ROW:  # B (K, N) with N contiguous
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    else:      # B stored as (N, K) with K contiguous: linear's weight, K-major
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    if C_TMA:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                           block_shape=[BLOCK_M, BLOCK_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_per_split = tl.cdiv(k_tiles, SPLIT_K)
    for work in tl.range(tl.program_id(0), num_tiles * SPLIT_K, NUM_SMS, flatten=True,
                         warp_specialize=WARP_SPEC):
        tile = work % num_tiles
        pid_k = work // num_tiles
        pid_m, pid_n = grouped_pid(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, k_tiles)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for ki in range(k_lo, k_hi):
            k = ki * BLOCK_K
            if A_ROW:
                a = a_desc.load([off_m, k])
            else:
                a = a_desc.load([k, off_m]).T
            if B_ROW:
                b = b_desc.load([k, off_n])
            else:
                b = b_desc.load([off_n, k]).T
            if INT_DOT:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            else:
                if UPCAST:  # the interpreter's tl.dot is wrong for bf16: feed it fp32
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        if SPLIT_K > 1:
            store_partial(ws_ptr, acc, pid_k, stride_ws, offs_m, offs_n, M, N)
        else:
            y = gemm_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, stride_as, b_scale_ptr,
                              stride_bs, bias_ptr, stride_bias, pre_ptr, stride_cm, stride_cn,
                              res_ptr, stride_rm, stride_rn, EPI_DTYPE, HAS_A_SCALE, HAS_B_SCALE,
                              HAS_BIAS, SAVE_PRE, ACTIVATION, ACT_PARAM, HAS_RESIDUAL)
            if C_TMA:
                c_desc.store([off_m, off_n], y.to(c_ptr.dtype.element_ty))
            else:
                c_off = (offs_m.to(tl.int64)[:, None] * stride_cm
                         + offs_n.to(tl.int64)[None, :] * stride_cn)
                c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
                tl.store(c_ptr + c_off, y.to(c_ptr.dtype.element_ty), mask=c_mask)


_N_RUNTIME = gemm_tma_kernel.arg_names.index("A_ROW")


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def ensure_allocator() -> None:
    """Install the descriptor-workspace allocator Triton needs for device-side TMA descriptors
    unless one is set (``triton.set_allocator`` is a context variable: checked per launch, so
    every thread gets one; the interpreter needs none). A user's allocator is kept."""
    if interpreter_enabled():
        return
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:  # pragma: no cover - another triton layout: set it every time
        triton.set_allocator(_alloc)
        return
    if isinstance(_allocator.get(), NullAllocator):
        triton.set_allocator(_alloc)


def c_tma_ok(c: torch.Tensor) -> bool:
    """Whether C can be written with TMA stores (row-major, row stride and base aligned)."""
    return (c.dim() == 2 and c.stride(1) == 1 and (c.stride(0) * c.element_size()) % 16 == 0
            and c.data_ptr() % 16 == 0)


SMEM_BUDGET = 232448  # sm_90 opt-in shared memory per block
#: ``num_warps`` of a ``WARP_SPEC`` launch. Triton's Hopper warp specialization (3.6 and 3.9)
#: partitions the persistent loop only when the kernel is launched with 4 warps (with 8 the
#: ``warp_specialize`` attribute is silently ignored); it then runs 12 warps: one producer warp
#: group issuing the TMA loads and two consumer warp groups sharing the tile's wgmma and
#: epilogue (``setmaxnreg`` moves registers to them). docs/gemm.md has the sm_90 compile
#: results; GPU speed is unmeasured, so the heuristic never sets it (a tuned config may).
WS_WARPS = 4


def tma_params(M: int, N: int, K: int, a_layout: str, b_layout: str, c_tma: bool, cfg: dict,
               epi: dict, acc_dtype, int_dot: bool, input_precision: str, upcast: bool,
               sms: int, sizes: tuple = (2, 2)) -> tuple:
    """(grid, constexprs, launch options) of one persistent launch (cached by the callers).
    ``cfg``: BLOCK_M/N/K, GROUP_M, SPLIT_K, num_warps, num_stages and optionally
    ``WARP_SPEC`` (tuning only, off by default: see :data:`WS_WARPS`); ``epi``: the epilogue
    constexprs of :func:`tilefuse.kernels.gemm_common.gemm_epilogue`; ``sizes``: element bytes
    of the operands and of C. The TMA store stages a whole C tile in shared memory: where that
    and the operand stages exceed :data:`SMEM_BUDGET` (e.g. int32 C of 128x256 int8 tiles),
    C is written with masked stores instead."""
    c = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    split = int(cfg.get("SPLIT_K", 1))
    stages = cfg.get("num_stages", 3)
    smem = (stages * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * sizes[0]
            + c["BLOCK_M"] * c["BLOCK_N"] * sizes[1])
    c_tma = c_tma and smem <= SMEM_BUDGET
    work = triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]) * split
    ws = bool(cfg.get("WARP_SPEC", False))
    consts = dict(A_ROW=a_layout == "row", B_ROW=b_layout == "row", C_TMA=bool(c_tma and split == 1),
                  ACC_DTYPE=acc_dtype, INT_DOT=int_dot, INPUT_PRECISION=input_precision,
                  UPCAST=upcast, **epi, **c, SPLIT_K=split, NUM_SMS=sms, WARP_SPEC=ws,
                  num_warps=WS_WARPS if ws else cfg.get("num_warps", 8), num_stages=stages)
    consts, opts = split_constexprs(gemm_tma_kernel, _N_RUNTIME, consts)
    return (max(1, min(sms, work)),), consts, opts


def launch_tma(params, a, b, c, ws=None, a_scale=None, b_scale=None, bias=None, residual=None,
               pre=None, a_layout: str = "row", b_layout: str = "col"):
    """One persistent launch of :func:`gemm_tma_kernel` with cached ``params``
    (:func:`tma_params`); ``ws`` is the (SPLIT_K, M, N) workspace when SPLIT_K > 1."""
    ensure_allocator()
    grid, consts, opts = params
    M, K = a.shape
    N = b.shape[1]
    dummy = c
    res = residual if residual is not None else dummy
    gemm_tma_kernel[grid](
        a, b, c, ws if ws is not None else dummy,
        a_scale if a_scale is not None else dummy, b_scale if b_scale is not None else dummy,
        bias if bias is not None else dummy, res, pre if pre is not None else dummy,
        M, N, K, a.stride(0) if a_layout == "row" else a.stride(1),
        b.stride(0) if b_layout == "row" else b.stride(1), c.stride(0), c.stride(1),
        res.stride(0), res.stride(1), a_scale.stride(0) if a_scale is not None else 0,
        b_scale.stride(0) if b_scale is not None else 0,
        bias.stride(0) if bias is not None else 0, M * N, *consts, **opts)
    return c

"""What every GEMM family shares: the grouped program order, the fused epilogue, split-K (the
SM-filling rule and the deterministic reduction) and the one place that picks the GEMM path.

* :func:`grouped_pid`: program id -> (row block, column block) in super-groups of ``GROUP_M``
  row blocks (Triton tutorial 03), used by the classic kernels and, per tile, by the persistent
  TMA kernel.
* :func:`gemm_epilogue`: ``act((acc * a_scale * b_scale) + bias) + residual`` with the optional
  pre-activation store, on a tile; the matmul, int8, persistent TMA and split-K reduction kernels
  all run this one helper, so their epilogues cannot drift apart.
* split-K: :func:`fill_sms` sizes small-M problems so the grid reaches the SM count (narrower
  N/M tiles first, then splitting K); the GEMM kernels then write fp32 (int32 for int8 x int8)
  partials ``(SPLIT_K, M, N)`` and :func:`splitk_reduce_kernel` sums them in a fixed order
  (split 0, 1, ...: deterministic, run to run and between the interpreter and a GPU) and applies
  the whole epilogue.
* :func:`gemm_path`: ``"tma"`` (persistent TMA kernel, :mod:`tilefuse.kernels.matmul_tma`) on
  sm_90 for 16-byte aligned operands of a supported dtype, else ``"classic"``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse.kernels import INTERPRETER_SMS, split_constexprs, sm_count
from tilefuse.kernels.activations import apply_activation

SMALL_M = 256      # problems with M <= SMALL_M get the SM-filling rule
MIN_BLOCK_N = 32   # narrowest N tile the rule picks
MAX_SPLIT_K = 16
MIN_K_TILES_PER_SPLIT = 2
MIN_BLOCK_K = 32   # int8 MMA consumes K in steps of 32; the rule never goes below
H100_SMS = 132     # the profile used where no device is at hand (tests, the AOT check)


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block) in super-groups of GROUP_M row blocks that sweep
    the column blocks together, so their A rows and B columns stay in L2 (shared by every GEMM)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """``(offs_m, offs_n, offs_am, offs_bn, offs_k)`` of program ``pid``'s output tile (grouped
    order): ``offs_am``/``offs_bn`` are the int64 A rows / B columns it reads, out-of-range ones
    wrapped instead of masked on every load (their results are masked on store)."""
    pid_m, pid_n = grouped_pid(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = (offs_n % N).to(tl.int64)
    return offs_m, offs_n, offs_am, offs_bn, tl.arange(0, BLOCK_K)


@triton.jit
def k_tile_range(K, split_id, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """``(k_lo, k_hi)``: the K tiles ``[k_lo, k_hi)`` split ``split_id`` of ``SPLIT_K`` sums (all
    of them without split-K)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    if SPLIT_K > 1:
        k_per_split = tl.cdiv(k_tiles, SPLIT_K)
        k_lo = split_id * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, k_tiles)
    else:
        k_lo = 0
        k_hi = k_tiles
    return k_lo, k_hi


@triton.jit
def gemm_epilogue(acc, offs_m, offs_n, M, N,
                  a_scale_ptr, stride_as, b_scale_ptr, stride_bs, bias_ptr, stride_bias,
                  pre_ptr, stride_pm, stride_pn, res_ptr, stride_rm, stride_rn,
                  EPI_DTYPE: tl.constexpr, HAS_A_SCALE: tl.constexpr, HAS_B_SCALE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr, ACTIVATION: tl.constexpr,
                  ACT_PARAM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The fused epilogue on one (BLOCK_M, BLOCK_N) tile, in EPI_DTYPE: per-row and per-column
    scales -> bias -> (store the pre-activation) -> activation -> residual. Returns the tile;
    the caller casts and stores it (masked store or TMA store)."""
    offs_cm = offs_m.to(tl.int64)
    offs_cn = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    y = acc.to(EPI_DTYPE)
    if HAS_A_SCALE:
        sa = tl.load(a_scale_ptr + offs_cm * stride_as, mask=m_mask, other=0.0)
        y = y * sa.to(EPI_DTYPE)[:, None]
    if HAS_B_SCALE:
        sb = tl.load(b_scale_ptr + offs_cn * stride_bs, mask=n_mask, other=0.0)
        y = y * sb.to(EPI_DTYPE)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_cn * stride_bias, mask=n_mask, other=0.0)
        y = y + bias.to(EPI_DTYPE)[None, :]
    if SAVE_PRE:
        p_off = offs_cm[:, None] * stride_pm + offs_cn[None, :] * stride_pn
        tl.store(pre_ptr + p_off, y.to(pre_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
    y = apply_activation(y, ACTIVATION, ACT_PARAM)
    if HAS_RESIDUAL:
        r_off = offs_cm[:, None] * stride_rm + offs_cn[None, :] * stride_rn
        res = tl.load(res_ptr + r_off, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        y = y + res.to(EPI_DTYPE)
    return y


@triton.jit
def store_partial(ws_ptr, acc, pid_k, stride_ws, offs_m, offs_n, M, N):
    """Write one split's accumulator tile into the (SPLIT_K, M, N) workspace."""
    off = offs_m.to(tl.int64)[:, None] * N + offs_n.to(tl.int64)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(ws_ptr + pid_k.to(tl.int64) * stride_ws + off, acc, mask=mask)


@triton.jit
def splitk_reduce_kernel(
    ws_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, res_ptr, pre_ptr,
    M, N, stride_ws, stride_cm, stride_cn, stride_rm, stride_rn, stride_as, stride_bs,
    stride_bias,
    SPLIT_K: tl.constexpr, EPI_DTYPE: tl.constexpr, HAS_A_SCALE: tl.constexpr,
    HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr,
    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """C = epilogue(sum over s = 0, 1, ..., SPLIT_K-1 of ws[s]): a fixed summation order."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n.to(tl.int64)[None, :]
    acc = tl.load(ptrs, mask=mask, other=0)
    for _s in tl.static_range(1, SPLIT_K):
        ptrs += stride_ws
        acc += tl.load(ptrs, mask=mask, other=0)
    y = gemm_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, stride_as, b_scale_ptr, stride_bs,
                      bias_ptr, stride_bias, pre_ptr, stride_cm, stride_cn, res_ptr, stride_rm,
                      stride_rn, EPI_DTYPE, HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, SAVE_PRE,
                      ACTIVATION, ACT_PARAM, HAS_RESIDUAL)
    c_off = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptr + c_off, y.to(c_ptr.dtype.element_ty), mask=mask)


_REDUCE_RUNTIME = splitk_reduce_kernel.arg_names.index("SPLIT_K")
REDUCE_BLOCK = (32, 64)


def reduce_params(M: int, N: int, split: int, epi: dict) -> tuple:
    """(grid, constexprs, options) of the reduction for one signature (``epi``: the epilogue
    constexprs EPI_DTYPE, HAS_A_SCALE, ... as the GEMM kernels take them)."""
    bm, bn = REDUCE_BLOCK
    cfg = dict(epi, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    consts, opts = split_constexprs(splitk_reduce_kernel, _REDUCE_RUNTIME, cfg)
    return (triton.cdiv(M, bm), triton.cdiv(N, bn)), consts, opts


def launch_reduce(params, ws, c, a_scale, b_scale, bias, residual, pre):
    """Run the reduction of ``ws`` (SPLIT_K, M, N) into ``c`` (M, N) with the epilogue."""
    grid, consts, opts = params
    M, N = c.shape
    dummy = c
    res = residual if residual is not None else dummy
    splitk_reduce_kernel[grid](
        ws, c, a_scale if a_scale is not None else dummy,
        b_scale if b_scale is not None else dummy, bias if bias is not None else dummy, res,
        pre if pre is not None else dummy, M, N, M * N, c.stride(0), c.stride(1),
        res.stride(0), res.stride(1), a_scale.stride(0) if a_scale is not None else 0,
        b_scale.stride(0) if b_scale is not None else 0,
        bias.stride(0) if bias is not None else 0, *consts, **opts)
    return c


# ------------------------------------------------------------------------------------------------
# the SM-filling rule (pure: tests pass an H100 profile)
# ------------------------------------------------------------------------------------------------
def default_sms() -> int:
    """SMs of the current CUDA device; the interpreter's pseudo-device without one (where the
    AOT check substitutes the H100 profile)."""
    if torch.cuda.is_available():
        return sm_count(torch.device("cuda", torch.cuda.current_device()))
    return sm_count("cpu")


def fill_sms(cfg: dict, M: int, N: int, K: int, sms: int) -> dict:
    """Small-M rule: when the tiles of ``cfg`` give fewer programs than ``sms``, narrow the N
    tile to 64, then the M tile to 64, then the N tile to :data:`MIN_BLOCK_N`, and if that is
    still short split K over ``ceil(sms / tiles)`` programs (at most :data:`MAX_SPLIT_K`, each
    with at least :data:`MIN_K_TILES_PER_SPLIT` K tiles; BLOCK_K halves, down to
    :data:`MIN_BLOCK_K`, while K is too short for that many splits). Returns a new config with
    ``SPLIT_K``; the grid is then ``tiles * SPLIT_K`` (>= ``sms`` unless K is too short)."""
    c = dict(cfg)
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]

    def tiles():
        return triton.cdiv(M, bm) * triton.cdiv(N, bn)

    while tiles() < sms and bn > 64:
        bn //= 2
    while tiles() < sms and bm > 64 and M > bm // 2:
        bm //= 2
    while tiles() < sms and bn > MIN_BLOCK_N:
        bn //= 2
    split = 1
    while tiles() < sms:
        k_tiles = triton.cdiv(K, bk)
        split = max(1, min(triton.cdiv(sms, tiles()), k_tiles // MIN_K_TILES_PER_SPLIT,
                           MAX_SPLIT_K))
        if tiles() * split >= sms or bk <= MIN_BLOCK_K or split == MAX_SPLIT_K:
            break
        bk //= 2  # K too short for enough splits of this BLOCK_K: shorter K steps
    c.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split)
    if bm * bn <= 64 * 64 and c.get("num_warps", 4) > 4:
        c["num_warps"] = 4  # 8 warps on a 64x64 (or smaller) tile only adds idle threads
    return c


def grid_size(cfg: dict, M: int, N: int) -> int:
    """Programs a (non-persistent) launch of ``cfg`` runs: tiles x SPLIT_K."""
    return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
            * cfg.get("SPLIT_K", 1))


def clamp_split(cfg: dict, K: int) -> int:
    """SPLIT_K of ``cfg`` limited to the number of K tiles (a tuned entry may come from a
    bucket with a longer K)."""
    return max(1, min(int(cfg.get("SPLIT_K", 1)), triton.cdiv(K, cfg["BLOCK_K"])))


# ------------------------------------------------------------------------------------------------
# the path decision (one place for matmul/linear and int8_matmul)
# ------------------------------------------------------------------------------------------------
_TMA_DEVICES: dict = {}
TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)
# Treat CPU tensors as an sm_90 device in the path decision: the interpreter tests of the TMA
# dispatch and tools/aot_check.py set it (the interpreter runs tensor descriptors).
TMA_ON_CPU = False


def tma_capable(index: int) -> bool:
    """True for a CUDA device index (``tensor.get_device()``) of an sm_90 (Hopper) GPU: TMA +
    wgmma and 227 KB of shared memory per block, what the persistent kernel's tiles are sized
    for (cached); for -1 (CPU) only under :data:`TMA_ON_CPU`."""
    if index < 0:
        return TMA_ON_CPU
    try:
        return _TMA_DEVICES[index]
    except KeyError:
        ok = torch.cuda.get_device_capability(index)[0] == 9
        _TMA_DEVICES[index] = ok
        return ok


def operand_layout(t: torch.Tensor) -> str | None:
    """How a 2-D operand can be described to TMA: ``"row"`` (last dim contiguous, row stride a
    multiple of 16 bytes), ``"col"`` (first dim contiguous, column stride aligned) or None."""
    s0, s1 = t.stride()
    es = t.element_size()
    if s1 == 1 and (s0 * es) % 16 == 0 and s0 > 0:
        return "row"
    if s0 == 1 and (s1 * es) % 16 == 0 and s1 > 0:
        return "col"
    return None


def gemm_path(a: torch.Tensor, b: torch.Tensor, tf32: bool = False) -> tuple:
    """The one path decision for ``a (M, K) @ b (K, N)``: ``("tma", a_layout, b_layout)`` when
    the device is sm_90, the dtypes are fp16/bf16, fp32 with TF32, or int8 x int8, both operands
    have a unit stride with the other stride and the base 16-byte aligned (what TMA requires),
    and 32-bit/int8 operands are K-major (``a`` row-major, ``b`` column-major: wgmma reads them
    only that way); else ``("classic", None, None)``."""
    if a.dim() != 2 or b.dim() != 2 or not tma_capable(a.get_device()):
        return ("classic", None, None)
    layouts = tma_layouts(a, b, tf32)
    if layouts is None or (a.data_ptr() | b.data_ptr()) % 16:
        return ("classic", None, None)
    return ("tma",) + layouts


def tma_layouts(a: torch.Tensor, b: torch.Tensor, tf32: bool = False) -> tuple | None:
    """The part of :func:`gemm_path` that shapes, strides and dtypes decide (not the device,
    not the base addresses): ``(a_layout, b_layout)`` for operands TMA can read when their
    bases are 16-byte aligned on an sm_90 device, else None. Per-signature plans bind both
    paths of such operands and test the bases per call."""
    dt = a.dtype
    if dt not in TMA_DTYPES or b.dtype != dt or (dt == torch.float32 and not tf32):
        return None
    la, lb = operand_layout(a), operand_layout(b)
    if la is None or lb is None or (dt.itemsize != 2 and (la != "row" or lb != "col")):
        return None
    return la, lb


def describe_path(device) -> str:
    """One line for ``tilefuse info``: which GEMM kernel ``matmul``/``linear``/``int8_matmul``
    launch on ``device``."""
    small = "small-M grids filled to the SM count by narrower tiles + deterministic split-K"
    dev = torch.device(device)
    if dev.type == "cuda" and tma_capable(dev.index if dev.index is not None
                                          else torch.cuda.current_device()):
        return ("persistent TMA kernel (sm_90; fp16/bf16, fp32+TF32, int8 K-major; 16-byte "
                "aligned operands), else the grouped-order kernel; " + small)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"grouped-order cp.async kernel (sm_{major}{minor}: no TMA path); " + small
    return (f"grouped-order kernel (interpreter/CPU: no TMA path; {INTERPRETER_SMS} pseudo-SMs); "
            + small)

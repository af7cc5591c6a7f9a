"""Coalesced, grouped-order matmul with a fused epilogue.

C[b] = act(A[b] @ B[b] + bias) + residual[b], for A: (BATCH, M, K) and B: (BATCH, K, N) with
arbitrary strides (stride 0 broadcasts a batch). Programs are ordered in super-groups of
``GROUP_M`` row-blocks so that consecutive programs reuse the same B columns and A rows from L2
(Triton tutorial 03). Offsets into the operands are computed in int64, so tensors with more than
2^31 elements are addressed correctly. fp32 accumulation (fp64 for fp64 inputs); output cast in
the epilogue.

Small M (<= ``gemm_common.SMALL_M``): the heuristic fills the device's SMs with narrower tiles
and split-K (``SPLIT_K`` programs per tile write fp32 partials; a fixed-order reduction applies
the epilogue). On sm_90, 2-D problems with TMA-compatible operands run the persistent TMA kernel
of :mod:`tilefuse.kernels.matmul_tma` instead; :func:`tilefuse.kernels.gemm_common.gemm_path`
makes that choice in one place (docs/gemm.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import gemm_common as _gc
from tilefuse.kernels import launch_cache, next_pow2, sm_count, split_constexprs
from tilefuse.kernels.dropout import RNG_Q, keep_mask
from tilefuse.kernels.gemm_common import (SMALL_M, clamp_split, default_sms, fill_sms,
                                          gemm_epilogue, grouped_pid, k_tile_range,
                                          launch_reduce, reduce_params, store_partial,
                                          tile_offsets)
from tilefuse.kernels.matmul_tma import c_tma_ok, launch_tma, tma_params

__all__ = ["grouped_pid", "matmul_kernel", "heuristic_config", "get_config", "launch_matmul",
           "bind_matmul"]

MAX_GRID_Y = 65535


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, pre_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_rb, stride_rm, stride_rn,
    stride_bias,
    dc_seed_ptr, dc_p, dc_scale, dc_stride_k, dc_stride_n, ws_ptr, stride_ws,
    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE_PRE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr = 1, HAS_DROPCONNECT: tl.constexpr = False, DC_Q: tl.constexpr = RNG_Q,
):
    pid_b = tl.program_id(1).to(tl.int64)
    # wrap out-of-range rows/cols instead of masking every load (results are masked on store)
    offs_m, offs_n, offs_am, offs_bn, offs_k = tile_offsets(tl.program_id(0), M, N, BLOCK_M,
                                                            BLOCK_N, BLOCK_K, GROUP_M)

    a_base = a_ptr + pid_b * stride_ab + offs_am[:, None] * stride_am
    b_base = b_ptr + pid_b * stride_bb + offs_bn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if HAS_DROPCONNECT:  # the seed lives on the device (0-d int64): no host read
        dc_seed = tl.load(dc_seed_ptr)
    k_lo, k_hi = k_tile_range(K, tl.program_id(2), BLOCK_K, SPLIT_K)  # split: program_id(2)
    for k0 in range(k_lo, k_hi):
        kk = k0 * BLOCK_K + offs_k
        k_mask = kk < K
        kk64 = kk.to(tl.int64)
        a = tl.load(a_base + kk64[None, :] * stride_ak, mask=k_mask[None, :], other=0.0)
        b = tl.load(b_base + kk64[:, None] * stride_bk, mask=k_mask[:, None], other=0.0)
        if HAS_DROPCONNECT:  # DropConnect: drop B entries (mask from seed + B's logical index)
            ridx = kk64[:, None] * dc_stride_k + offs_bn[None, :] * dc_stride_n
            b = tl.where(keep_mask(dc_seed, ridx, dc_p, DC_Q), b, tl.zeros_like(b))
        if UPCAST:  # the interpreter's tl.dot is wrong for bf16: feed it fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # out_dtype must name the accumulator dtype on triton 3.6 (it defaults to fp32 there)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_DROPCONNECT:  # survivors' 1/(1-p) applied once to the accumulator
        acc = acc * dc_scale
    if SPLIT_K > 1:  # fp32 partial of this split; the reduction kernel runs the epilogue
        store_partial(ws_ptr, acc, tl.program_id(2), stride_ws, offs_m, offs_n, M, N)
    else:
        # ---- epilogue: bias -> (save pre-activation) -> activation -> residual -> cast ----
        c_base = c_ptr + pid_b * stride_cb
        y = gemm_epilogue(acc, offs_m, offs_n, M, N, bias_ptr, 0, bias_ptr, 0, bias_ptr,
                          stride_bias, pre_ptr + pid_b * stride_cb, stride_cm, stride_cn,
                          res_ptr + pid_b * stride_rb, stride_rm, stride_rn, ACC_DTYPE, False,
                          False, HAS_BIAS, SAVE_PRE, ACTIVATION, ACT_PARAM, HAS_RESIDUAL)
        c_off = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_base + c_off, y.to(c_ptr.dtype.element_ty), mask=c_mask)


def heuristic_config(M: int, N: int, K: int, dtype: torch.dtype, sms: int | None = None,
                     tma: bool = False, heavy_epilogue: bool = False) -> dict:
    """Default block config; :mod:`tilefuse.autotune` replaces it with tuned entries.

    ``sms``: the device's SM count (default: :func:`tilefuse.kernels.gemm_common.default_sms`;
    the interpreter's pseudo-device counts as a device, so the CPU lane runs the same rule):
    for M <= ``SMALL_M`` the tiles narrow and K is split until the grid covers every SM
    (:func:`tilefuse.kernels.gemm_common.fill_sms`; not for fp64, whose partials would need fp64).
    ``tma``: the operands take the persistent TMA path (sm_90), which gets 128x256 tiles for
    large half-precision problems; ``heavy_epilogue`` (an activation or a residual) keeps them
    at 128x128: the activation's temporaries on 128 accumulator registers per thread spill
    (tools/aot_check.py, docs/gemm.md)."""
    sms = default_sms() if sms is None else int(sms)
    half = dtype in (torch.float16, torch.bfloat16)
    if interpreter_enabled():
        # the interpreter's cost is per program: few, large tiles
        cfg = dict(BLOCK_M=max(16, min(64, next_pow2(M))), BLOCK_N=max(16, min(64, next_pow2(N))),
                   BLOCK_K=max(16, min(64, next_pow2(K))), GROUP_M=8, num_warps=4, num_stages=1)
    elif tma and M > SMALL_M:
        # persistent TMA (tutorial 09 tiles): 128x256x64 / 8 warps / 3 stages for half,
        # 128x128x32 for fp32 (TF32); 2 warp groups share the tile
        bn = 256 if half and N > 128 and not heavy_epilogue else 128
        cfg = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64 if half else 32, GROUP_M=8, num_warps=8,
                   num_stages=3)
    else:
        block_k = 64 if half else 32
        if M <= 16:
            bm, bn, warps = 16, 64, 4
        elif M <= 64:
            bm, bn, warps = 64, 64, 4
        else:
            # fp32 (ieee or tf32) 128x128 tiles spill with 4 warps on sm_90 (tools/aot_check.py)
            bm, bn, warps = 128, (128 if N > 64 else 64), 8
        if dtype == torch.float64:
            bm, bn, block_k, warps = min(bm, 64), 64, 16, 4
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, GROUP_M=8, num_warps=warps,
                   num_stages=3 if half else 2)
    if M <= SMALL_M and dtype != torch.float64:
        cfg = fill_sms(cfg, M, N, K, sms)
    else:
        cfg["SPLIT_K"] = 1
    return cfg


def get_config(M: int, N: int, K: int, dtype: torch.dtype, flags: tuple = (),
               b_k_contiguous: bool = False, tf32: bool = False, sms: int | None = None,
               tma: bool = False) -> dict:
    """Config for this problem: tuned DB entry if one exists, else the heuristic.

    The tuning key carries B's layout (``"nt"``: K contiguous, as ``linear`` reads ``weight.T``;
    ``"nn"`` otherwise), for fp32 whether TF32 is on, and whether the persistent TMA kernel
    runs it (``"tma"``): all change the best tiles."""
    heavy = bool(flags) and (flags[0] != 0 or bool(flags[2:3] and flags[2]))
    default = heuristic_config(M, N, K, dtype, sms, tma, heavy)
    try:
        from tilefuse.autotune import lookup
    except ImportError:  # pragma: no cover
        return default
    key = dict(M=M, N=N, K=K, dtype=str(dtype).replace("torch.", ""), flags=flags)
    if b_k_contiguous:
        key["layout"] = "nt"
    if tf32 and dtype == torch.float32:
        key["tf32"] = True
    if tma:
        key["tma"] = True
    return lookup("matmul", key, default)


_LAUNCH = launch_cache()


def _strides3(t) -> tuple:
    """(batch, row, col) strides of a 2-D (batch stride 0) or 3-D operand."""
    st = t.stride()
    return (0,) + st if len(st) == 2 else st


def _launch_params(M, N, K, dtype, activation, act_param, has_bias, has_res, has_pre,
                   b_k_contiguous, tf32, dropconnect, path, c_tma, batched, out_size, device,
                   config):
    """``(kernel, params, reduce params or None, SPLIT_K)`` for one problem signature (cached by
    :func:`launch_matmul`); ``kernel`` is ``"tma"`` or ``"classic"``."""
    sms = sm_count(device)
    tma = path[0] == "tma"
    if config is None:
        config = get_config(M, N, K, dtype, (activation, has_bias, has_res),
                            b_k_contiguous=b_k_contiguous, tf32=tf32, sms=sms, tma=tma)
    cfg = dict(config)
    tma = tma and bool(cfg.pop("TMA", True))  # a tuned entry may prefer the classic kernel
    split = 1 if (dropconnect or batched or dtype == torch.float64) else clamp_split(cfg, K)
    cfg["SPLIT_K"] = split
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    upcast = bool(interpreter_enabled() and dtype == torch.bfloat16)
    precision = "tf32" if tf32 else "ieee"
    epi = dict(EPI_DTYPE=acc, HAS_A_SCALE=False, HAS_B_SCALE=False, HAS_BIAS=has_bias,
               SAVE_PRE=has_pre, ACTIVATION=activation, ACT_PARAM=float(act_param),
               HAS_RESIDUAL=has_res)
    reduce = reduce_params(M, N, split, epi) if split > 1 else None
    if tma:
        es = 4 if dtype == torch.float32 else 2
        return "tma", tma_params(M, N, K, path[1], path[2], c_tma, cfg, epi, acc, False,
                                 precision, upcast, sms, (es, out_size)), reduce, split
    cfg.pop("WARP_SPEC", None)  # the persistent TMA kernel's tuning option (matmul_tma)
    if dropconnect and not interpreter_enabled():
        # the in-loop Philox mask adds registers: 4-warp fp32 tiles spill (tools/aot_check.py)
        cfg["num_warps"] = max(cfg.get("num_warps", 4), 8)
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    grid_x = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    cfg.update(ACTIVATION=activation, ACT_PARAM=float(act_param), HAS_BIAS=has_bias,
               HAS_RESIDUAL=has_res, SAVE_PRE=has_pre, INPUT_PRECISION=precision,
               ACC_DTYPE=acc, UPCAST=upcast, HAS_DROPCONNECT=dropconnect)
    consts, opts = split_constexprs(matmul_kernel, _N_RUNTIME, cfg)
    return "classic", (grid_x, consts, opts), reduce, split


# matmul_kernel's runtime parameters (pointers, sizes, strides, DropConnect) come first
_N_RUNTIME = matmul_kernel.arg_names.index("ACTIVATION")
_CLASSIC = ("classic", None, None)


def launch_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias=None, residual=None,
                  pre=None, activation: int = 0, act_param: float = 0.0, allow_tf32: bool = False,
                  config: dict | None = None, dropconnect: tuple | None = None) -> torch.Tensor:
    """Launch on a (BATCH, M, K), b (BATCH, K, N), c (BATCH, M, N), or the 2-D forms (M, K),
    (K, N), (M, N) of a single product (no batch views needed); a 2-D operand next to 3-D ones
    is broadcast over the batch (stride 0).

    ``residual`` is shaped like c with any strides (0 to broadcast); ``bias`` is (N,).
    ``pre`` (same shape as c) receives the pre-activation when given.
    ``dropconnect=(seed, p, stride_k, stride_n)`` (``seed``: 0-d int64 tensor on the operands'
    device, read by the kernel) drops B[k, n] unless
    ``keep_mask(seed, k*stride_k + n*stride_n, p)`` and scales the product by 1/(1-p)
    (the same keep rule as :mod:`tilefuse.kernels.dropout`; BATCH must be 1).
    2-D products go to the persistent TMA kernel where
    :func:`tilefuse.kernels.gemm_common.gemm_path` allows it (sm_90, aligned operands).
    The launch parameters of a signature are computed once (:func:`tilefuse.kernels.launch_cache`).
    """
    M, K = a.shape[-2], a.shape[-1]
    N = b.shape[-1]
    batched = c.dim() == 3
    batch = c.shape[0] if batched else 1
    if batch == 0 or M == 0 or N == 0:
        return c
    tf32 = bool(allow_tf32 and a.dtype == torch.float32 and a.is_cuda)
    has_bias, has_res, has_pre = bias is not None, residual is not None, pre is not None
    path, c_tma = _CLASSIC, False
    if not batched and dropconnect is None and (a.is_cuda or _gc.TMA_ON_CPU):
        path = _gc.gemm_path(a, b, tf32)
        c_tma = path[0] == "tma" and c_tma_ok(c)
    sb = b.stride()
    sig = (M, N, K, a.dtype, activation, act_param, has_bias, has_res, has_pre,
           sb[-2] == 1 and N > 1 and K > 1, tf32, dropconnect is not None, path, c_tma, batched,
           c.element_size(), a.get_device())
    params = _LAUNCH.get(sig) if config is None else None
    if params is None:
        params = _launch_params(*sig[:-1], a.device, config)
        if config is None:
            _LAUNCH[sig] = params
    kind, main, reduce, split = params
    ws = None
    if split > 1:  # the GEMM writes fp32 partials; the reduction applies the epilogue into c
        ws = torch.empty((split, M, N), device=a.device, dtype=torch.float32)
    if kind == "tma":
        launch_tma(main, a, b, c, ws=ws, bias=bias, residual=residual, pre=pre,
                   a_layout=path[1], b_layout=path[2])
    else:
        _launch_classic(main, split, a, b, c, ws, bias, residual, pre, dropconnect)
    if reduce is not None:
        launch_reduce(reduce, ws, c, None, None, bias, residual, pre)
    return c


def bind_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias=None, residual=None,
                activation: int = 0, act_param: float = 0.0, allow_tf32: bool = False,
                save_pre: bool = False):
    """``launch(a, b, bias, residual) -> c``: a new ``c`` (``c``'s dtype and device) and
    :func:`launch_matmul` into it (no DropConnect), for 2-D operands of the same shapes,
    strides, dtypes and device as these, with every non-tensor argument computed here once (the
    eager plans of :mod:`tilefuse.fused.matmul`). ``save_pre``: the launch also writes the
    pre-activation into a new ``pre`` (``a``'s dtype) and returns ``(c, pre)``. None where a
    launch needs per-call work: batched, empty or split-K.

    Operands that the persistent TMA kernel can read (:func:`tilefuse.kernels.gemm_common.
    tma_layouts`) take it only when both bases are 16-byte aligned on an sm_90 device, which the
    plan key does not hold: such a plan binds both launches and tests the bases per call, as
    :func:`launch_matmul` does."""
    M, K = a.shape
    N = b.shape[1]
    if c.dim() != 2 or M == 0 or N == 0:
        return None
    tf32 = bool(allow_tf32 and a.dtype == torch.float32 and a.is_cuda)
    args = (a, b, c, bias, residual, activation, act_param, tf32, save_pre)
    # CPU tensors: the layouts whatever TMA_ON_CPU says now (the plan reads it per call)
    layouts = (_gc.tma_layouts(a, b, tf32) if not a.is_cuda or _gc.tma_capable(a.get_device())
               else None)
    if layouts is None:
        return _bind_path(_CLASSIC, False, *args)
    # both launches: the one a call of this device usually takes is the plan and tests, per
    # call, whether this call takes the other (one Python frame less than a dispatcher)
    tma_path = ("tma",) + layouts
    if not a.is_cuda:
        tma = _bind_path(tma_path, c_tma_ok(c), *args)
        return None if tma is None else _bind_path(_CLASSIC, False, *args, other=tma)
    classic = _bind_path(_CLASSIC, False, *args)
    return None if classic is None else _bind_path(tma_path, c_tma_ok(c), *args, other=classic)


def _bind_path(path, c_tma, a, b, c, bias, residual, activation, act_param, tf32, save_pre,
               other=None):
    """:func:`bind_matmul`'s launch on one ``path`` (:func:`tilefuse.kernels.gemm_common.
    gemm_path`'s answer), or None for split-K. ``other``: the launch of the other path, which
    a call takes instead where its operands say so: a classic launch (CPU tensors) hands a call
    to the TMA one under ``TMA_ON_CPU`` with both bases 16-byte aligned; a TMA launch hands a
    call with a misaligned base to the classic one."""
    M, K = a.shape
    N = b.shape[1]
    sb = b.stride()
    sig = (M, N, K, a.dtype, activation, act_param, bias is not None, residual is not None,
           save_pre, sb[-2] == 1 and N > 1 and K > 1, tf32, False, path, c_tma, False,
           c.element_size())
    kind, main, _, split = _launch_params(*sig, a.device, None)
    if split > 1:
        return None
    dev, dtype = c.device, c.dtype
    same = dtype == a.dtype
    if kind == "tma":
        la, lb = path[1], path[2]

        def launch_tma_pre(a, b, bias, residual):
            if other is not None and (a.data_ptr() | b.data_ptr()) % 16:
                return other(a, b, bias, residual)
            # Tensor.new_empty(ints) is the cheapest allocation (~0.8 us)
            c = a.new_empty(M, N) if same else torch.empty(M, N, device=dev, dtype=dtype)
            pre = a.new_empty(M, N) if save_pre else None
            launch_tma(main, a, b, c, bias=bias, residual=residual, pre=pre, a_layout=la,
                       b_layout=lb)
            return (c, pre) if save_pre else c

        return launch_tma_pre
    grid_x, consts, opts = main
    if set(opts) != {"num_warps", "num_stages"}:
        return None
    # the pointers the kernel never reads here (DropConnect seed, split-K workspace): one
    # element of c's dtype, as aligned as c (the same specialization as launch_matmul's)
    unused = torch.empty(1, device=dev, dtype=dtype)
    sr = _strides3(residual) if residual is not None else _strides3(c)
    # every argument after the six leading pointers, as _launch_classic passes them
    rest = (M, N, K, *_strides3(a), *_strides3(b), *_strides3(c), *sr,
            bias.stride(0) if bias is not None else 0, unused, 0.0, 1.0, 0, 0, unused, M * N,
            *consts)
    kw = dict(grid=(grid_x, 1, 1), warmup=False, num_warps=opts["num_warps"],
              num_stages=opts["num_stages"])  # (one prebuilt dict: cheaper than 4 keywords)
    kernel = matmul_kernel  # (``kernel.run`` is looked up per call: tools patch the class)

    def launch(a, b, bias, residual):
        if other is not None and _gc.TMA_ON_CPU and not (a.data_ptr() | b.data_ptr()) % 16:
            return other(a, b, bias, residual)
        c = a.new_empty(M, N) if same else torch.empty(M, N, device=dev, dtype=dtype)
        pre = a.new_empty(M, N) if save_pre else c
        kernel.run(a, b, c, c if bias is None else bias, c if residual is None else residual,
                   pre, *rest, **kw)
        return (c, pre) if save_pre else c

    # strides bound: any tensor with the same first element (not where a call may take the
    # TMA launch, which builds descriptors from the tensors' shapes)
    launch.pointers_only = other is None
    return launch


def _launch_classic(params, split, a, b, out, ws, bias, residual, pre, dropconnect):
    grid_x, consts, opts = params
    M, K = a.shape[-2], a.shape[-1]
    N = b.shape[-1]
    batch = out.shape[0] if out.dim() == 3 else 1
    sa, sb, sc = _strides3(a), _strides3(b), _strides3(out)
    has_bias, has_res, has_pre = bias is not None, residual is not None, pre is not None
    dummy = out
    dc_seed, dc_p, dc_sk, dc_sn = dropconnect if dropconnect is not None else (dummy, 0.0, 0, 0)
    res = residual if has_res else dummy
    sr = _strides3(res) if has_res else sc
    bias_arg = bias if has_bias else dummy
    pre_arg = pre if has_pre else dummy
    for start in range(0, batch, MAX_GRID_Y):
        stop = min(batch, start + MAX_GRID_Y)
        if batch > MAX_GRID_Y:  # the grid's y dimension is capped: launch in batch chunks
            sl = slice(start, stop)
            args = [t[sl] if t.dim() == 3 else t for t in (a, b, out, res, pre_arg)]
            args[4] = pre_arg[sl] if has_pre else dummy
        else:
            args = (a, b, out, res, pre_arg)
        matmul_kernel[(grid_x, stop - start, split)](
            args[0], args[1], args[2], bias_arg, args[3], args[4],
            M, N, K, *sa, *sb, *sc, *sr, bias.stride(0) if has_bias else 0,
            dc_seed, float(dc_p), float(1.0 / (1.0 - dc_p)), int(dc_sk), int(dc_sn),
            ws if ws is not None else dummy, M * N, *consts, **opts)

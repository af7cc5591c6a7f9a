"""Int8 GEMM with a fused epilogue, and weight-only int8 GEMM, in one kernel.

``C = act((A @ B) * a_scale[:, None] * b_scale[None, :] + bias) + residual`` for A: (M, K),
B: (K, N) with arbitrary strides (stride 0 broadcasts a per-tensor scale).

Two operand modes, picked by the ``A_IS_INT8`` constexpr (one kernel, not two near-copies):

* ``A_IS_INT8=True`` (W8A8): int8 x int8 ``tl.dot`` accumulating in int32 (exact). With
  ``RAW_INT32`` the int32 accumulator is stored as is (``torch._int_mm`` semantics: wraps on
  overflow, which cannot happen for K <= 131072); otherwise the epilogue converts it to fp32 and
  applies scales, bias, the shared activation helper and the residual, then casts to ``c``'s dtype.
* ``A_IS_INT8=False`` (weight-only): A is fp16/bf16/fp32, B is int8. B is dequantized in the load
  path: int8 -> A's dtype (exact, |q| <= 127), the dot runs in A's dtype with fp32 accumulation,
  and the per-output-channel scale is applied once per output element in the epilogue (it
  commutes with the sum over K, so this is the same math with K times fewer multiplies).

Programs are in grouped order (``GROUP_M`` row-blocks sweep the column-blocks together, as in
:mod:`tilefuse.kernels.matmul`); all pointer offsets are int64.

Decode-sized M: the SM-filling rule of :func:`tilefuse.kernels.gemm_common.fill_sms` (narrower
tiles, then split-K with int32 partials for W8A8, so the split result is bit-identical to the
unsplit one, fp32 for weight-only; the reduction applies the epilogue). On sm_90, W8A8 with a
row-major A and a K-major B (``qweight.t()`` of an (N, K) weight, what ``Int8Linear`` passes)
runs the persistent TMA kernel (:mod:`tilefuse.kernels.matmul_tma`); a row-major (K, N) B stays
on this kernel, whose int8 MMA then transposes B tiles in shared memory (docs/gemm.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import gemm_common as _gc
from tilefuse.kernels import launch_cache, next_pow2, sm_count, split_constexprs
from tilefuse.kernels.gemm_common import (SMALL_M, clamp_split, default_sms, fill_sms,
                                          gemm_epilogue, k_tile_range, launch_reduce,
                                          reduce_params, store_partial, tile_offsets)
from tilefuse.kernels.matmul_tma import c_tma_ok, launch_tma, tma_params


@triton.jit
def int8_matmul_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, res_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn,
    stride_as, stride_bs, stride_bias, ws_ptr, stride_ws,
    A_IS_INT8: tl.constexpr, RAW_INT32: tl.constexpr,
    HAS_A_SCALE: tl.constexpr, HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
):
    # out-of-range rows/cols wrap (their results are masked on store); only K is masked
    offs_m, offs_n, offs_am, offs_bn, offs_k = tile_offsets(tl.program_id(0), M, N, BLOCK_M,
                                                            BLOCK_N, BLOCK_K, GROUP_M)
    a_base = a_ptr + offs_am[:, None] * stride_am
    b_base = b_ptr + offs_bn[None, :] * stride_bn

    if A_IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo, k_hi = k_tile_range(K, tl.program_id(1), BLOCK_K, SPLIT_K)  # split: program_id(1)
    for k0 in range(k_lo, k_hi):
        kk = k0 * BLOCK_K + offs_k
        k_mask = kk < K
        kk64 = kk.to(tl.int64)
        a = tl.load(a_base + kk64[None, :] * stride_ak, mask=k_mask[None, :], other=0)
        b = tl.load(b_base + kk64[:, None] * stride_bk, mask=k_mask[:, None], other=0)
        if A_IS_INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # triton 3.6 needs out_dtype = acc's
        else:
            if UPCAST:  # the interpreter's tl.dot is wrong for bf16: feed it fp32
                a = a.to(tl.float32)
            b = b.to(a.dtype)  # dequantize in the load path (exact for int8 values)
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)

    if SPLIT_K > 1:  # int32 (W8A8) / fp32 partials; the reduction kernel runs the epilogue
        store_partial(ws_ptr, acc, tl.program_id(1), stride_ws, offs_m, offs_n, M, N)
    else:
        # RAW_INT32: EPI_DTYPE is int32 and no epilogue flag is set: the accumulator as is
        y = gemm_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, stride_as, b_scale_ptr,
                          stride_bs, bias_ptr, stride_bias, c_ptr, stride_cm, stride_cn, res_ptr,
                          stride_rm, stride_rn, tl.int32 if RAW_INT32 else tl.float32,
                          HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, False, ACTIVATION, ACT_PARAM,
                          HAS_RESIDUAL)
        c_off = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_ptr + c_off, y.to(c_ptr.dtype.element_ty), mask=c_mask)


def heuristic_config(M: int, N: int, K: int, a_is_int8: bool, a_is_fp32: bool = False,
                     sms: int | None = None, tma: bool = False) -> dict:
    """Block config. int8 MMA consumes K in steps of 32, so BLOCK_K is 64-128 on GPU; W8A8 on
    the persistent TMA path (sm_90) takes 128x256x128 tiles for large problems. For M <=
    ``SMALL_M`` the grid is filled to ``sms`` SMs (default: the current device's) by narrower
    tiles and split-K (:func:`tilefuse.kernels.gemm_common.fill_sms`). Unmeasured on GPU."""
    sms = default_sms() if sms is None else int(sms)
    if interpreter_enabled():
        # the interpreter's cost is per program: few, large tiles
        cfg = dict(BLOCK_M=max(16, min(64, next_pow2(M))),
                   BLOCK_N=max(16, min(64, next_pow2(N))),
                   BLOCK_K=max(32, min(128, next_pow2(K))), GROUP_M=8, num_warps=4, num_stages=1)
    elif a_is_fp32:  # weight-only, fp32 activations: fp32 MMA tiles must stay small to not spill
        cfg = dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4,
                   num_stages=3)
    elif tma and a_is_int8 and M > SMALL_M:
        # 3 stages x (128x128 + 256x128) int8 = 144 KB of shared memory, 2 warp groups
        cfg = dict(BLOCK_M=128, BLOCK_N=256 if N > 128 else 128, BLOCK_K=128, GROUP_M=8,
                   num_warps=8, num_stages=3)
    else:
        if M <= 16:  # decode: narrow N tiles so N=4096 still gives ~128 programs to stream K
            bm, bn, warps = 16, 32, 4
        elif M <= 64:
            bm, bn, warps = 64, 128, 4
        else:
            bm, bn, warps = 128, 128, 8
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128 if a_is_int8 else 64, GROUP_M=8,
                   num_warps=warps, num_stages=3)
    if M <= SMALL_M:
        return fill_sms(cfg, M, N, K, sms)
    cfg["SPLIT_K"] = 1
    return cfg


def get_config(M: int, N: int, K: int, a_is_int8: bool, a_is_fp32: bool = False,
               sms: int | None = None, tma: bool = False) -> dict:
    """Tuned DB entry (``tilefuse.autotune``, family ``int8_matmul``) if any, else the heuristic.
    The key names the persistent TMA path (``"tma"``) when it runs the problem."""
    default = heuristic_config(M, N, K, a_is_int8, a_is_fp32, sms, tma)
    try:
        from tilefuse.autotune import lookup
    except ImportError:
        return default
    mode = "w8a8" if a_is_int8 else ("w8a32" if a_is_fp32 else "w8a16")
    key = dict(M=M, N=N, K=K, mode=mode)
    if tma:
        key["tma"] = True
    return lookup("int8_matmul", key, default)


_LAUNCH = launch_cache()


def _launch_params(M, N, K, a_dtype, raw, has_sa, has_sb, has_bias, has_res, activation,
                   act_param, path, c_tma, device, config):
    """``(kernel, params, reduce params or None, SPLIT_K)`` for one signature (cached by the
    launcher); ``kernel`` is ``"tma"`` or ``"classic"``."""
    a_is_int8 = a_dtype == torch.int8
    if raw:  # the raw int32 accumulator: no epilogue, whatever else was passed
        has_sa = has_sb = has_bias = has_res = False
        activation, act_param = 0, 0.0
    sms = sm_count(device)
    tma = path[0] == "tma"
    cfg = dict(config if config is not None else
               get_config(M, N, K, a_is_int8, a_dtype == torch.float32, sms, tma))
    tma = tma and bool(cfg.pop("TMA", True))
    split = clamp_split(cfg, K)
    cfg["SPLIT_K"] = split
    upcast = bool(interpreter_enabled() and a_dtype == torch.bfloat16)
    epi = dict(EPI_DTYPE=tl.int32 if raw else tl.float32, HAS_A_SCALE=has_sa, HAS_B_SCALE=has_sb,
               HAS_BIAS=has_bias, SAVE_PRE=False, ACTIVATION=activation,
               ACT_PARAM=float(act_param), HAS_RESIDUAL=has_res)
    reduce = reduce_params(M, N, split, epi) if split > 1 else None
    if tma:
        return "tma", tma_params(M, N, K, path[1], path[2], c_tma, cfg, epi, tl.int32, True,
                                 "ieee", False, sms, (1, 4 if raw else 2)), reduce, split
    cfg.pop("WARP_SPEC", None)  # the persistent TMA kernel's tuning option (matmul_tma)
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
    cfg.update(A_IS_INT8=a_is_int8, RAW_INT32=raw, HAS_A_SCALE=has_sa, HAS_B_SCALE=has_sb,
               HAS_BIAS=has_bias, HAS_RESIDUAL=has_res, ACTIVATION=activation,
               ACT_PARAM=float(act_param), UPCAST=upcast)
    return ("classic", (grid,) + split_constexprs(int8_matmul_kernel, _N_RUNTIME, cfg), reduce,
            split)


_N_RUNTIME = int8_matmul_kernel.arg_names.index("A_IS_INT8")
_CLASSIC = ("classic", None, None)


def tma_state(a: torch.Tensor, b: torch.Tensor) -> int:
    """The part of the path decision that a plan key (shapes, strides, dtypes, device) does not
    hold: 0 when the device never takes the TMA kernel (or :data:`~tilefuse.kernels.gemm_common.
    TMA_ON_CPU` is off for CPU tensors), else 1 + whether both operands are 16-byte aligned."""
    if not _gc.tma_capable(a.get_device()):
        return 0
    return 1 + (not (a.data_ptr() | b.data_ptr()) % 16)


def _tma_off(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not _gc.TMA_ON_CPU


def plan_guard(a: torch.Tensor, b: torch.Tensor):
    """None when the path decision for operands of this signature cannot change (weight-only
    operands, a CUDA device without TMA), else ``guard(a, b)``: True while the decision is the
    one made for ``a``, ``b`` now (:func:`tma_state` unchanged)."""
    dev = a.get_device()
    if a.dtype != torch.int8 or (dev >= 0 and not _gc.tma_capable(dev)):
        return None
    state0 = tma_state(a, b)
    if dev < 0 and not state0:
        return _tma_off
    return lambda a, b: tma_state(a, b) == state0


def bind_int8_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a_scale=None,
                     b_scale=None, bias=None, residual=None, activation: int = 0,
                     act_param: float = 0.0, config: dict | None = None):
    """Everything of one launch that is not a tensor, bound once per signature: None when there
    is nothing to launch (M or N is 0), else the tuple :func:`launcher` takes. Launch
    parameters come from :func:`tilefuse.kernels.launch_cache`, strides from the tensors given:
    a later call with the same shapes, strides, dtypes and path may reuse the result."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return None
    path, c_tma = _CLASSIC, False
    if a.is_cuda or _gc.TMA_ON_CPU:
        path = _gc.gemm_path(a, b)
        c_tma = path[0] == "tma" and c_tma_ok(c)
    raw = c.dtype == torch.int32
    sig = (M, N, K, a.dtype, raw, a_scale is not None, b_scale is not None,
           bias is not None, residual is not None, activation, act_param, path, c_tma,
           a.get_device())
    params = _LAUNCH.get(sig) if config is None else None
    if params is None:
        params = _launch_params(*sig[:-1], a.device, config)
        if config is None:
            _LAUNCH[sig] = params
    kind, main, reduce, split = params
    # exact int32 partials for W8A8, fp32 for weight-only
    ws = ((split, M, N), torch.int32 if a.dtype == torch.int8 else torch.float32) \
        if split > 1 else None
    if kind == "tma":
        return ("tma", main, path, None, None, ws, reduce)
    grid, consts, opts = main
    res = residual if residual is not None else c
    scalars = (M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
               c.stride(1), res.stride(0), res.stride(1),
               a_scale.stride(0) if a_scale is not None else 0,
               b_scale.stride(0) if b_scale is not None else 0,
               bias.stride(0) if bias is not None else 0)
    return ("classic", grid, scalars, (M * N,) + consts, opts, ws, reduce)


def needs_views(bound) -> bool:
    """Whether the launch of ``bound`` reads the tensors' shapes and strides (the TMA kernel,
    the split-K reduction); else it only takes their data pointers (the strides are bound), so
    a plan may pass a view's base tensor."""
    return bound is not None and (bound[0] == "tma" or bound[6] is not None)


def _nothing(a, b, c, a_scale=None, b_scale=None, bias=None, residual=None):
    return c


def launcher(bound):
    """``launch(a, b, c, a_scale, b_scale, bias, residual) -> c``: the launch(es) of
    :func:`bind_int8_matmul`'s ``bound`` on tensors of its signature (the ones it was bound
    with, or tensors with their shapes, strides and dtypes). The one launch code of the op and
    of its per-signature plans."""
    if bound is None:
        return _nothing
    kind, main, scalars, tail, opts, ws_spec, reduce = bound
    kernel = int8_matmul_kernel  # (``kernel.run`` is looked up per call: tools patch the class)

    def launch(a, b, c, a_scale=None, b_scale=None, bias=None, residual=None):
        ws = None if ws_spec is None else c.new_empty(*ws_spec[0], dtype=ws_spec[1])
        if kind == "tma":
            launch_tma(main, a, b, c, ws=ws, a_scale=a_scale, b_scale=b_scale, bias=bias,
                       residual=residual, a_layout=scalars[1], b_layout=scalars[2])
        else:
            kernel.run(a, b, c, a_scale if a_scale is not None else c,
                       b_scale if b_scale is not None else c, bias if bias is not None else c,
                       residual if residual is not None else c, *scalars,
                       ws if ws is not None else c, *tail, grid=main, warmup=False, **opts)
        if reduce is not None:
            launch_reduce(reduce, ws, c, a_scale, b_scale, bias, residual, None)
        return c
    return launch


def launch_int8_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a_scale=None,
                       b_scale=None, bias=None, residual=None, activation: int = 0,
                       act_param: float = 0.0, config: dict | None = None) -> torch.Tensor:
    """Launch on 2-D operands: a (M, K) int8 or float, b (K, N) int8, c (M, N).

    ``c`` int32 selects the raw mode (no epilogue). ``a_scale`` is (M,), ``b_scale`` and ``bias``
    are (N,) and ``residual`` is (M, N); any strides (0 broadcasts). W8A8 with TMA-compatible
    operands on sm_90 runs the persistent TMA kernel
    (:func:`tilefuse.kernels.gemm_common.gemm_path`). :func:`bind_int8_matmul` then its
    :func:`launcher` (the per-signature plans of :mod:`tilefuse.fused.int8` keep the launcher).
    """
    bound = bind_int8_matmul(a, b, c, a_scale, b_scale, bias, residual, activation, act_param,
                             config)
    return launcher(bound)(a, b, c, a_scale, b_scale, bias, residual)

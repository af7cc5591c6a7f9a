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
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, split_constexprs
from tilefuse.kernels.activations import apply_activation
from tilefuse.kernels.matmul import grouped_pid


@triton.jit
def int8_matmul_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, res_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn,
    stride_as, stride_bs, stride_bias,
    A_IS_INT8: tl.constexpr, RAW_INT32: tl.constexpr,
    HAS_A_SCALE: tl.constexpr, HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows/cols wrap (their results are masked on store); only K is masked
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + offs_am[:, None] * stride_am
    b_base = b_ptr + offs_bn[None, :] * stride_bn

    if A_IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
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

    offs_cm = offs_m.to(tl.int64)
    offs_cn = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    c_mask = m_mask[:, None] & n_mask[None, :]
    c_off = offs_cm[:, None] * stride_cm + offs_cn[None, :] * stride_cn
    if RAW_INT32:
        tl.store(c_ptr + c_off, acc, mask=c_mask)
    else:
        y = acc.to(tl.float32)
        if HAS_A_SCALE:
            sa = tl.load(a_scale_ptr + offs_cm * stride_as, mask=m_mask, other=0.0)
            y = y * sa.to(tl.float32)[:, None]
        if HAS_B_SCALE:
            sb = tl.load(b_scale_ptr + offs_cn * stride_bs, mask=n_mask, other=0.0)
            y = y * sb.to(tl.float32)[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_cn * stride_bias, mask=n_mask, other=0.0)
            y = y + bias.to(tl.float32)[None, :]
        y = apply_activation(y, ACTIVATION, ACT_PARAM)
        if HAS_RESIDUAL:
            r_off = offs_cm[:, None] * stride_rm + offs_cn[None, :] * stride_rn
            res = tl.load(res_ptr + r_off, mask=c_mask, other=0.0)
            y = y + res.to(tl.float32)
        tl.store(c_ptr + c_off, y.to(c_ptr.dtype.element_ty), mask=c_mask)


def heuristic_config(M: int, N: int, K: int, a_is_int8: bool, a_is_fp32: bool = False) -> dict:
    """Block config. int8 MMA consumes K in steps of 32, so BLOCK_K is 64-128 on GPU; decode
    shapes (M <= 16) use 16x32 tiles so the weight streams once across many programs.
    Unmeasured on GPU."""
    if interpreter_enabled():
        # the interpreter's cost is per program: few, large tiles
        return dict(BLOCK_M=max(16, min(64, next_pow2(M))),
                    BLOCK_N=max(16, min(64, next_pow2(N))),
                    BLOCK_K=max(32, min(128, next_pow2(K))), GROUP_M=8, num_warps=4, num_stages=1)
    block_k = 128 if a_is_int8 else 64
    if a_is_fp32:  # weight-only with fp32 activations: fp32 MMA tiles must stay small to not spill
        return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4,
                    num_stages=3)
    if M <= 16:  # decode: narrow N tiles so N=4096 still gives ~128 programs to stream K
        bm, bn, warps = 16, 32, 4
    elif M <= 64:
        bm, bn, warps = 64, 128, 4
    else:
        bm, bn, warps = 128, 128, 8
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=3)


def get_config(M: int, N: int, K: int, a_is_int8: bool, a_is_fp32: bool = False) -> dict:
    """Tuned DB entry (``tilefuse.autotune``, family ``int8_matmul``) if any, else the heuristic."""
    default = heuristic_config(M, N, K, a_is_int8, a_is_fp32)
    try:
        from tilefuse.autotune import lookup
    except ImportError:
        return default
    mode = "w8a8" if a_is_int8 else ("w8a32" if a_is_fp32 else "w8a16")
    return lookup("int8_matmul", dict(M=M, N=N, K=K, mode=mode),
                  default)


_LAUNCH = launch_cache()


def _launch_params(M, N, K, a_dtype, raw, has_sa, has_sb, has_bias, has_res, activation,
                   act_param, config):
    """(grid, constexprs, launch options) for one signature (cached by the launcher)."""
    a_is_int8 = a_dtype == torch.int8
    cfg = dict(config if config is not None else
               get_config(M, N, K, a_is_int8, a_dtype == torch.float32))
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    cfg.update(A_IS_INT8=a_is_int8, RAW_INT32=raw, HAS_A_SCALE=has_sa, HAS_B_SCALE=has_sb,
               HAS_BIAS=has_bias, HAS_RESIDUAL=has_res, ACTIVATION=activation,
               ACT_PARAM=float(act_param),
               UPCAST=bool(interpreter_enabled() and a_dtype == torch.bfloat16))
    return (grid,) + split_constexprs(int8_matmul_kernel, _N_RUNTIME, cfg)


_N_RUNTIME = int8_matmul_kernel.arg_names.index("A_IS_INT8")


def launch_int8_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a_scale=None,
                       b_scale=None, bias=None, residual=None, activation: int = 0,
                       act_param: float = 0.0, config: dict | None = None) -> torch.Tensor:
    """Launch on 2-D operands: a (M, K) int8 or float, b (K, N) int8, c (M, N).

    ``c`` int32 selects the raw mode (no epilogue). ``a_scale`` is (M,), ``b_scale`` and ``bias``
    are (N,) and ``residual`` is (M, N); any strides (0 broadcasts). Launch parameters are
    computed once per signature (:func:`tilefuse.kernels.launch_cache`).
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c
    sig = (M, N, K, a.dtype, c.dtype == torch.int32, a_scale is not None, b_scale is not None,
           bias is not None, residual is not None, activation, act_param)
    params = _LAUNCH.get(sig) if config is None else None
    if params is None:
        params = _launch_params(*sig, config)
        if config is None:
            _LAUNCH[sig] = params
    grid, consts, opts = params
    dummy = c
    res = residual if residual is not None else dummy
    int8_matmul_kernel[grid](
        a, b, c,
        a_scale if a_scale is not None else dummy, b_scale if b_scale is not None else dummy,
        bias if bias is not None else dummy, res,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        res.stride(0), res.stride(1),
        a_scale.stride(0) if a_scale is not None else 0,
        b_scale.stride(0) if b_scale is not None else 0,
        bias.stride(0) if bias is not None else 0, *consts, **opts)
    return c

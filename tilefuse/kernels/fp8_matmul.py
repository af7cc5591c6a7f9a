"""fp8 GEMM with a scaled, fused epilogue (e4m3 / e5m2 operands, fp32 accumulation).

``C = act((A @ B) * a_scale[:, None] * b_scale[None, :] + bias) + residual`` for A: (M, K) and
B: (K, N) in ``float8_e4m3fn`` or ``float8_e5m2`` (any combination), any strides; the scales are
fp32 vectors (stride 0 broadcasts a per-tensor scale). ``tl.dot`` runs on the fp8 operands
(tensor cores on sm_89+: ``mma`` on Ada, ``wgmma`` on Hopper) and accumulates in fp32; the scales
commute with the sum over K, so they are applied once per output element in the epilogue, with
the bias, the shared activation helper and the residual, then the cast to ``c``'s dtype.

Accumulation on Hopper: an fp8 ``wgmma`` adds its products into the accumulator with reduced
precision (about 14 mantissa bits). ``MAX_IMPRECISE_ACC`` is ``tl.dot``'s
``max_num_imprecise_acc``: by default the launcher passes ``min(BLOCK_K, 128)``, so the partial
sum of each K block (at most 128 products) is added into a true fp32 accumulator, DeepSeek-V3's
"promote every 128" recipe; ``fast_accum=True`` passes None (Triton's default on sm_90: the tensor
core accumulates the whole K, as ``torch._scaled_mm(use_fast_accum=True)``). Ada and the
interpreter accumulate in fp32 either way. Speed of either choice on a GPU: unmeasured.

Masked K-tail loads use ``other=0.0`` (an int 0 cannot be cast to fp8 by the interpreter).
Programs are in grouped order (:func:`tilefuse.kernels.matmul.grouped_pid`); all pointer offsets
are int64. This is the portable (sm_89+) kernel: :func:`launch_fp8_matmul` is the one entry point,
so a Hopper TMA/persistent variant can be picked there per signature without touching callers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tilefuse._backend import interpreter_enabled
from tilefuse.kernels import launch_cache, next_pow2, split_constexprs
from tilefuse.kernels.activations import apply_activation
from tilefuse.kernels.gemm_common import tile_offsets

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MIN_CAPABILITY = (8, 9)


@triton.jit
def scaled_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, res_ptr,
                    stride_as, stride_bs, stride_bias, stride_rm, stride_rn,
                    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                    ACT_PARAM: tl.constexpr):
    """fp32 ``act(acc * sa[:, None] * sb[None, :] + bias) + residual`` for one output tile."""
    offs_cm = offs_m.to(tl.int64)
    offs_cn = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    sa = tl.load(a_scale_ptr + offs_cm * stride_as, mask=m_mask, other=0.0)
    sb = tl.load(b_scale_ptr + offs_cn * stride_bs, mask=n_mask, other=0.0)
    y = acc * sa.to(tl.float32)[:, None]
    y = y * sb.to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_cn * stride_bias, mask=n_mask, other=0.0)
        y = y + bias.to(tl.float32)[None, :]
    y = apply_activation(y, ACTIVATION, ACT_PARAM)
    if HAS_RESIDUAL:
        r_off = offs_cm[:, None] * stride_rm + offs_cn[None, :] * stride_rn
        res = tl.load(res_ptr + r_off, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        y = y + res.to(tl.float32)
    return y


@triton.jit
def fp8_matmul_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, res_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn,
    stride_as, stride_bs, stride_bias,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    ACT_PARAM: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # out-of-range rows/cols wrap (their results are masked on store); only K is masked
    offs_m, offs_n, offs_am, offs_bn, offs_k = tile_offsets(tl.program_id(0), M, N, BLOCK_M,
                                                            BLOCK_N, BLOCK_K, GROUP_M)
    a_base = a_ptr + offs_am[:, None] * stride_am
    b_base = b_ptr + offs_bn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k0 * BLOCK_K + offs_k
        k_mask = kk < K
        kk64 = kk.to(tl.int64)
        a = tl.load(a_base + kk64[None, :] * stride_ak, mask=k_mask[None, :], other=0.0)
        b = tl.load(b_base + kk64[:, None] * stride_bk, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=MAX_IMPRECISE_ACC)

    y = scaled_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, res_ptr,
                        stride_as, stride_bs, stride_bias, stride_rm, stride_rn,
                        HAS_BIAS, HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
    c_off = (offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn)
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + c_off, y.to(c_ptr.dtype.element_ty), mask=c_mask)


def heuristic_config(M: int, N: int, K: int) -> dict:
    """Block config. fp8 MMA consumes K in steps of 32, so BLOCK_K is 128 on GPU; the stage
    counts keep shared memory at or under 96 KiB so Ada (99 KiB per block) fits as well as
    Hopper. Decode shapes (M <= 16) use narrow tiles so the weight streams across many programs.
    Unmeasured on GPU."""
    if interpreter_enabled():
        # the interpreter's cost is per program: few, large tiles
        return dict(BLOCK_M=max(16, min(64, next_pow2(M))),
                    BLOCK_N=max(16, min(64, next_pow2(N))),
                    BLOCK_K=max(32, min(128, next_pow2(K))), GROUP_M=8, num_warps=4, num_stages=1)
    if M <= 16:
        bm, bn, warps, stages = 16, 64, 4, 4
    elif M <= 64:
        bm, bn, warps, stages = 64, 128, 4, 4
    else:
        bm, bn, warps, stages = 128, 128, 8, 3
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=warps,
                num_stages=stages)


def get_config(M: int, N: int, K: int) -> dict:
    """Tuned DB entry (``tilefuse.autotune``, family ``fp8_matmul``) if any, else the heuristic."""
    default = heuristic_config(M, N, K)
    try:
        from tilefuse.autotune import lookup
    except ImportError:  # pragma: no cover
        return default
    return lookup("fp8_matmul", dict(M=M, N=N, K=K), default)


def imprecise_acc(block_k: int, fast_accum: bool):
    """``max_num_imprecise_acc`` for a BLOCK_K: None (backend default) with ``fast_accum``, else
    promote the tensor-core partial sum every ``min(BLOCK_K, 128)`` products."""
    return None if fast_accum else min(int(block_k), 128)


_LAUNCH = launch_cache()
_N_RUNTIME = fp8_matmul_kernel.arg_names.index("HAS_BIAS")


def _launch_params(M, N, K, has_bias, has_res, activation, act_param, fast_accum, config):
    """(grid, constexprs, launch options) for one signature (cached by the launcher)."""
    cfg = dict(config if config is not None else get_config(M, N, K))
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    cfg.update(HAS_BIAS=has_bias, HAS_RESIDUAL=has_res, ACTIVATION=activation,
               ACT_PARAM=float(act_param),
               MAX_IMPRECISE_ACC=imprecise_acc(cfg["BLOCK_K"], fast_accum))
    return (grid,) + split_constexprs(fp8_matmul_kernel, _N_RUNTIME, cfg)


_CAPABILITY: dict = {}


def check_capability(device: torch.device) -> None:
    """RuntimeError unless the CUDA ``device`` has fp8 tensor cores (sm_89+); cached per device."""
    cap = _CAPABILITY.get(device)
    if cap is None:
        cap = _CAPABILITY[device] = tuple(torch.cuda.get_device_capability(device))
    if cap < MIN_CAPABILITY:
        raise RuntimeError(
            f"fp8 GEMMs need fp8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer); "
            f"{device} is sm_{cap[0]}{cap[1]}. Use int8 (tilefuse.ops.int8_matmul) or bf16/fp16 "
            f"instead, or TILEFUSE_BACKEND=torch for the (slow) reference path")


def bind_fp8_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a_scale: torch.Tensor,
                    b_scale: torch.Tensor, bias=None, residual=None, activation: int = 0,
                    act_param: float = 0.0, fast_accum: bool = False,
                    config: dict | None = None):
    """Everything of one launch that is not a tensor, bound once per signature: None when there
    is nothing to launch (M or N is 0), else what :func:`launcher` takes (launch
    parameters from the per-signature cache, strides from these tensors)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return None
    sig = (M, N, K, bias is not None, residual is not None, activation, act_param, fast_accum)
    params = _LAUNCH.get(sig) if config is None else None
    if params is None:
        params = _launch_params(*sig, config)
        if config is None:
            _LAUNCH[sig] = params
    grid, consts, opts = params
    res = residual if residual is not None else c
    return grid, (M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                  c.stride(1), res.stride(0), res.stride(1), a_scale.stride(0),
                  b_scale.stride(0), bias.stride(0) if bias is not None else 0) + consts, opts


def _nothing(a, b, c, a_scale=None, b_scale=None, bias=None, residual=None):
    return c


def launcher(bound):
    """``launch(a, b, c, a_scale, b_scale, bias, residual) -> c``: the launch of
    :func:`bind_fp8_matmul`'s ``bound`` on tensors of its signature (only their data pointers
    are read: the strides are bound). The one launch code of the op and of its plans."""
    if bound is None:
        return _nothing
    grid, args, opts = bound
    kernel = fp8_matmul_kernel  # (``kernel.run`` is looked up per call: tools patch the class)

    def launch(a, b, c, a_scale, b_scale, bias=None, residual=None):
        kernel.run(a, b, c, a_scale, b_scale, bias if bias is not None else c,
                   residual if residual is not None else c, *args, grid=grid, warmup=False,
                   **opts)
        return c
    return launch


def launch_fp8_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a_scale: torch.Tensor,
                      b_scale: torch.Tensor, bias=None, residual=None, activation: int = 0,
                      act_param: float = 0.0, fast_accum: bool = False,
                      config: dict | None = None) -> torch.Tensor:
    """Launch on 2-D operands: a (M, K) and b (K, N) fp8, c (M, N) fp32/fp16/bf16.

    ``a_scale`` is (M,) and ``b_scale``/``bias`` (N,) (any strides, 0 broadcasts), ``residual``
    (M, N) with any strides. :func:`bind_fp8_matmul` then its :func:`launcher` (the
    per-signature plans of :mod:`tilefuse.fused.fp8` keep the launcher); a later Hopper
    TMA/persistent kernel slots in here.
    """
    bound = bind_fp8_matmul(a, b, c, a_scale, b_scale, bias, residual, activation, act_param,
                            fast_accum, config)
    return launcher(bound)(a, b, c, a_scale, b_scale, bias, residual)

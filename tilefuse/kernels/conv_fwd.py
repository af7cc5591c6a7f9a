"""Dense conv2d forward as an implicit GEMM with a fused epilogue (no im2col buffer).

GEMM view, per group ``g``: ``M = N*OH*OW`` output pixels x ``N = C_out/groups`` output channels,
reduced over ``K = KH*KW*C_in/groups``. A program owns a ``BLOCK_M x BLOCK_N`` output tile (in
the matmul's grouped order, :func:`tilefuse.kernels.matmul.grouped_pid`) and walks K as one flat
loop over ``(kh, kw, channel block)``: for each tap it gathers the ``BLOCK_M x BLOCK_K`` input
tile straight from ``x`` (masks give the zero padding) and the ``BLOCK_K x BLOCK_N`` weight tile,
and feeds ``tl.dot``. Every tensor is addressed through its 4 strides, so channels_last (channels
innermost: the A tile's K axis is contiguous, the fast layout) and NCHW run the same kernel.
fp32 accumulation (fp64 for fp64), TF32 for fp32 only when the launcher is told torch allows it.

Epilogue: ``z = acc + bias`` -> (store z) -> ``u = act(z) + residual`` -> (store u) ->
``y = post_act(u)`` -> cast and store. ``z`` / ``u`` are stored only when the backward needs them
(``SAVE_PRE`` / ``SAVE_MID``), in the output's strides.

int8 (``QUANT``, :class:`tilefuse.nn.Int8Conv2d`; the same kernel, no im2col buffer): the
weight is int8 with one scale per output channel (``ws[co]``, applied in the epilogue) and

* ``QUANT=1`` (W8A8): int8 input, ``tl.dot`` int8 x int8 -> int32 (exact), then
  ``acc * a_scale * ws[co]``; the activation scale is read at ``(n, ih0, iw0)`` (the output row's
  first tap) through strides ``(ssn, ssh, ssw)``: ``(1, 0, 0)`` = one scale per image, all 0 =
  one per tensor, ``(H*W, W, 1)`` = one per input pixel, valid for 1x1 convs (one tap);
* ``QUANT=2`` (W8A8, per-input-pixel scales, kernels larger than 1x1): each K step's int32
  product is rescaled by its tap's input-pixel scales into an fp32 accumulator;
* ``QUANT=3`` (weight-only): float input, the int8 weight tile cast to the input dtype in the
  load path (exact), fp32 accumulation, ``acc * ws[co]``;
* ``QUANT=4`` (W8A8, static calibrated per-tensor scale ``a_scale[0]``): float input quantized
  in the load path (``clamp(round(x / a_scale), -127, 127)``, half away from zero as the row
  quantizer), then as ``QUANT=1``: no quantizer launch and no int8 copy of the input.
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
def pixel_coords(m, HW, W):
    """Flat pixel index (of an (N, H, W) grid) -> (n, h, w), int32."""
    n = m // HW
    r = m - n * HW
    h = r // W
    return n, h, r - h * W


@triton.jit
def tap_step(it, c_tiles, offs_k, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step ``it`` of the implicit GEMM's K loop (taps outer, channel blocks of ``BLOCK_K``
    inner) -> (channel offsets ``cc``, kernel row ``kh``, kernel column ``kw``)."""
    tap = it // c_tiles
    cc = (it - tap * c_tiles) * BLOCK_K + offs_k
    kh = tap // KW
    return cc, kh, tap - kh * KW


@triton.jit
def tile_dot(a, b, acc, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
             UPCAST: tl.constexpr):
    """``acc + a @ b`` (the conv kernels' MMA step); ``UPCAST``: the interpreter's tl.dot is
    wrong for bf16, so it gets fp32 operands."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def conv2d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, pre_ptr, mid_ptr, as_ptr, ws_ptr,
    M, C_OUT_G, C_IN_G, H, W, OH, OW, PAD_H, PAD_W,
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    syn, syc, syh, syw,
    srn, src, srh, srw,
    ssn, ssh, ssw,
    stride_bias,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    ACTIVATION: tl.constexpr, ACT_PARAM: tl.constexpr,
    POST_ACTIVATION: tl.constexpr, POST_PARAM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SAVE_PRE: tl.constexpr, SAVE_MID: tl.constexpr, QUANT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    g = tl.program_id(1)
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, C_OUT_G, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # wrap out-of-range pixels / channels (valid addresses); results are masked on store
    n, oh, ow = pixel_coords(offs_m % M, OH * OW, OW)
    co64 = (g * C_OUT_G + offs_n % C_OUT_G).to(tl.int64)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    n64 = n.to(tl.int64)
    x_row = x_ptr + n64 * sxn + (g * C_IN_G).to(tl.int64) * sxc
    w_col = w_ptr + co64[None, :] * swo

    c_tiles = tl.cdiv(C_IN_G, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if QUANT == 4:
        inv_scale = 1.0 / tl.load(as_ptr).to(tl.float32)
    for it in range(0, KH * KW * c_tiles):
        cc, kh, kw = tap_step(it, c_tiles, offs_k, KW, BLOCK_K)
        ih = ih0 + kh * DIL_H
        iw = iw0 + kw * DIL_W
        p_mask = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        k_mask = cc < C_IN_G
        cc64 = cc.to(tl.int64)
        a = tl.load(x_row[:, None] + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
                    + cc64[None, :] * sxc, mask=p_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(w_col + cc64[:, None] * swc + (kh * swh + kw * sww), mask=k_mask[:, None],
                    other=0)
        if QUANT == 4:  # static scale: quantize the float tile here
            v = a.to(tl.float32) * inv_scale
            v = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))
            a = tl.minimum(tl.maximum(v, -127.0), 127.0).to(tl.int8)
        if QUANT == 1 or QUANT == 4:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # triton 3.6: out_dtype = acc's
        elif QUANT == 2:
            part = tl.dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32), out_dtype=tl.int32)
            s = tl.load(as_ptr + n64 * ssn + ih.to(tl.int64) * ssh + iw.to(tl.int64) * ssw,
                        mask=p_mask, other=0.0)
            acc += part.to(tl.float32) * s[:, None]
        else:
            if QUANT == 3:
                # weight-only: dequantized in the load path (exact; the interpreter's int8 ->
                # bf16 cast gives NaN, so there it goes to fp32 with the UPCAST operands)
                b = b.to(tl.float32 if UPCAST else a.dtype)
            acc = tile_dot(a, b, acc, INPUT_PRECISION, ACC_DTYPE, UPCAST)

    # ---- epilogue: scales -> bias -> (z) -> act -> + residual -> (u) -> post act -> cast ----
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < C_OUT_G)
    if QUANT != 0:
        if QUANT == 1 or QUANT == 4:  # the row's activation scale (1x1 padding rows are 0)
            ihs = tl.minimum(tl.maximum(ih0, 0), H - 1).to(tl.int64)
            iws = tl.minimum(tl.maximum(iw0, 0), W - 1).to(tl.int64)
            sa = tl.load(as_ptr + n64 * ssn + ihs * ssh + iws * ssw)
            acc = acc.to(tl.float32) * sa[:, None]
        acc = acc * tl.load(ws_ptr + co64)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + co64 * stride_bias)
        acc = acc + bias.to(acc.dtype)[None, :]
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    y_off = (n64 * syn + oh64 * syh + ow64 * syw)[:, None] + co64[None, :] * syc
    if SAVE_PRE:
        tl.store(pre_ptr + y_off, acc.to(pre_ptr.dtype.element_ty), mask=c_mask)
    acc = apply_activation(acc, ACTIVATION, ACT_PARAM)
    if HAS_RESIDUAL:
        r_off = (n64 * srn + oh64 * srh + ow64 * srw)[:, None] + co64[None, :] * src
        res = tl.load(res_ptr + r_off, mask=c_mask, other=0.0)
        acc = acc + res.to(acc.dtype)
    if SAVE_MID:
        tl.store(mid_ptr + y_off, acc.to(mid_ptr.dtype.element_ty), mask=c_mask)
    acc = apply_activation(acc, POST_ACTIVATION, POST_PARAM)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=c_mask)


# ------------------------------------------------------------------------------------------------
# configs (shared with the backward kernels: the same GEMM tiles)
# ------------------------------------------------------------------------------------------------
def heuristic_config(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Default tiles of an implicit GEMM with ``M`` rows, ``N`` columns and a ``K`` block axis
    of ``K`` channels per tap; :mod:`tilefuse.autotune` replaces it with tuned entries."""
    if interpreter_enabled():
        # the interpreter's cost is per program and per loop step: few, large tiles
        return dict(BLOCK_M=max(16, min(64, next_pow2(M))), BLOCK_N=max(16, min(64, next_pow2(N))),
                    BLOCK_K=max(16, min(64, next_pow2(K))), GROUP_M=8, num_warps=4,
                    num_stages=1)
    if dtype == torch.int8:
        # int8 MMA consumes K in steps of 32: 64..128-channel blocks, int32 accumulators
        bn = 128 if N > 64 else 64
        return dict(BLOCK_M=128 if M > 64 else 64, BLOCK_N=bn,
                    BLOCK_K=max(32, min(128, next_pow2(K))), GROUP_M=8,
                    num_warps=8 if bn == 128 and M > 64 else 4, num_stages=3)
    half = dtype in (torch.float16, torch.bfloat16)
    block_k = max(16, min(64 if half else 32, next_pow2(K)))
    bn = 128 if N > 64 else (64 if N > 32 else 32)
    if M <= 64:
        bm, warps = 64, 4
    else:
        # sm_90 (tools/aot_check.py): 128x128 fp32 accumulators spill with 4 warps (as for the
        # matmul), and so does a half-precision 128x64x64 tile (1x1 convs)
        bm, warps = 128, (8 if bn == 128 or (half and block_k == 64) else 4)
    if dtype == torch.float64:
        bm, bn, block_k, warps = min(bm, 64), min(bn, 64), 16, 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, GROUP_M=8, num_warps=warps,
                num_stages=3 if half else 2)


def conv_key(kind: str, M: int, N: int, K: int, kernel: tuple, stride: tuple,
             dtype: torch.dtype, channels_last: bool, tf32: bool) -> dict:
    """The tuning key of one conv GEMM (``kind``: ``fwd``, ``dgrad`` or ``wgrad``)."""
    key = dict(kind=kind, M=M, N=N, K=K, KH=kernel[0], KW=kernel[1], stride=stride[0],
               dtype=str(dtype).replace("torch.", ""))
    if channels_last:
        key["layout"] = "nhwc"
    if tf32 and dtype == torch.float32:
        key["tf32"] = True
    return key


def get_config(key: dict, dtype: torch.dtype) -> dict:
    """Tuned DB entry for ``key`` (:func:`conv_key`) if one exists, else the heuristic."""
    default = heuristic_config(key["M"], key["N"], key["K"], dtype)
    try:
        from tilefuse.autotune import lookup
    except ImportError:  # pragma: no cover
        return default
    return lookup("conv2d", key, default)


def acc_constexprs(dtype: torch.dtype, tf32: bool, quant: int = 0) -> dict:
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return dict(INPUT_PRECISION="tf32" if tf32 else "ieee",
                ACC_DTYPE=tl.int32 if quant in (1, 4) else acc,
                UPCAST=bool(interpreter_enabled() and dtype == torch.bfloat16))


def is_channels_last(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.shape[1] > 1


_LAUNCH = launch_cache()
_N_RUNTIME = conv2d_fwd_kernel.arg_names.index("KH")


def _fwd_params(sig, config):
    (M, cog, cig, groups, kernel, stride, dilation, dtype, act, act_param, post, post_param,
     has_bias, has_res, save_pre, save_mid, tf32, cl, quant) = sig
    if config is None and quant in (1, 2, 4):  # int8 operands: not in the tuning space
        config = heuristic_config(M, cog, cig, torch.int8)
        if quant == 4:  # the A tile is loaded as floats: 64-channel blocks fit 3 stages
            config["BLOCK_K"] = min(config["BLOCK_K"], 64)
    elif config is None:
        config = get_config(conv_key("fwd", M, cog, cig, kernel, stride, dtype, cl, tf32), dtype)
    cfg = dict(config)
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(cog, cfg["BLOCK_N"]), groups)
    cfg.update(KH=kernel[0], KW=kernel[1], STRIDE_H=stride[0], STRIDE_W=stride[1],
               DIL_H=dilation[0], DIL_W=dilation[1], ACTIVATION=act, ACT_PARAM=float(act_param),
               POST_ACTIVATION=post, POST_PARAM=float(post_param), HAS_BIAS=has_bias,
               HAS_RESIDUAL=has_res, SAVE_PRE=save_pre, SAVE_MID=save_mid, QUANT=quant,
               **acc_constexprs(dtype, tf32, quant))
    consts, opts = split_constexprs(conv2d_fwd_kernel, _N_RUNTIME, cfg)
    return grid, consts, opts


def _fwd_args(x, weight, y, bias, residual, has_pre: bool, has_mid: bool, stride, padding,
              dilation, groups, activation, act_param, post_activation, post_param,
              allow_tf32, config, a_scale, w_scale):
    """The launch of :func:`launch_conv2d_fwd` minus its pointers: ``(grid, args, opts,
    a_scale)``, ``args`` every kernel argument after the nine pointers (sizes, strides,
    constexprs), ``a_scale`` as the kernel reads it; None when there is nothing to launch."""
    N, C_in, H, W = x.shape
    C_out, cig, KH, KW = weight.shape
    OH, OW = y.shape[2], y.shape[3]
    M = N * OH * OW
    cog = C_out // groups
    if M == 0 or cog == 0:
        return None
    if M >= 2 ** 31:
        raise ValueError(f"conv2d: N*OH*OW = {M} output pixels exceed 2^31; split the batch")
    tf32 = bool(allow_tf32 and x.dtype == torch.float32 and x.is_cuda)
    quant, s_strides = 0, (0, 0, 0)
    if weight.dtype == torch.int8:
        if w_scale is None or (x.dtype == torch.int8 and a_scale is None) or (
                a_scale is not None and x.dtype != torch.int8 and a_scale.numel() != 1):
            raise ValueError("conv2d int8: an int8 weight needs w_scale; an int8 input needs "
                             "a_scale, a float input one static scale (one element) or none")
        quant = 3
        if a_scale is not None and x.dtype != torch.int8:
            quant, a_scale = 4, a_scale.reshape(1, 1, 1).expand(N, H, W)
        elif a_scale is not None:
            a_scale = a_scale.expand(N, H, W)
            s_strides = a_scale.stride()
            per_pixel = (s_strides[1] or s_strides[2]) and (KH, KW) != (1, 1)
            quant = 2 if per_pixel else 1
    sig = (M, cog, cig, groups, (KH, KW), tuple(stride), tuple(dilation), x.dtype, activation,
           act_param, post_activation, post_param, bias is not None, residual is not None,
           has_pre, has_mid, tf32, is_channels_last(x), quant)
    params = _LAUNCH.get(sig) if config is None else None
    if params is None:
        params = _fwd_params(sig, config)
        if config is None:
            _LAUNCH[sig] = params
    grid, consts, opts = params
    args = (M, cog, cig, H, W, OH, OW, padding[0], padding[1], *x.stride(), *weight.stride(),
            *y.stride(), *(residual if residual is not None else y).stride(), *s_strides,
            bias.stride(0) if bias is not None else 0, *consts)
    return grid, args, opts, a_scale


def launch_conv2d_fwd(x, weight, y, bias=None, residual=None, pre=None, mid=None,
                      stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                      activation: int = 0, act_param: float = 0.0, post_activation: int = 0,
                      post_param: float = 0.0, allow_tf32: bool = False,
                      config: dict | None = None, a_scale=None, w_scale=None):
    """``y = post_act(act(conv2d(x, weight) + bias) + residual)`` into ``y`` (N, C_out, OH, OW),
    any strides for every tensor; ``padding`` is (top, left) (the bottom/right padding follows
    from ``y``'s size). ``pre`` / ``mid`` (``y``'s shape and strides) receive ``z`` and ``u``.
    Launch parameters are computed once per signature.

    int8 ``weight`` (with ``w_scale`` (C_out,) fp32): W8A8 when ``x`` is int8 too, with
    ``a_scale`` an fp32 tensor broadcast to (N, H, W) (one scale per image, per tensor or per
    input pixel: an expanded view); a float ``x`` with a one-element ``a_scale``: W8A8 with that
    static scale, ``x`` quantized in the load; a float ``x`` alone: weight-only."""
    launch = _fwd_args(x, weight, y, bias, residual, pre is not None, mid is not None, stride,
                       padding, dilation, groups, activation, act_param, post_activation,
                       post_param, allow_tf32, config, a_scale, w_scale)
    if launch is None:
        return y
    grid, args, opts, a_scale = launch
    conv2d_fwd_kernel.run(
        x, weight, bias if bias is not None else y, residual if residual is not None else y, y,
        pre if pre is not None else y, mid if mid is not None else y,
        a_scale if a_scale is not None else y, w_scale if w_scale is not None else y,
        *args, grid=grid, warmup=False, **opts)
    return y


def _no_launch(x, weight, bias, residual, y, pre, mid):
    pass


def bind_conv2d_fwd(x, weight, y, bias, residual, save_pre: bool, save_mid: bool, stride,
                    padding, dilation, groups: int, activation: int, act_param: float,
                    post_activation: int, post_param: float, allow_tf32: bool):
    """``launch(x, weight, bias, residual, y, pre, mid)``: :func:`launch_conv2d_fwd`'s float
    launch (the same arguments, the same bits) for tensors with the shapes, strides, dtypes and
    devices of these (``pre`` / ``mid``: ``y``'s, given exactly when ``save_pre`` /
    ``save_mid``), every non-tensor argument computed here once (the eager plans of
    :mod:`tilefuse.fused.conv_plan`)."""
    launch = _fwd_args(x, weight, y, bias, residual, save_pre, save_mid, stride, padding,
                       dilation, groups, activation, act_param, post_activation, post_param,
                       allow_tf32, None, None, None)
    if launch is None:
        return _no_launch
    grid, args, opts, _ = launch
    kernel = conv2d_fwd_kernel

    def run(x, weight, bias, residual, y, pre, mid):
        kernel.run(x, weight, y if bias is None else bias, y if residual is None else residual, y,
                   y if pre is None else pre, y if mid is None else mid, y, y, *args, grid=grid,
                   warmup=False, **opts)
    return run

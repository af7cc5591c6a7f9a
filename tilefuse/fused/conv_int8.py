"""int8 conv2d on the implicit-GEMM conv kernel: ``tilefuse::int8_conv2d`` (inference only).

``y = post_act(act(conv(q * a_scale, w_q) * w_scale[co] + bias) + residual)`` computed by
:func:`tilefuse.kernels.conv_fwd.launch_conv2d_fwd` with int8 operands (no im2col buffer):

* W8A8 (``q`` int8): ``a_scale`` fp32 broadcastable to ``(N, H, W)`` -- ``(N, 1, 1)`` one scale
  per image, ``(1, 1, 1)`` one per tensor, ``(N, H, W)`` one per input pixel. int8 x int8 ->
  int32 products (exact); the scales apply in the epilogue (per-pixel scales with a kernel larger
  than 1x1: per K step, into an fp32 accumulator).
* static W8A8 (``q`` float, ``a_scale`` one calibrated scale): ``q`` is quantized in the conv
  kernel's load path (``clamp(round(q / a_scale), -127, 127)``, half away from zero).
* weight-only (``q`` float, ``a_scale`` None): the int8 weight is cast in the load path.

The torch backend computes the same thing in fp64 (int8 products are exact there too).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tilefuse._backend import backend_of
from tilefuse.activations import NAMES, torch_activation
from tilefuse.fused._fast import fast_op
from tilefuse.fused.depthwise import _full_padding


def _torch_int8_conv2d(q, a_scale, weight, w_scale, bias, residual, stride, padding, dilation,
                       out_size, activation, act_param, post, post_param, out_dtype):
    if q.is_floating_point() and a_scale is not None:  # static scale: quantize as the kernel
        v = q.float() * (1.0 / a_scale.float().reshape(()))
        q = torch.where(v >= 0, torch.floor(v + 0.5), torch.ceil(v - 0.5)).clamp_(-127, 127)
    x = q.double()
    if a_scale is not None:
        x = x * a_scale.double().expand(q.shape[0], q.shape[2], q.shape[3])[:, None]
    pads = _full_padding(q.shape[2], q.shape[3], weight.shape[2], weight.shape[3], stride,
                         padding, dilation, out_size)
    z = F.conv2d(F.pad(x, pads), weight.double(), None, stride, 0, dilation)
    z = z * w_scale.double()[None, :, None, None]
    if bias is not None:
        z = z + bias.double()[None, :, None, None]
    u = torch_activation(z, NAMES[activation], act_param)
    if residual is not None:
        u = u + residual.double()
    return torch_activation(u, NAMES[post], post_param).to(out_dtype)


def _impl(q: Tensor, a_scale: Optional[Tensor], weight: Tensor, w_scale: Tensor,
          bias: Optional[Tensor], residual: Optional[Tensor], stride: List[int],
          padding: List[int], dilation: List[int], out_size: List[int], activation: int,
          act_param: float, post_activation: int, post_param: float,
          out_dtype: torch.dtype) -> Tensor:
    """q (N, C_in, H, W) int8 (W8A8) or float (static W8A8 / weight-only), weight int8,
    padding (top, left) -> (N, C_out, OH, OW) channels_last ``out_dtype``."""
    shape = (q.shape[0], weight.shape[0], out_size[0], out_size[1])
    y = torch.empty(shape, device=q.device, dtype=out_dtype, memory_format=torch.channels_last)
    if backend_of(q) == "torch":
        return y.copy_(_torch_int8_conv2d(q, a_scale, weight, w_scale, bias, residual, stride,
                                          padding, dilation, out_size, activation, act_param,
                                          post_activation, post_param, out_dtype))
    from tilefuse.kernels.conv_fwd import launch_conv2d_fwd

    if q.is_cuda and weight.stride(1) != 1 and weight.shape[1] > 1:
        # channels innermost in the weight too (as the float conv): contiguous B-tile K axis
        weight = weight.contiguous(memory_format=torch.channels_last)
    return launch_conv2d_fwd(q, weight, y, bias=bias, residual=residual, stride=stride,
                             padding=padding, dilation=dilation, activation=activation,
                             act_param=act_param, post_activation=post_activation,
                             post_param=post_param, a_scale=a_scale, w_scale=w_scale)


def _fake(q, a_scale, weight, w_scale, bias, residual, stride, padding, dilation, out_size,
          activation, act_param, post_activation, post_param, out_dtype):
    shape = (q.shape[0], weight.shape[0], out_size[0], out_size[1])
    return torch.empty(shape, device=q.device, dtype=out_dtype,
                       memory_format=torch.channels_last)


int8_conv2d_op = fast_op("int8_conv2d", _impl, fake=_fake)

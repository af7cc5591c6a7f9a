"""``Int8Conv2d``: a quantized :class:`torch.nn.Conv2d` (W8A8 or weight-only) for every kernel
size, on the implicit-GEMM conv kernel with int8 operands (``tilefuse::int8_conv2d``,
:mod:`tilefuse.fused.conv_int8`): no im2col buffer, the quantized input is the input's size.

Inference only: the int8 weight and its scales are buffers (in ``weight_only`` mode a forward
that needs the input's gradient runs ``tilefuse.ops.conv2d`` with the dequantized weight).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from tilefuse.activations import parse_activation, torch_activation
from tilefuse.fused._fast import act_code
from tilefuse.fused.conv import conv2d, conv_geometry
from tilefuse.fused.conv_int8 import int8_conv2d_op
from tilefuse.fused.int8 import quantize_per_row
from tilefuse.nn.int8 import _check_mode, _int8_to_torch

ACT_SCALES = ("pixel", "sample", "tensor", "static")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def quantize_input(x: torch.Tensor, act_scale: str):
    """Dynamic symmetric int8 quantization of a conv input (N, C, H, W) with the fused row
    quantizer, read in memory order (no copy for contiguous and channels_last inputs):
    ``(q, scale)``, ``q`` int8 of ``x``'s shape (channels_last for ``pixel`` and channels_last
    inputs), ``scale`` fp32 broadcastable to (N, H, W): ``(N, H, W)`` per input pixel (over its
    channels), ``(N, 1, 1)`` per image (over C, H, W), ``(1, 1, 1)`` per tensor."""
    N, C, H, W = x.shape
    nhwc = act_scale == "pixel" or (not x.is_contiguous()
                                    and x.is_contiguous(memory_format=torch.channels_last))
    t = x.permute(0, 2, 3, 1) if nhwc else x
    rows = {"pixel": N * H * W, "sample": N, "tensor": 1}[act_scale]
    q, s = quantize_per_row(t.reshape(rows, -1))
    q = q.view(N, H, W, C).permute(0, 3, 1, 2) if nhwc else q.view(N, C, H, W)
    shape = {"pixel": (N, H, W), "sample": (N, 1, 1), "tensor": (1, 1, 1)}[act_scale]
    return q, s.view(shape)


class Int8Conv2d(torch.nn.Module):
    """A quantized :class:`torch.nn.Conv2d` (``groups == 1``): per-output-channel int8 weights
    (symmetric absmax), int32 accumulation, and the scales, bias, ``activation``, an optional
    ``residual`` (``forward(input, residual)``) and ``post_activation`` in the implicit-GEMM conv
    kernel's epilogue (no im2col buffer).

    * ``mode='w8a8'``: the input is quantized on the fly (dynamic symmetric scales):
      ``act_scale='pixel'`` (default) one scale per input pixel over its channels (for a 1x1 conv
      that is the output pixel's row, as ``Int8Conv1x1``; larger kernels rescale each tap's int32
      partial product), ``'sample'`` one per image, ``'tensor'`` one for the whole input (both:
      pure int32 accumulation, the scale applied once in the epilogue); ``'static'`` one
      calibrated per-tensor scale (buffer ``input_scale``, set by :func:`calibrate`), the input
      quantized in the conv kernel's load path (one launch, no int8 copy).
    * ``mode='weight_only'``: float activations, the int8 weight cast in the kernel's load path.

    It keeps the conv's attributes (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``groups``, ``padding_mode``...). ``state_dict``: ``weight`` (int8,
    ``(out, in, kH, kW)``), ``weight_scale`` (fp32, ``(out,)``), ``bias``. The output is
    channels_last.

    >>> import torch, tilefuse
    >>> conv = torch.nn.Conv2d(8, 4, 3, padding=1)
    >>> q = tilefuse.nn.Int8Conv2d.from_float(conv)
    >>> x = torch.randn(2, 8, 6, 6)
    >>> bool((q(x) - conv(x)).abs().max() < 0.05 * conv(x).abs().max())
    True
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 mode: str = "w8a8", act_scale: str = "pixel", activation=None,
                 post_activation=None, device=None, dtype=None) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(f"Int8Conv2d needs groups == 1, got groups={groups}: grouped and "
                             f"depthwise convs have no int8 kernel (keep them in float)")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got "
                             f"{padding_mode!r}")
        if act_scale not in ACT_SCALES:
            raise ValueError(f"act_scale must be one of {ACT_SCALES}, got {act_scale!r}")
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got "
                             f"{padding!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.groups, self.padding_mode = 1, padding_mode
        self.transposed, self.output_padding = False, (0, 0)
        self.mode, self.act_scale = _check_mode(mode), act_scale
        self.activation = parse_activation(activation)
        self.post_activation = parse_activation(post_activation)
        kh, kw = self.kernel_size
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw,
                                                   dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32,
                                                        device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device,
                                                 dtype=dtype or torch.float32) if bias else None)
        self._calibrated = False
        if act_scale == "static":
            self._make_static()

    def _make_static(self) -> None:
        if "input_scale" not in self._buffers:
            self.register_buffer("input_scale", torch.zeros(1, device=self.weight.device))
        self.act_scale = "static"

    def observe(self, input: torch.Tensor) -> None:
        """Static scale: widen ``input_scale`` to cover ``input`` (as forward receives it):
        ``max(input_scale, absmax(input) / 127)``."""
        if "input_scale" not in self._buffers:
            raise RuntimeError("observe() needs act_scale='static' (see calibrate())")
        x, _ = self._pre_pad(input.detach())
        amax = x.abs().amax().float().reshape(1) / 127.0 if x.numel() else self.input_scale
        torch.maximum(self.input_scale, amax.to(self.input_scale.device), out=self.input_scale)
        self.input_scale.clamp_(min=torch.finfo(torch.float32).tiny)
        self._calibrated = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "input_scale" in state_dict:
            self._calibrated = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def supports(conv: torch.nn.Module) -> bool:
        return isinstance(conv, torch.nn.Conv2d) and conv.groups == 1

    @classmethod
    def from_float(cls, conv: torch.nn.Conv2d, mode: str = "w8a8", act_scale: str = "pixel",
                   activation=None, post_activation=None) -> "Int8Conv2d":
        """Quantize ``conv``'s weight per output channel. A ``tilefuse.nn.Conv2d`` keeps its fused
        ``activation``/``post_activation`` unless given here."""
        if not isinstance(conv, torch.nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"Int8Conv2d needs groups == 1, got groups={conv.groups}: grouped "
                             f"and depthwise convs have no int8 kernel (keep them in float)")
        if activation is None:
            activation = getattr(conv, "activation", None)
        if post_activation is None:
            post_activation = getattr(conv, "post_activation", None)
        w = conv.weight.detach()
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, 1, conv.bias is not None, conv.padding_mode, mode, act_scale,
                activation, post_activation, device=w.device,
                dtype=conv.bias.dtype if conv.bias is not None else w.dtype)
        q, s = quantize_per_row(w.reshape(w.shape[0], -1))
        m.weight.copy_(q.reshape(w.shape))
        m.weight_scale.copy_(s.reshape(-1))
        if conv.bias is not None:
            m.bias = conv.bias.detach().clone()
        return m

    def _pre_pad(self, x: torch.Tensor):
        """Non-zero ``padding_mode``: pad with ``F.pad`` first (as torch does); padding 0 after."""
        if self.padding_mode == "zeros":
            return x, self.padding
        if self.padding == "valid":
            return x, 0
        if self.padding == "same":
            rev = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                rev += [total // 2, total - total // 2]
        else:
            rev = [p for p in reversed(self.padding) for _ in range(2)]
        return F.pad(x, rev, mode=self.padding_mode), 0

    def forward(self, input: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(input, torch.Tensor) or input.dim() not in (3, 4):
            raise ValueError(f"Int8Conv2d expects a 3-D (unbatched) or 4-D input, got "
                             f"{getattr(input, 'shape', type(input).__name__)}")
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        x, padding = self._pre_pad(x)
        stride, pad, dil, _, out_size = conv_geometry(x.shape, self.weight.shape, self.stride,
                                                      padding, self.dilation, 1)
        N, OH, OW, C_out = x.shape[0], out_size[0], out_size[1], self.out_channels
        res = None
        if residual is not None:
            r = residual.unsqueeze(0) if unbatched and residual.dim() == 3 else residual
            res = r.expand(N, C_out, OH, OW)
        act, post = act_code(self.activation), act_code(self.post_activation)
        if self.mode == "weight_only":
            if torch.is_grad_enabled() and (x.requires_grad or (res is not None
                                                                and res.requires_grad)):
                # gradients reach the input: the float conv (autograd) on the dequantized weight
                bias = None if self.bias is None else self.bias.to(x.dtype)
                y = conv2d(x, self.dequantized_weight(x.dtype), bias, self.stride, padding,
                           self.dilation, activation=self.activation, residual=res,
                           post_activation=self.post_activation)
                return y.squeeze(0) if unbatched else y
            q, sa = x, None
        elif self.act_scale == "static":
            if not self._calibrated:
                raise RuntimeError("Int8Conv2d(act_scale='static') is not calibrated: run "
                                   "tilefuse.nn.int8_conv.calibrate(model, batch) or load a "
                                   "state_dict with its input_scale")
            q, sa = x.detach(), self.input_scale  # quantized in the conv kernel's load path
        else:
            q, sa = quantize_input(x.detach(), self.act_scale)
        if res is not None and res.requires_grad and torch.is_grad_enabled():
            # the residual's gradient: its add (and what follows) as torch ops
            y = int8_conv2d_op(q, sa, self.weight, self.weight_scale, self.bias, None, stride,
                               pad, dil, out_size, act[0], act[1], 0, 0.0, x.dtype)
            y = torch_activation(y + res, *self.post_activation)
        else:
            y = int8_conv2d_op(q, sa, self.weight, self.weight_scale, self.bias, res, stride,
                               pad, dil, out_size, act[0], act[1], post[0], post[1], x.dtype)
        return y.squeeze(0) if unbatched else y

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None, None, None]).to(dtype)

    def to_torch(self) -> torch.nn.Module:
        """``nn.Conv2d`` with the dequantized weight (+ activation modules), for ONNX export (a
        residual argument has no module form, as for ``tilefuse.nn.Conv2d``)."""
        conv = torch.nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                               self.stride, self.padding, self.dilation, 1,
                               self.bias is not None, self.padding_mode, device="meta")
        return _int8_to_torch(conv, self, self.activation, self.post_activation)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}, mode={self.mode}")
        if self.mode == "w8a8":
            s += f", act_scale={self.act_scale}"
        for name in ("activation", "post_activation"):
            if getattr(self, name)[0] != "none":
                s += f", {name}={getattr(self, name)[0]}"
        return s


@torch.no_grad()
def calibrate(model: torch.nn.Module, *inputs, **kwargs) -> int:
    """Give every W8A8 :class:`Int8Conv2d` in ``model`` a static per-tensor activation scale:
    run ``model(*inputs, **kwargs)`` once (the convs keep their dynamic scales meanwhile, so later
    layers see realistic activations), record each conv's input absmax, then switch the convs to
    ``act_scale='static'`` with ``input_scale = absmax / 127``. Call it again on more batches to
    widen the ranges. Returns the number of convs calibrated.

    >>> import torch, tilefuse
    >>> from tilefuse.nn.int8_conv import calibrate
    >>> net = torch.nn.Sequential(tilefuse.nn.Int8Conv2d.from_float(torch.nn.Conv2d(3, 4, 3)))
    >>> calibrate(net, torch.randn(2, 3, 8, 8)), net[0].act_scale
    (1, 'static')
    """
    convs = [m for m in model.modules() if isinstance(m, Int8Conv2d) and m.mode == "w8a8"]
    for m in convs:
        mode = m.act_scale
        m._make_static()
        if not m._calibrated:  # a first calibration: dynamic scales while observing
            m.act_scale = mode if mode != "static" else "tensor"
    hooks = [m.register_forward_pre_hook(lambda mod, args: mod.observe(args[0])) for m in convs]
    try:
        model(*inputs, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        for m in convs:
            m.act_scale = "static"
    return len(convs)

"""Int8 inference modules: ``Int8Linear`` (W8A8 or weight-only) and ``Int8Conv1x1``.

Inference only: the int8 weight and its scales are buffers, not parameters, so nothing here is
trained (gradients do flow to the *input* in ``weight_only`` mode, with the weight frozen).
"""
from __future__ import annotations

import torch

from tilefuse.activations import parse_activation
from tilefuse.fused.int8 import quantize_per_row, w8a8_linear, weight_only_int8_linear
from tilefuse.nn._quantized import QuantizedLinearBase

MODES = ("w8a8", "weight_only")


def _int8_to_torch(float_module: torch.nn.Module, q: torch.nn.Module, *acts) -> torch.nn.Module:
    """``float_module`` (built on the meta device) given ``q``'s dequantized weight and bias,
    followed by the activation modules of ``acts``: the standard-op form that
    :func:`tilefuse.export_onnx` exports. The dynamic activation quantization of ``w8a8`` has no
    standard-op form, so the export computes the weight-only model."""
    from tilefuse.activations import activation_module

    dtype = q.bias.dtype if q.bias is not None else torch.float32
    w = q.dequantized_weight(dtype).reshape(float_module.weight.shape)
    float_module.weight = torch.nn.Parameter(w, requires_grad=False)
    if q.bias is not None:
        float_module.bias = torch.nn.Parameter(q.bias.detach().clone(), requires_grad=False)
    mods = [activation_module(*a) for a in acts if a[0] != "none"]
    return torch.nn.Sequential(float_module, *mods) if mods else float_module


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


class Int8Linear(QuantizedLinearBase):
    """A quantized :class:`torch.nn.Linear` with per-output-channel int8 weights.

    * ``mode='w8a8'``: activations are quantized per row on the fly; int8 x int8 GEMM with int32
      accumulation; scales, bias and activation in the epilogue.
    * ``mode='weight_only'``: fp16/bf16/fp32 activations; the int8 weight is dequantized inside
      the GEMM's load path.

    ``state_dict`` holds ``weight`` (int8, ``(out, in)``), ``weight_scale`` (fp32, ``(out,)``) and
    ``bias`` (float, when present), and round-trips through ``load_state_dict``.

    >>> import torch, tilefuse
    >>> lin = torch.nn.Linear(16, 4)
    >>> q = tilefuse.nn.Int8Linear.from_float(lin, mode="weight_only")
    >>> x = torch.randn(2, 16)
    >>> bool((q(x) - lin(x)).abs().max() < 0.05)
    True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 mode: str = "w8a8", activation=None, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode = _check_mode(mode)
        self.activation, self.act_param = parse_activation(activation)
        self._register_quantized_buffers(in_features, out_features, bias, torch.int8, device,
                                         dtype)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, mode: str = "w8a8",
                   activation=None) -> "Int8Linear":
        """Quantize ``linear``'s weight per output channel (symmetric absmax, int8 in [-127, 127]).

        ``linear`` is a :class:`torch.nn.Linear` or a Hugging Face ``Conv1D`` (weight ``(in,
        out)``; the result keeps its ``nf``/``nx`` attributes). A :class:`tilefuse.nn.Linear` (or
        ``Conv1DLinear``) keeps its fused activation unless ``activation`` is given.
        """
        w, conv1d, activation = cls._float_weight(linear, activation)
        m = cls(w.shape[1], w.shape[0], bias=linear.bias is not None,
                mode=mode, activation=activation, device=w.device, dtype=w.dtype)
        return m._load_quantized(linear, conv1d, *quantize_per_row(w))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fn = w8a8_linear if self.mode == "w8a8" else weight_only_int8_linear
        # bias/scales stay in their stored dtype: the epilogue reads them in fp32
        return fn(input, self.weight, self.weight_scale, bias=self.bias,
                  activation=(self.activation, self.act_param))

    def to_torch(self) -> torch.nn.Module:
        """``nn.Linear`` with the dequantized weight (+ the activation module), for export."""
        lin = torch.nn.Linear(self.in_features, self.out_features, self.bias is not None,
                              device="meta")
        return _int8_to_torch(lin, self, (self.activation, self.act_param))

    def extra_repr(self) -> str:
        act = "" if self.activation == "none" else f", activation={self.activation}"
        return f"{self._repr_head()}, mode={self.mode}{act}"


class Int8Conv1x1(torch.nn.Module):
    """A 1x1, stride-1, unpadded, ungrouped ``Conv1d``/``Conv2d`` run as an :class:`Int8Linear`
    over the channel dim (the input is moved to channels-last for the GEMM: one copy when it is
    not already channels-last). ``state_dict`` keys live under ``linear.``.

    It keeps the conv's attributes (``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``dilation``, ``groups``, ``padding_mode``...), so code that reads
    them off the module (e.g. Hugging Face's TF-style "SAME" padding) works unchanged."""

    def __init__(self, linear: Int8Linear, ndim: int = 2) -> None:
        super().__init__()
        self.linear = linear
        self.ndim = ndim
        one = (1,) * ndim
        self.in_channels, self.out_channels = linear.in_features, linear.out_features
        self.kernel_size, self.stride, self.dilation = one, one, one
        self.padding, self.output_padding = (0,) * ndim, (0,) * ndim
        self.groups, self.padding_mode, self.transposed = 1, "zeros", False

    @staticmethod
    def supports(conv: torch.nn.Module) -> bool:
        if not isinstance(conv, (torch.nn.Conv1d, torch.nn.Conv2d)):
            return False
        one = (1,) * (conv.weight.dim() - 2)
        return (tuple(conv.kernel_size) == one and tuple(conv.stride) == one
                and tuple(conv.dilation) == one and conv.groups == 1
                and not isinstance(conv.padding, str) and tuple(conv.padding) == (0,) * len(one))

    @classmethod
    def from_float(cls, conv: torch.nn.Module, mode: str = "w8a8") -> "Int8Conv1x1":
        if not cls.supports(conv):
            raise ValueError(f"only 1x1, stride-1, unpadded, ungrouped Conv1d/Conv2d can run as a "
                             f"linear; got {conv}")
        lin = torch.nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                              device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.reshape(conv.out_channels, conv.in_channels))
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        return cls(Int8Linear.from_float(lin, mode=mode), ndim=conv.weight.dim() - 2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # the channel dim: 1 for batched input, 0 for unbatched (C, L) / (C, H, W) as torch's
        # convs accept
        c = 0 if input.dim() == self.ndim + 1 else 1
        y = self.linear(input.movedim(c, -1))  # (N, *spatial, C)
        return y.movedim(-1, c)

    def to_torch(self) -> torch.nn.Module:
        """The 1x1 ``nn.Conv1d``/``nn.Conv2d`` with the dequantized weight, for export."""
        cls = torch.nn.Conv1d if self.ndim == 1 else torch.nn.Conv2d
        lin = self.linear
        conv = cls(self.in_channels, self.out_channels, 1, bias=lin.bias is not None,
                   device="meta")
        return _int8_to_torch(conv, lin, (lin.activation, lin.act_param))

    def extra_repr(self) -> str:
        return f"conv{self.ndim}d 1x1 as linear"


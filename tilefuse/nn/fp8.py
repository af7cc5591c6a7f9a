"""fp8 inference modules: :class:`Fp8Linear` and :func:`fp8_convert` (the per-module step of
``tilefuse.quantize(model, mode="fp8")``).

Inference only: the fp8 weight and its scales are buffers, not parameters. A buffer set to
require grad makes the forward raise (the fp8 GEMM has no backward); a float input that requires
grad is quantized detached (no gradient flows through the layer), as in ``Int8Linear``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from tilefuse.activations import parse_activation
from tilefuse.fused.fp8 import _fp8_dtype, fp8_linear, quantize_fp8_per_row
from tilefuse.nn._quantized import QuantizedLinearBase
from tilefuse.nn.hf_conv1d import is_hf_conv1d


class Fp8Linear(QuantizedLinearBase):
    """A quantized :class:`torch.nn.Linear`: fp8 weights with per-output-channel fp32 scales,
    activations quantized per row on the fly (one fused kernel), then one fp8 GEMM with fp32
    accumulation applies both scales, the bias and the activation and writes the input's dtype.

    ``dtype`` is the fp8 format of the weight and of the dynamic activations:
    ``torch.float8_e4m3fn`` (default; 3 mantissa bits, max 448) or ``torch.float8_e5m2``.
    ``state_dict`` holds ``weight`` (fp8, ``(out, in)``), ``weight_scale`` (fp32, ``(out,)``) and
    ``bias`` (float, when present), and round-trips through ``load_state_dict``.

    >>> import torch, tilefuse
    >>> lin = torch.nn.Linear(16, 4)
    >>> q = tilefuse.nn.Fp8Linear.from_float(lin)
    >>> x = torch.randn(2, 16)
    >>> bool((q(x) - lin(x)).abs().max() < 0.1)
    True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float8_e4m3fn, activation=None, device=None,
                 bias_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation, self.act_param = parse_activation(activation)
        self._register_quantized_buffers(in_features, out_features, bias, _fp8_dtype(dtype),
                                         device, bias_dtype)

    @classmethod
    def from_float(cls, linear: torch.nn.Module, dtype: torch.dtype = torch.float8_e4m3fn,
                   activation=None) -> "Fp8Linear":
        """Quantize ``linear``'s weight per output channel (absmax / fp8 max, round to nearest
        even) with the fused quantizer.

        ``linear`` is a :class:`torch.nn.Linear` or a Hugging Face ``Conv1D`` (weight ``(in,
        out)``; the result keeps its ``nf``/``nx`` attributes). A :class:`tilefuse.nn.Linear` (or
        ``Conv1DLinear``) keeps its fused activation unless ``activation`` is given.
        """
        w, conv1d, activation = cls._float_weight(linear, activation)
        m = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=dtype,
                activation=activation, device=w.device, bias_dtype=w.dtype)
        return m._load_quantized(linear, conv1d, *quantize_fp8_per_row(w, dtype))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fp8_linear(input, self.weight, self.weight_scale, bias=self.bias,
                          activation=(self.activation, self.act_param))

    def extra_repr(self) -> str:
        act = "" if self.activation == "none" else f", activation={self.activation}"
        fmt = str(self.weight.dtype).replace("torch.", "")
        return f"{self._repr_head()}, dtype={fmt}{act}"


def fp8_convert(module: torch.nn.Module, dtype: torch.dtype = torch.float8_e4m3fn
                ) -> Tuple[Optional[torch.nn.Module], Optional[str]]:
    """The fp8 replacement of one module, for ``tilefuse.quantize(model, mode="fp8")``:
    ``(Fp8Linear, None)`` for a :class:`torch.nn.Linear` (including :class:`tilefuse.nn.Linear`)
    or a Hugging Face ``Conv1D``, else ``(None, reason)`` (convolutions stay in float until the
    dense conv kernel has an fp8 path; embeddings are :class:`tilefuse.nn.QuantizedEmbedding`'s
    business)."""
    if isinstance(module, torch.nn.Linear) or is_hf_conv1d(module):
        return Fp8Linear.from_float(module, dtype=dtype), None
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return None, "fp8 mode converts Linear and HF Conv1D layers only (no fp8 conv kernel)"
    return None, f"{type(module).__name__} has no fp8 version"

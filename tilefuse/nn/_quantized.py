"""What :class:`tilefuse.nn.Int8Linear` and :class:`tilefuse.nn.Fp8Linear` share: the buffer
layout (quantized ``weight`` ``(out, in)``, fp32 per-output-channel ``weight_scale``, float
``bias``), reading the float weight off a ``Linear`` / Hugging Face ``Conv1D`` and loading the
quantized result, and the dequantized weight. Each format keeps its own ``__init__`` arguments,
quantizer and GEMM.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from tilefuse.nn.hf_conv1d import is_hf_conv1d


class QuantizedLinearBase(torch.nn.Module):
    """Base of the per-output-channel quantized linears (not a layer by itself)."""

    def _register_quantized_buffers(self, in_features: int, out_features: int, bias: bool,
                                    weight_dtype: torch.dtype, device,
                                    bias_dtype: Optional[torch.dtype]) -> None:
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=weight_dtype,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device,
                                                     dtype=bias_dtype or torch.float32))
        else:
            self.register_buffer("bias", None)

    @staticmethod
    def _float_weight(linear: torch.nn.Module, activation) -> Tuple[torch.Tensor, bool, object]:
        """``(weight (out, in), is_hf_conv1d, activation)`` of ``linear``: a
        :class:`torch.nn.Linear` or a Hugging Face ``Conv1D``; a :class:`tilefuse.nn.Linear` (or
        ``Conv1DLinear``) hands on its fused activation unless ``activation`` is given."""
        conv1d = is_hf_conv1d(linear)
        if not (isinstance(linear, torch.nn.Linear) or conv1d):
            raise TypeError(f"linear must be a torch.nn.Linear or a Hugging Face Conv1D, got "
                            f"{type(linear).__name__}")
        if activation is None and getattr(linear, "activation", "none") != "none":
            activation = (linear.activation, linear.act_param)
        w = linear.weight.detach()
        if conv1d:
            w = w.t()  # (nx, nf) = (in, out) -> torch's (out, in), a view
        return w, conv1d, activation

    def _load_quantized(self, linear: torch.nn.Module, conv1d: bool, q: torch.Tensor,
                        s: torch.Tensor):
        """Copy the quantized weight ``q`` and its scales ``s`` in, and ``linear``'s bias."""
        if conv1d:  # code reading the replaced module's attributes keeps working
            self.nf, self.nx = q.shape[0], q.shape[1]
        self.weight.copy_(q)
        self.weight_scale.copy_(s.reshape(-1))
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def _repr_head(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")

"""Hugging Face's ``Conv1D`` (GPT-2, GPT, ...) without importing transformers.

``transformers.pytorch_utils.Conv1D(nf, nx)`` is a Linear with a transposed weight: ``weight`` is
``(nx, nf)`` = ``(in, out)`` and ``forward(x) = x @ weight + bias``. :func:`is_hf_conv1d` recognises
it by duck typing (class name ``Conv1D``, an ``nf`` attribute, a 2-D weight of shape ``(nx, nf)``)
so that :func:`tilefuse.patch` and :func:`tilefuse.quantize` handle it like ``nn.Linear``.
"""
from __future__ import annotations

import torch

from tilefuse.activations import parse_activation
from tilefuse.fused.linear import linear as fused_linear


def is_hf_conv1d(m: torch.nn.Module) -> bool:
    """True for a Hugging Face ``Conv1D``: class name ``Conv1D``, ``nf`` attribute, 2-D weight
    ``(nx, nf)`` and a bias of ``nf`` elements (or none)."""
    if type(m).__name__ != "Conv1D" or not isinstance(getattr(m, "nf", None), int):
        return False
    # read the registered tensors directly: under torch.fx tracing, attribute access on a
    # module returns proxies
    w, b = m._parameters.get("weight"), m._parameters.get("bias")
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == m.nf
            and (b is None or (isinstance(b, torch.Tensor) and tuple(b.shape) == (m.nf,))))


class Conv1DLinear(torch.nn.Module):
    """A Hugging Face ``Conv1D`` (``weight`` ``(nx, nf)``) whose forward is one fused kernel
    ``act(x @ weight + bias)``. Same attributes (``nf``, ``nx``), parameters and ``state_dict``
    keys as the ``Conv1D`` it stands in for; the weight is read through strides (no transposed
    copy). :func:`tilefuse.patch` puts it in place of ``Conv1D -> activation`` (GPT-2's MLP).
    """

    def __init__(self, nf: int, nx: int, bias: bool = True, activation=None, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = torch.nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(nf, device=device, dtype=dtype)) \
            if bias else None
        torch.nn.init.normal_(self.weight, std=0.02)
        self.activation, self.act_param = parse_activation(activation)

    @classmethod
    def from_torch(cls, conv1d: torch.nn.Module, activation=None) -> "Conv1DLinear":
        """A fused module sharing ``conv1d``'s parameters (no copy)."""
        if not is_hf_conv1d(conv1d):
            raise TypeError(f"conv1d must be a Hugging Face Conv1D, got {type(conv1d).__name__}")
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.nf, m.nx = conv1d.nf, conv1d.weight.shape[0]
        m.weight, m.bias = conv1d.weight, conv1d.bias
        m.activation, m.act_param = parse_activation(activation)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # HF Conv1D.forward(self, x)
        return fused_linear(x, self.weight.t(), self.bias,
                            activation=(self.activation, self.act_param))

    def extra_repr(self) -> str:
        act = "" if self.activation == "none" else f", activation={self.activation!r}"
        return f"nf={self.nf}, nx={self.nx}{act}"

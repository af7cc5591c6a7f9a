"""``tilefuse.nn.Linear``: drop-in for :class:`torch.nn.Linear` with a fused activation."""
from __future__ import annotations

import torch

from tilefuse.activations import parse_activation
from tilefuse.fused.linear import linear as fused_linear


class Linear(torch.nn.Linear):
    """:class:`torch.nn.Linear` (same constructor, parameters and ``state_dict`` keys) whose
    forward is one fused kernel ``act(x @ W^T + b)``.

    >>> import torch, tilefuse
    >>> m = tilefuse.nn.Linear(8, 4, activation="gelu")
    >>> m.load_state_dict(torch.nn.Linear(8, 4).state_dict())
    <All keys matched successfully>
    >>> m(torch.randn(2, 8)).shape
    torch.Size([2, 4])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, activation=None, dropconnect: float = 0.0) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation, self.act_param = parse_activation(activation)
        from tilefuse._validate import check_probability

        # DropConnect (training only): weight entries dropped in the matmul kernel's load path
        self.dropconnect = check_probability("dropconnect", dropconnect)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if getattr(self, "dropconnect", 0.0) > 0.0 and self.training:
            from tilefuse.fused.dropout import dropconnect_linear

            return dropconnect_linear(input, self.weight, self.bias, p=self.dropconnect,
                                      activation=(self.activation, self.act_param))
        return fused_linear(input, self.weight, self.bias,
                            activation=(self.activation, self.act_param))

    def extra_repr(self) -> str:
        extra = "" if self.activation == "none" else f", activation={self.activation}"
        if getattr(self, "dropconnect", 0.0) > 0.0:
            extra += f", dropconnect={self.dropconnect}"
        return super().extra_repr() + extra

    @classmethod
    def from_torch(cls, linear: torch.nn.Linear, activation=None) -> "Linear":
        """A fused Linear sharing ``linear``'s parameters (no copy)."""
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight = linear.weight
        m.bias = linear.bias
        m.activation, m.act_param = parse_activation(activation)
        return m

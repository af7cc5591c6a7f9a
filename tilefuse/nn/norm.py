"""Drop-in normalization modules with a fused activation (and residual where it makes sense).

Each subclasses the torch module it replaces: same constructor arguments (plus ``activation=``;
other keywords, such as the ``bias=`` newer torch versions add to BatchNorm/GroupNorm, are
passed through), same parameters, buffers and ``state_dict`` keys, so a torch checkpoint loads
unchanged and vice versa. ``forward`` keeps the torch base's signature (``input``; ``x`` for
RMSNorm, as torch names it) and adds ``residual=None`` last where it applies:

* :class:`LayerNormAct`, :class:`RMSNormAct`: ``act(norm(x + residual))`` (pre-norm residual);
* :class:`BatchNormAct1d`, :class:`BatchNormAct2d`: ``act(bn(x) + residual)`` (ResNet block);
* :class:`GroupNormAct`: ``act(group_norm(x))`` (no residual).
"""
from __future__ import annotations

import torch

from tilefuse.activations import parse_activation
from tilefuse.fused.norm import layer_norm_act, rms_norm_act
from tilefuse.fused.norm_bn import batch_norm_act
from tilefuse.fused.norm_group import group_norm_act, instance_norm_act_train


class _ActMixin:
    def _set_activation(self, activation) -> None:
        self.activation, self.act_param = parse_activation(activation)

    def _act(self):
        return (self.activation, self.act_param)

    def extra_repr(self) -> str:
        extra = "" if self.activation == "none" else f", activation={self.activation}"
        if self.activation == "leaky_relu":
            extra += f"({self.act_param})"
        return super().extra_repr() + extra

    @classmethod
    def from_torch(cls, module: torch.nn.Module, activation=None):
        """A fused module sharing ``module``'s parameters and buffers (no copy)."""
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        for k, v in module.__dict__.items():
            if k not in ("_parameters", "_buffers", "_modules") and not k.startswith("_"):
                m.__dict__[k] = v
        m.training = module.training
        for k, p in module._parameters.items():
            m._parameters[k] = p
        for k, b in module._buffers.items():
            m._buffers[k] = b
        m._set_activation(activation)
        return m


class LayerNormAct(_ActMixin, torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` + activation, one kernel; ``forward(input, residual=None)``.

    >>> import torch, tilefuse
    >>> m = tilefuse.nn.LayerNormAct(16, activation="gelu")
    >>> m.load_state_dict(torch.nn.LayerNorm(16).state_dict())
    <All keys matched successfully>
    >>> m(torch.randn(2, 16)).shape
    torch.Size([2, 16])
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, activation=None, **kwargs) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         bias=bias, device=device, dtype=dtype, **kwargs)
        self._set_activation(activation)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None,
                prenorm: bool = False):
        """``prenorm=True``: returns ``(y, h)``, ``h = input + residual`` written by the same
        kernel (the pre-norm residual stream; :func:`tilefuse.ops.layer_norm_act`)."""
        return layer_norm_act(input, self.normalized_shape, self.weight, self.bias, self.eps,
                              activation=self._act(), residual=residual, prenorm=prenorm)


class RMSNormAct(_ActMixin, torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` + activation, one kernel; ``forward(x, residual=None)``."""

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None,
                 activation=None, **kwargs) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine,
                         device=device, dtype=dtype, **kwargs)
        self._set_activation(activation)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                prenorm: bool = False):
        """``prenorm=True``: returns ``(y, h)``, ``h = x + residual`` (as
        :meth:`LayerNormAct.forward`)."""
        return rms_norm_act(x, self.normalized_shape, self.weight, self.eps,
                            activation=self._act(), residual=residual, prenorm=prenorm)


class GroupNormAct(_ActMixin, torch.nn.GroupNorm):
    """:class:`torch.nn.GroupNorm` + activation (NCHW or channels_last, kept).
    ``GroupNormAct(C, C)`` is an InstanceNorm with per-channel affine and no running stats."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, activation=None,
                 **kwargs) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device,
                         dtype=dtype, **kwargs)
        self._set_activation(activation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm_act(input, self.num_groups, self.weight, self.bias, self.eps,
                              activation=self._act())


class _BatchNormActBase(_ActMixin):
    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        # the bookkeeping of torch.nn.modules.batchnorm._BatchNorm.forward; the op increments
        # num_batches_tracked and takes 1 / num_batches_tracked for momentum=None itself (in
        # its finalize kernel: no host sync, no extra launch)
        nbt = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            nbt = self.num_batches_tracked
        momentum = self.momentum if (self.momentum is not None or nbt is not None) else 0.0
        if self.training:
            bn_training = True
        else:
            bn_training = self.running_mean is None and self.running_var is None
        use_running = not self.training or self.track_running_stats
        return batch_norm_act(
            input, self.running_mean if use_running else None,
            self.running_var if use_running else None, self.weight, self.bias,
            training=bn_training, momentum=momentum, eps=self.eps, activation=self._act(),
            residual=residual, num_batches_tracked=nbt)


class BatchNormAct1d(_BatchNormActBase, torch.nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` + residual + activation: ``act(bn(x) + residual)``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 activation=None, **kwargs) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype,
                         **kwargs)
        self._set_activation(activation)


class BatchNormAct2d(_BatchNormActBase, torch.nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` + residual + activation: ``act(bn(x) + residual)``.

    >>> import torch, tilefuse
    >>> m = tilefuse.nn.BatchNormAct2d(8, activation="relu")
    >>> m.load_state_dict(torch.nn.BatchNorm2d(8).state_dict())
    <All keys matched successfully>
    >>> m(torch.randn(2, 8, 4, 4), residual=torch.randn(2, 8, 4, 4)).min() >= 0
    tensor(True)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 activation=None, **kwargs) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype,
                         **kwargs)
        self._set_activation(activation)


class _InstanceNormActBase(_ActMixin):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # torch's checks and messages (rank, num_features vs affine)
        x = input
        if x.dim() not in (self._get_no_batch_dim(), self._get_no_batch_dim() + 1):
            raise ValueError(f"expected {self._get_no_batch_dim()}D or "
                             f"{self._get_no_batch_dim() + 1}D input (got {x.dim()}D input)")
        no_batch = x.dim() == self._get_no_batch_dim()
        if no_batch:
            x = x.unsqueeze(0)
        C = x.shape[1]
        if C != self.num_features and self.affine:
            raise ValueError(f"expected input's size at dim=1 to match num_features "
                             f"({self.num_features}), but got: {C}.")
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats and self.running_mean is not None:
            # InstanceNorm = GroupNorm with one channel per group; running stats in a kernel
            m = 0.0 if self.momentum is None else self.momentum
            y = instance_norm_act_train(x, self.weight, self.bias, self.eps, self._act(),
                                        self.running_mean, self.running_var, m)
        elif use_input_stats:
            y = group_norm_act(x, C, self.weight, self.bias, self.eps, activation=self._act())
        else:
            y = batch_norm_act(x, self.running_mean, self.running_var, self.weight, self.bias,
                               training=False, eps=self.eps, activation=self._act())
        return y.squeeze(0) if no_batch else y


class InstanceNormAct1d(_InstanceNormActBase, torch.nn.InstanceNorm1d):
    """:class:`torch.nn.InstanceNorm1d` + activation (GroupNorm kernel with ``G == C``; eval with
    ``track_running_stats=True`` runs the BatchNorm eval kernel on the running stats)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None,
                 dtype=None, activation=None, **kwargs) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype,
                         **kwargs)
        self._set_activation(activation)


class InstanceNormAct2d(_InstanceNormActBase, torch.nn.InstanceNorm2d):
    """:class:`torch.nn.InstanceNorm2d` + activation (see :class:`InstanceNormAct1d`)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None,
                 dtype=None, activation=None, **kwargs) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype,
                         **kwargs)
        self._set_activation(activation)

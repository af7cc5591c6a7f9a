"""Shared pieces of the model zoo: torchvision-layout building blocks, the ``fused=`` switch,
gradient checkpointing and weight loading.

Every model is written with plain torch modules in the *torchvision attribute layout* (so
``state_dict`` keys match torchvision's where the architecture does) and then, with ``fused=True``
(the default), rewritten by :func:`tilefuse.patch`. The fused modules are whatever tilefuse
provides right now (``BatchNormAct2d``, ``DepthwiseConv2d``, ``Linear(activation=)``,
``Dropout``...); a missing one leaves the torch module in place and ``tilefuse.patch_report``
says so. Patching in train mode keeps every ``state_dict`` key.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never below 90% of v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvNormAct(nn.Sequential):
    """``Conv2d -> BatchNorm2d -> act`` as a Sequential (torchvision's ``Conv2dNormActivation``
    layout: keys ``0.weight``, ``1.weight``, ``1.running_mean``...)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act: Optional[type] = nn.ReLU):
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                            bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)
        self.out_channels = cout


class CheckpointMixin:
    """``model.gradient_checkpointing = True`` recomputes each stage in backward (training only).

    Note: BatchNorm running statistics are updated again during the recomputation (as with any
    ``torch.utils.checkpoint`` use around BN)."""

    gradient_checkpointing: bool = False

    def _stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)


def finish(model: nn.Module, fused: bool) -> nn.Module:
    """Initialise like torchvision, then patch into tilefuse modules when ``fused``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if not fused:
        return model
    from tilefuse.patch import patch

    return patch(model, inplace=True)


def load_state_dict_from(model: nn.Module, source: Union[nn.Module, Mapping[str, torch.Tensor]],
                         strict: bool = True) -> nn.Module:
    """Copy weights from a torch/torchvision-layout model (or its ``state_dict``) into ``model``.

    Keys are matched by name first (tilefuse models use torchvision's attribute layout, and a
    train-mode patch keeps the keys). If the key sets differ, tensors are matched *in order* and
    must agree in shape (the same architecture written with other attribute names); any mismatch
    raises ``ValueError`` naming the first offending pair.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    target = model.state_dict()
    if set(state) == set(target):
        model.load_state_dict(state, strict=strict)
        return model
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        diff = sorted(set(state) ^ set(target))[:4]
        raise ValueError(f"source has {len(src)} tensors but model has {len(dst)}: not the same "
                         f"architecture (first differing keys: {diff})")
    mapped = {}
    for (sk, sv), dk in zip(src, dst):
        if tuple(sv.shape) != tuple(target[dk].shape):
            raise ValueError(f"source {sk} has shape {tuple(sv.shape)} but model {dk} has "
                             f"{tuple(target[dk].shape)}")
        mapped[dk] = sv
    model.load_state_dict(mapped, strict=False)
    return model

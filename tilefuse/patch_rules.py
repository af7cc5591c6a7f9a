"""Building blocks of :func:`tilefuse.patch`: lazy lookup of the fused modules, activation
recognition in an fx graph, and converters that build a fused module *sharing* the parameters and
buffers of the torch module it replaces (so training the patched model trains the original's
weights and :func:`tilefuse.unpatch` needs no copy).

Every fused target is looked up lazily by name (``tilefuse.nn.BatchNormAct2d``...): a rule whose
target is not importable is skipped and reported as ``"left alone: <name> not available"``.
"""
from __future__ import annotations

import importlib
import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tilefuse.activations import activation_from_module  # noqa: F401 (re-exported)

# activations whose double application is exact: act(act(x)) == act(x). A fused ``norm+act`` may
# then leave a shared or functional activation call in place without changing the result.
IDEMPOTENT = {"relu", "relu6", "none"}

_FUNCTIONAL_ACTS = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.gelu: "gelu",
    F.leaky_relu: "leaky_relu",
}
_METHOD_ACTS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def fused_class(name: str, package: str = "tilefuse.nn"):
    """``package.name`` if it can be imported now, else ``None`` (built in parallel by others)."""
    try:
        mod = importlib.import_module(package)
    except Exception:
        return None
    return getattr(mod, name, None)


def is_tilefuse(m: nn.Module) -> bool:
    """A fused tilefuse module (``tilefuse.nn.*``): a leaf for the tracer, never re-patched."""
    return type(m).__module__.startswith("tilefuse.nn")


def node_activation(node, modules) -> Optional[Tuple[str, float, bool]]:
    """``(name, param, removable)`` if fx ``node`` applies a supported activation, else None.

    ``removable`` is True when the node is a call of an activation *module* (which a patch can
    replace by ``nn.Identity``); functional calls (``F.relu(x)``) stay in the graph."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None or is_tilefuse(m):
            return None
        try:
            name, param = activation_from_module(m)
        except ValueError:
            return None
        if name == "none":
            return None
        return name, param, True
    if node.op == "call_function" and node.target in _FUNCTIONAL_ACTS:
        name = _FUNCTIONAL_ACTS[node.target]
        if name == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
            name = "gelu_tanh"
        param = 0.0
        if name == "leaky_relu":
            param = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if not isinstance(param, (int, float)):
                return None
        return name, float(param), False
    if node.op == "call_method" and node.target in _METHOD_ACTS:
        return _METHOD_ACTS[node.target], 0.0, False
    return None


def is_add(node) -> bool:
    adds = (operator.add, operator.iadd, torch.add)
    return (node.op == "call_function" and node.target in adds) \
        or (node.op == "call_method" and node.target in ("add", "add_"))


def act_spec(name: str, param: float):
    from tilefuse.activations import ACTIVATIONS

    return name if param == ACTIVATIONS[name][1] else (name, param)


def is_depthwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups > 1 and conv.groups == conv.in_channels
            and conv.out_channels == conv.in_channels and conv.padding_mode == "zeros")


def _device_of(m: nn.Module):
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        return t.device
    return None


def share_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Make ``new`` use ``old``'s very parameter and buffer tensors (same names)."""
    for name, p in old._parameters.items():
        new._parameters[name] = p
    for name, b in old._buffers.items():
        new._buffers[name] = b
    dev = _device_of(old)
    if dev is not None:
        new.to(dev)  # only moves the fused module's own extra state, shared tensors are there
    new.train(old.training)
    return new


def _ctor_args(old: nn.Module) -> dict:
    if isinstance(old, nn.modules.batchnorm._BatchNorm):
        return dict(num_features=old.num_features, eps=old.eps, momentum=old.momentum,
                    affine=old.affine, track_running_stats=old.track_running_stats)
    if isinstance(old, nn.Conv2d):
        return dict(in_channels=old.in_channels, out_channels=old.out_channels,
                    kernel_size=old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                    padding_mode=old.padding_mode)
    if isinstance(old, nn.LayerNorm):
        kw = dict(normalized_shape=old.normalized_shape, eps=old.eps,
                  elementwise_affine=old.elementwise_affine)
        if old.elementwise_affine and old.bias is None:
            kw["bias"] = False
        return kw
    if isinstance(old, nn.GroupNorm):
        return dict(num_groups=old.num_groups, num_channels=old.num_channels, eps=old.eps,
                    affine=old.affine)
    if hasattr(nn, "RMSNorm") and isinstance(old, nn.RMSNorm):
        return dict(normalized_shape=old.normalized_shape, eps=old.eps,
                    elementwise_affine=old.elementwise_affine)
    if isinstance(old, nn.modules.dropout._DropoutNd):
        return dict(p=old.p, inplace=old.inplace)
    if isinstance(old, nn.Linear):
        return dict(in_features=old.in_features, out_features=old.out_features,
                    bias=old.bias is not None)
    raise TypeError(f"no converter for {type(old).__name__}")


def convert(cls, old: nn.Module, activation=None) -> nn.Module:
    """A ``cls`` instance equivalent to ``old`` (+ ``activation``), sharing its tensors."""
    kwargs = {} if activation is None else {"activation": activation}
    new = None
    if hasattr(cls, "from_torch"):
        try:
            new = cls.from_torch(old, **kwargs)
        except TypeError:
            new = None
    if new is None:
        new = cls(**_ctor_args(old), **kwargs)  # on CPU; share_state moves its extra state
    return share_state(new, old)


class DropoutAdd(nn.Dropout):
    """``residual + dropout(x)`` through :func:`tilefuse.ops.dropout_add` (one pass). A
    ``nn.Dropout`` subclass (same ``p``/``extra_repr``) that :func:`tilefuse.patch` puts in place
    of a Dropout whose output feeds a residual add; called as ``m(x, residual)``. A leaf for
    :class:`Tracer` (its forward checks shapes)."""

    tilefuse_leaf = True

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # noqa
        from tilefuse.ops import dropout_add

        if torch.broadcast_shapes(x.shape, residual.shape) != x.shape:
            return residual + F.dropout(x, self.p, self.training)
        return dropout_add(x, residual, self.p, self.training)


class Tracer(fx.Tracer):
    """fx tracer that keeps tilefuse's fused modules as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_tilefuse(m) or getattr(m, "tilefuse_leaf", False):  # opaque by declaration
            return True
        return super().is_leaf_module(m, qualname)

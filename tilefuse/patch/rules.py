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
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tilefuse.activations import HF_ACTIVATIONS, activation_from_module  # noqa: F401
from tilefuse.nn.hf_conv1d import is_hf_conv1d


@dataclass
class PatchReport:
    """What :func:`tilefuse.patch` replaced and what it left alone (and why)."""
    replaced: List[Tuple[str, str]] = field(default_factory=list)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"tilefuse.patch: {len(self.replaced)} replaced, "
                 f"{len(self.left_alone)} left alone"]
        lines += [f"  replaced   {p or '<root>'}: {d}" for p, d in self.replaced]
        lines += [f"  left alone {p or '<root>'}: {d}" for p, d in self.left_alone]
        return "\n".join(lines)


@dataclass
class PatchState:
    """What :func:`tilefuse.unpatch` needs, kept on the patched model."""
    # path -> (original module, shares tensors with the replacement)
    originals: Dict[str, Tuple[nn.Module, bool]] = field(default_factory=dict)
    report: PatchReport = field(default_factory=PatchReport)
    # owner path -> the instance-level forward it had before (None: the class's)
    forwards: Dict[str, object] = field(default_factory=dict)

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


def conv_blocker(conv: nn.Module) -> Optional[str]:
    """Why ``conv`` cannot become a ``tilefuse.nn.Conv2d`` sharing its parameters, or None: a
    parametrized weight (``weight_norm``...) or forward hooks would be lost by the swap."""
    if getattr(conv, "parametrizations", None) is not None:
        return "parametrized weight"
    if conv._forward_pre_hooks or conv._forward_hooks:
        return "the module has forward hooks (e.g. old-style weight_norm)"
    return None


def is_torch_conv2d(m: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (or the class ``torch.nn.utils.parametrize`` derives from it)."""
    return type(m) is nn.Conv2d or (getattr(m, "parametrizations", None) is not None
                                    and type(m).__mro__[1] is nn.Conv2d)


def owner_of(node) -> str:
    """Path (relative to the traced module) of the module whose ``forward`` created fx ``node``:
    the innermost entry of the tracer's module stack ("" for the traced module itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    value = next(reversed(stack.values()))
    return value[0] if isinstance(value, tuple) else next(reversed(stack))


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


def convert(cls, old: nn.Module, activation=None) -> nn.Module:
    """``cls.from_torch(old[, activation=])``: the fused module equivalent to ``old`` (+
    ``activation``), sharing its parameters and buffers. Every patch target owns that one
    constructor (tests/test_patch.py checks each table target has it)."""
    kwargs = {} if activation is None else {"activation": activation}
    return share_state(cls.from_torch(old, **kwargs), old)


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
    """fx tracer that keeps tilefuse's fused modules as leaves, and the modules in ``opaque`` (a
    collection of modules, or a dict keyed by ``id``: sub-modules whose forward does not trace)."""

    def __init__(self, opaque=()):
        super().__init__()
        self.opaque = set(opaque) if isinstance(opaque, dict) else {id(m) for m in opaque}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_tilefuse(m) or getattr(m, "tilefuse_leaf", False):  # opaque by declaration
            return True
        if id(m) in self.opaque or is_hf_conv1d(m):  # HF Conv1D: one node, like nn.Linear
            return True
        if type(m).__name__ in HF_ACTIVATIONS:  # keep HF activations one call_module node
            return True
        return super().is_leaf_module(m, qualname)


class _FoldGroup:
    """Shared by the :class:`FoldedBatchNorm` placeholders of one :func:`tilefuse.patch` call, so
    that switching the model to ``train()`` warns once, not once per BN."""

    def __init__(self):
        self.members = 0
        self.warned = False


def _stamp(conv: nn.Module) -> tuple:
    """A value fingerprint of a folded conv's tensors (sums of values and squares, fp64): it
    changes when they are overwritten (load_state_dict, an optimizer step) and survives deepcopy,
    ``.to()`` and pickling. Read at mode switches only."""
    with torch.no_grad():
        return tuple(v for t in (conv.weight, conv.bias) if t is not None
                     for v in (t.double().sum().item(), t.double().pow(2).sum().item()))


def _same_stamp(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-3 * max(1.0, abs(y)) for x, y in zip(a, b))


class FoldedBatchNorm(nn.Identity):
    """What :func:`tilefuse.patch` leaves at the path of a BatchNorm2d it folded into the preceding
    conv (eval mode). An ``nn.Identity`` while folded, with no parameters or buffers, so the
    patched model's ``state_dict`` is the folded one.

    ``train()`` unfolds: the original conv is put back in the conv's slot and this module runs the
    original BatchNorm2d (batch statistics, running-stat updates; plus the activation that was
    absorbed into a folded depthwise conv), registering the BN's parameters and buffers under its
    own name. The patched model then computes, trains and saves (``state_dict`` keys) exactly like
    the unpatched model in train mode. ``eval()`` re-folds from the current conv weights and BN
    statistics. The original modules are the ones :func:`tilefuse.unpatch` restores, so unpatch
    round-trips (with the trained values) in either mode. The parameters the model exposes change
    with the mode: build the optimizer after ``train()``. The first ``train()`` warns once.
    """

    tilefuse_leaf = True

    def __init__(self, path, conv_path, slot, conv, bn, folded, act=None, group=None):
        super().__init__()
        # plain attributes (a tuple is not registered): the originals and the folded conv live in
        # the module tree only while they are in use
        self._tf = (path, conv_path, slot, conv, bn, folded, act, group or _FoldGroup())
        self._tf[7].members += 1
        self.unfolded = False
        self.training = False
        self._stamp = _stamp(folded)

    def extra_repr(self) -> str:
        state = "unfolded: original Conv2d + BatchNorm2d" if self.unfolded else "folded"
        return f"{self._tf[0]} ({state})"

    def sync(self) -> None:
        """Point the original BN at the tensors registered here (``.to()`` replaces buffers)."""
        if self.unfolded:
            bn = self._tf[4]
            bn._parameters.update(self._parameters)
            bn._buffers.update(self._buffers)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and not self.unfolded:
            self._unfold()
        elif not mode and self.unfolded:
            self._fold()
        if self.unfolded:
            self._tf[4].train(mode)
        return self

    def _unfold(self) -> None:
        path, conv_path, (parent, name), conv, bn, folded, _, group = self._tf
        if parent._modules.get(name) is not folded:
            warnings.warn(f"tilefuse: {path} was patched in eval mode: its BatchNorm2d is folded "
                          f"into {conv_path}, which has since been replaced, so train() cannot "
                          f"restore batch statistics. Call tilefuse.unpatch(model) and re-patch in "
                          f"train mode for training.", UserWarning, stacklevel=3)
            return
        if not _same_stamp(_stamp(folded), self._stamp):
            warnings.warn(f"tilefuse: {path} was patched in eval mode and the folded weights of "
                          f"{conv_path} changed since (load_state_dict, training in eval mode, "
                          f"...); the BatchNorm statistics cannot be recovered from folded "
                          f"weights, so it stays folded in train mode (no batch statistics). Call "
                          f"tilefuse.unpatch(model) on the original and re-patch in train mode to "
                          f"train with BatchNorm.", UserWarning, stacklevel=3)
            return
        ref = folded.weight
        conv.to(device=ref.device, dtype=ref.dtype)
        bn.to(device=ref.device, dtype=ref.dtype)
        conv.train(True)
        bn.train(True)
        parent._modules[name] = conv
        self._parameters.update(bn._parameters)
        self._buffers.update(bn._buffers)
        self.unfolded = True
        if not group.warned:
            group.warned = True
            others = f" (and {group.members - 1} other folded BatchNorm2d)" \
                if group.members > 1 else ""
            warnings.warn(f"tilefuse: {path}{others} was patched in eval mode with the BatchNorm "
                          f"folded into {conv_path}; train() restores the original Conv2d + "
                          f"BatchNorm2d (batch statistics, running-stat updates) and eval() "
                          f"re-folds them. The model's parameters changed: build the optimizer "
                          f"after train(). For fused training kernels call tilefuse.unpatch(model) "
                          f"and re-patch in train mode.", UserWarning, stacklevel=3)

    def _fold(self) -> None:
        _, _, (parent, name), conv, bn, folded, _, _ = self._tf
        if parent._modules.get(name) is not conv:
            return  # the conv slot was changed meanwhile: stay unfolded (BN in eval mode: exact)
        self.sync()
        w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        folded.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            folded.weight.copy_(w)
            folded.bias.copy_(b)
        folded.train(False)
        parent._modules[name] = folded
        self._stamp = _stamp(folded)
        self._parameters.clear()
        self._buffers.clear()
        self.unfolded = False

    def forward(self, x):  # noqa: D401
        if not self.unfolded:
            return x
        self.sync()
        y = self._tf[4](x)
        act = self._tf[6]
        if act is not None:
            from tilefuse.activations import parse_activation, torch_activation

            y = torch_activation(y, *parse_activation(act))
        return y

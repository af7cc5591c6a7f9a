"""The rule table of :func:`tilefuse.patch`: which torch module starts which pattern, and which
fused ``tilefuse.nn`` class replaces it. The planner (:mod:`tilefuse.patch.planner`) walks each
traced graph and applies the first rule whose ``match`` accepts a module; ``pattern`` names the
planner step that applies it:

========================  ========================================================================
``act``                   module -> activation: the module becomes ``target(activation=act)``
                          (the activation module becomes ``nn.Identity``)
``bn``                    BatchNorm: folded into the preceding conv in eval (rule
                          ``conv_bn_act``, :mod:`tilefuse.patch.fold`), else BN -> act becomes
                          ``target(activation=act)`` (rule ``bn_act``); residual adds are noted
                          for :mod:`tilefuse.patch.residual`
``conv_act``              dense conv -> act (a conv feeding a BN is left to the ``bn`` step)
``residual``              noted for an owner-forward rewrite (:mod:`tilefuse.patch.residual`)
``leaf``                  the module alone (position-independent), replaced by ``target``
========================  ========================================================================

Every target is built with its class's ``from_torch(module, activation=...)`` (sharing the
module's parameters and buffers), looked up lazily by name so a missing class is reported, not
raised. Adding a pattern = one row here (+ the target's ``from_torch``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch.nn as nn

from tilefuse.nn.hf_conv1d import is_hf_conv1d
from tilefuse.patch.rules import is_depthwise, is_torch_conv2d

_RMSNorm = getattr(nn, "RMSNorm", None)


@dataclass(frozen=True)
class Rule:
    ops: Tuple[str, ...]        # the ``patch(ops=...)`` names that enable it (any of them)
    match: Callable[[nn.Module], bool]
    pattern: str                # the planner step: act, bn, conv_act, residual, leaf
    target: Callable[[nn.Module], Optional[str]]  # tilefuse.nn class name for the module
    residual: Optional[str] = None  # a residual candidate the step notes (see residual.py)
    label: Optional[str] = None     # what the report calls the module (default: its class name)
    blockers: bool = False          # check R.conv_blocker (parametrized weight, hooks) first


def _name(n: str):
    return lambda m: n


def _same_name(m: nn.Module) -> str:
    return type(m).__name__


_NORM_TARGETS = {nn.LayerNorm: "LayerNormAct", nn.GroupNorm: "GroupNormAct",
                 _RMSNorm: "RMSNormAct"}

# graph rules: need the module's position (what follows it) in a traced graph
GRAPH_RULES: Tuple[Rule, ...] = (
    Rule(("conv_bn_act", "bn_act"), lambda m: type(m) in (nn.BatchNorm1d, nn.BatchNorm2d), "bn",
         lambda m: "BatchNormAct2d" if isinstance(m, nn.BatchNorm2d) else "BatchNormAct1d"),
    Rule(("linear_act",), lambda m: type(m) is nn.Linear, "act", _name("Linear")),
    Rule(("linear_act",), is_hf_conv1d, "act", _name("Conv1DLinear")),
    Rule(("norm_act",), lambda m: type(m) is nn.LayerNorm
         or (_RMSNorm is not None and type(m) is _RMSNorm), "act",
         lambda m: _NORM_TARGETS[type(m)], residual="add_norm"),
    Rule(("norm_act",), lambda m: type(m) is nn.GroupNorm, "act", _name("GroupNormAct")),
    Rule(("conv",), lambda m: type(m) is nn.Conv2d and not is_depthwise(m), "conv_act",
         _name("Conv2d")),
    Rule(("dropout",), lambda m: type(m) is nn.Dropout, "residual", _name("DropoutAdd"),
         residual="dropout_add"),
)

# leaf rules: every module not already planned, traced or not
LEAF_RULES: Tuple[Rule, ...] = (
    Rule(("conv",), lambda m: is_torch_conv2d(m) and m.groups != m.in_channels, "leaf",
         _name("Conv2d"), label="Conv2d", blockers=True),
    Rule(("depthwise",), is_depthwise, "leaf", _name("DepthwiseConv2d"),
         label="depthwise Conv2d"),
    Rule(("dropout",), lambda m: type(m) in (nn.Dropout, nn.Dropout2d), "leaf", _same_name),
)

ALL_OPS = ("conv_bn_act", "conv", "bn_act", "linear_act", "norm_act", "depthwise", "dropout")

# tilefuse.nn targets that live outside tilefuse.nn's namespace
EXTRA_TARGETS = {"Conv1DLinear": "tilefuse.nn.hf_conv1d"}


def first(rules, module: nn.Module, ops) -> Optional[Rule]:
    """The first rule of ``rules`` enabled by ``ops`` whose ``match`` accepts ``module``."""
    for r in rules:
        if r.match(module) and any(o in ops for o in r.ops):
            return r
    return None


def rule_for(rules, module: nn.Module) -> Optional[Rule]:
    """The first rule of ``rules`` that matches ``module``, enabled or not."""
    for r in rules:
        if r.match(module):
            return r
    return None

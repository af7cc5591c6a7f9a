"""``tilefuse.patch(model)``: rewrite a model's modules into fused tilefuse modules.

How it works: the model is traced with :mod:`torch.fx` (the root if possible; a sub-module whose
forward does not trace becomes one opaque call and is searched on its own, child by child; see
:mod:`tilefuse.patch.trace`) *only to find patterns*; the rewrite itself is module replacement at
the same attribute paths, so the model keeps its class, its attribute names and (in train mode) its
``state_dict`` keys. Replacements share the original parameter and buffer tensors.

Rules (``ops=`` selects a subset; default all):

==============  ==================================================================================
``conv_bn_act`` eval: Conv2d -> BatchNorm2d (-> act) folded into the conv (BN becomes a
                ``FoldedBatchNorm`` Identity that restores conv + BN on ``train()`` and re-folds
                on ``eval()``); the folded conv is ``tilefuse.nn.Conv2d(activation=act)`` (with
                the ``conv`` rule) or ``DepthwiseConv2d(activation=act)`` (depthwise rule), and
                ``conv -> bn -> add(residual) (-> act)`` becomes one ``Conv2d(x, residual)`` with
                ``post_activation=act`` (owner forward rewritten)
``conv``        dense/grouped Conv2d (-> act)  =>  ``tilefuse.nn.Conv2d(activation=act)`` sharing
                the parameters (every mode; in train mode a following BN stays ``BatchNormAct2d``)
``bn_act``      BatchNorm1d/2d -> act  =>  ``BatchNormAct1d/2d(activation=act)``
``linear_act``  Linear -> act  =>  ``tilefuse.nn.Linear(activation=act)``; Hugging Face
                ``Conv1D`` -> act  =>  ``Conv1DLinear(activation=act)`` (GPT-2's MLP)
``norm_act``    LayerNorm/RMSNorm/GroupNorm -> act  =>  ``LayerNormAct``/``RMSNormAct``/...;
                LayerNorm/RMSNorm(x + residual)  =>  ``LayerNormAct``/``RMSNormAct(x, residual)``
``depthwise``   depthwise Conv2d (groups == in == out channels)  =>  ``DepthwiseConv2d``
``dropout``     Dropout/Dropout2d  =>  ``tilefuse.nn.Dropout``/``Dropout2d``
==============  ==================================================================================

The activation module of a fused pattern becomes ``nn.Identity``. When it cannot be removed (the
same module object is called at several places, e.g. torchvision's ``BasicBlock.relu``, or it is a
functional call like ``F.relu``) the pattern is still fused if the activation is idempotent
(ReLU/ReLU6: ``relu(relu(x)) == relu(x)``), else it is left alone and the report says why. Every
declined match (output used elsewhere, module called at several places, activation without a
kernel, activation after a folded dense conv...) is listed under "left alone" with its reason.

Residual patterns (``bn -> add -> act`` in train mode, ``conv -> bn -> add (-> act)`` in eval, ``dropout -> add``, ``norm(x + residual)``)
need the residual passed into the fused op: the module that *owns* them is traced on its own and
that instance gets the rewritten fx ``forward`` (class kept; ``unpatch`` removes it); see
:mod:`tilefuse.patch.residual` and docs/models.md for the limits.
"""
from __future__ import annotations

import copy
import types
from typing import Iterable, Optional

import torch.nn as nn

from tilefuse.patch import fold as PF
from tilefuse.patch import rules as R
from tilefuse.patch import trace as PT
from tilefuse.patch.planner import Planner
from tilefuse.patch.rules import PatchReport, PatchState  # noqa: F401  (PatchState: pickles)
from tilefuse.patch.table import ALL_OPS


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def patch(model: nn.Module, ops: Optional[Iterable[str]] = None, inplace: bool = False,
          verbose: bool = False) -> nn.Module:
    """Rewrite ``model``'s modules into fused tilefuse modules and return the patched model.

    Args:
        model: any ``nn.Module``. Its mode decides the Conv->BN rule: in ``eval()`` BN is folded
            into the conv (inference); in ``train()`` BN+act becomes ``BatchNormAct2d``.
        ops: the rules to apply: one name (``"linear_act"``) or a collection of names from
            ``tilefuse.patch.ALL_OPS``; default all.
        inplace: modify ``model`` itself instead of a deep copy.
        verbose: print the report.

    The report is ``tilefuse.patch_report(patched)``. ``tilefuse.unpatch(patched)`` restores the
    original modules (with their current weights).

    >>> import torch, tilefuse
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> p = tilefuse.patch(m)
    >>> type(p[0]).__module__, type(p[1]).__name__
    ('tilefuse.nn.linear', 'Identity')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ops = ALL_OPS if ops is None else (ops,) if isinstance(ops, str) else tuple(ops)
    unknown = [o for o in ops if o not in ALL_OPS]
    if unknown:
        raise ValueError(f"ops must be a rule name or a collection of rule names from {ALL_OPS}; "
                         f"unknown: {', '.join(map(repr, unknown))}")
    if not inplace:
        model = copy.deepcopy(model)
    state = getattr(model, "_tilefuse_patch", None) or R.PatchState()
    report = PatchReport()
    planner = Planner(model, ops, report)
    untraced = []  # (path, module, why) of modules whose forward torch.fx cannot trace
    for prefix, graph in PT.graphs(model, "", untraced):
        planner.graph(prefix, graph)
    PF.structural_folds(planner, untraced)
    planner.declared_residuals()
    planner.rewrite_owners()
    planner.leaves()
    root = planner.plan.pop("", None)
    if root is not None:  # a rule matched the model itself: nothing holds it to replace it in
        report.left_alone.append(("", f"{root[2]}: not applied, the model itself is that module "
                                      f"(patch replaces sub-modules; build the fused module "
                                      f"directly, e.g. tilefuse.nn.Conv2d.from_torch)"))
    for path, (new, shared, descr) in planner.plan.items():
        old = model.get_submodule(path)
        if path not in state.originals:
            state.originals[path] = (old, shared)
        _set(model, path, new.train(old.training))
        if not isinstance(new, nn.Identity):
            report.replaced.append((path, descr))
    for owner_path, fn in planner.forwards.items():
        owner = model.get_submodule(owner_path)
        state.forwards.setdefault(owner_path, owner.__dict__.get("forward"))
        owner.forward = types.MethodType(fn, owner)
        report.replaced.append((owner_path, "forward rewritten by torch.fx (residual fusion)"))
    state.report = report
    model._tilefuse_patch = state
    if verbose:
        print(report)
    return model


def patch_report(model: nn.Module) -> PatchReport:
    """The report of the last :func:`patch` on ``model`` (an empty report if never patched)."""
    state = getattr(model, "_tilefuse_patch", None)
    return state.report if state is not None else PatchReport()


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the modules :func:`patch` replaced (in place; returns ``model``).

    Parameters and buffers the replacements shared are the originals' (trained values carry over;
    re-bound in case ``.to()`` replaced buffer tensors). Folded convs are dropped and the original
    conv + BN come back unchanged (moved to the model's device)."""
    state = getattr(model, "_tilefuse_patch", None)
    if state is None:
        return model
    for m in model.modules():  # train()-restored BNs: their tensors may have been moved
        if isinstance(m, R.FoldedBatchNorm):
            m.sync()
    for path in sorted(state.originals, key=lambda p: -p.count(".")):
        orig, shared = state.originals[path]
        current = model.get_submodule(path)
        if shared:
            R.share_state(orig, current)
        else:
            dev = next(iter(model.parameters()), None)
            if dev is not None:
                orig.to(dev.device)
            orig.train(current.training)
        _set(model, path, orig)
    for path, old in state.forwards.items():
        owner = model.get_submodule(path)
        owner.__dict__.pop("forward", None)
        if old is not None:
            owner.forward = old
    del model._tilefuse_patch
    return model
patch.ALL_OPS = ALL_OPS

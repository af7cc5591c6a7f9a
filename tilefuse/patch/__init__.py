"""``tilefuse.patch(model)``: rewrite a model's modules into fused tilefuse modules.

How it works: the model is traced with :mod:`torch.fx` (the root if possible; a sub-module whose
forward does not trace becomes one opaque call and is searched on its own, child by child; see
:mod:`tilefuse.patch_trace`) *only to find patterns*; the rewrite itself is module replacement at
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
:mod:`tilefuse.patch_residual` and docs/models.md for the limits.
"""
from __future__ import annotations

import copy
import types
from typing import Dict, Iterable, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from tilefuse import patch_fold as PF
from tilefuse import patch_residual as PR
from tilefuse import patch_rules as R
from tilefuse import patch_trace as PT
from tilefuse.nn.hf_conv1d import Conv1DLinear, is_hf_conv1d
from tilefuse.patch_rules import PatchReport, PatchState  # noqa: F401  (PatchState: pickles)

ALL_OPS = ("conv_bn_act", "conv", "bn_act", "linear_act", "norm_act", "depthwise", "dropout")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Planner:
    def __init__(self, model: nn.Module, ops: Iterable[str], report: PatchReport):
        self.model = model
        self.ops = set(ops)
        self.report = report
        self.plan: Dict[str, Tuple[nn.Module, bool, str]] = {}  # path -> (new, shared, descr)
        self.modules = dict(model.named_modules())
        self.candidates: List[Tuple[str, str]] = []  # (kind, module path) for owner rewrites
        self.forwards: Dict[str, object] = {}  # owner path -> rewritten forward function
        self.fold_group = R._FoldGroup()  # shared by this patch's FoldedBatchNorm placeholders

    def replace(self, path, new, shared, descr):
        self.plan[path] = (new, shared, descr)

    def skip(self, path, why):
        if (path, why) not in self.report.left_alone:
            self.report.left_alone.append((path, why))

    def _act_after(self, node, calls, mods, path=None):
        """The activation applied to ``node``'s output, if ``node`` has exactly one user.

        With ``path`` (a pattern the caller would fuse), a declined match is reported: the output
        also feeds something else, or the next module is an activation without a kernel."""
        users = list(node.users)
        what = type(mods[node.target]).__name__ if node.op == "call_module" else str(node.target)
        if len(users) != 1:
            acts = [a for a in (R.node_activation(u, mods) for u in users) if a is not None]
            if path is not None and acts:
                self.skip(path, f"{what} -> {acts[0][0]}: not fused, the {what} output is also "
                                f"used elsewhere ({len(users)} users)")
            return None, None
        act = R.node_activation(users[0], mods)
        if act is None:
            nxt = mods.get(users[0].target) if users[0].op == "call_module" else None
            if (path is not None and nxt is not None and not R.is_tilefuse(nxt)
                    and type(nxt).__module__ == "torch.nn.modules.activation"
                    and not isinstance(nxt, nn.MultiheadAttention)):
                self.skip(path, f"{what} -> {type(nxt).__name__}: not fused, no fused kernel "
                                f"for {type(nxt).__name__}")
            return None, None
        name, param, removable = act
        if removable and calls[users[0].target] != 1:
            removable = False
        return users[0], (name, param, removable)

    def _multi_call(self, node, prefix, calls, mods):
        """A module that would start a pattern but is called at several places: report it."""
        m = mods[node.target]
        rule = {nn.Linear: "linear_act", nn.BatchNorm1d: "bn_act", nn.BatchNorm2d: "bn_act",
                nn.LayerNorm: "norm_act", nn.GroupNorm: "norm_act"}.get(type(m))
        if rule is None and type(m) is getattr(nn, "RMSNorm", None):
            rule = "norm_act"
        if rule not in self.ops or _join(prefix, node.target) in self.plan:
            return
        users = list(node.users)
        act = R.node_activation(users[0], mods) if len(users) == 1 else None
        if act is not None:
            self.skip(_join(prefix, node.target),
                      f"{type(m).__name__} -> {act[0]}: not fused, the module is called at "
                      f"{calls[node.target]} places")

    def _absorb(self, path, act_node, act, prefix, what):
        """Decide what happens to the activation after a fused producer; False = give up."""
        name, param, removable = act
        if removable:
            self.replace(_join(prefix, act_node.target), nn.Identity(), False,
                         f"absorbed into {what}")
            return True
        if name in R.IDEMPOTENT:
            return True  # kept in place: act(act(x)) == act(x)
        where = "shared by several call sites" if act_node.op == "call_module" else "functional"
        self.skip(path, f"{what}: activation {name} is {where} and not idempotent")
        return False

    def graph(self, prefix: str, graph: fx.Graph) -> None:
        mods = {n.target: self.modules[_join(prefix, n.target)] for n in graph.nodes
                if n.op == "call_module"}
        calls: Dict[str, int] = {}
        for n in graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        done = set()
        for node in graph.nodes:
            if node.op != "call_module" or node.target in done:
                continue
            if calls[node.target] != 1:
                self._multi_call(node, prefix, calls, mods)
                continue
            m = mods[node.target]
            path = _join(prefix, node.target)
            if path in self.plan:
                continue
            kind = type(m)
            if kind in (nn.BatchNorm2d, nn.BatchNorm1d):
                self._bn(node, m, path, prefix, calls, mods, done)
            elif (kind is nn.Linear or is_hf_conv1d(m)) and "linear_act" in self.ops:
                act_node, act = self._act_after(node, calls, mods, path)
                target = "Linear" if kind is nn.Linear else "Conv1DLinear"
                if act is None or not self._absorb(path, act_node, act, prefix, target):
                    continue
                cls = R.fused_class("Linear") if kind is nn.Linear else Conv1DLinear
                new = R.convert(cls, m, R.act_spec(act[0], act[1]))
                self.replace(path, new, True,
                             f"{kind.__name__} -> {act[0]}: {target}(activation={act[0]!r})")
            elif kind in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) \
                    and "norm_act" in self.ops:
                src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
                if kind is not nn.GroupNorm and isinstance(src, fx.Node) and R.is_add(src):
                    self.candidates.append(("add_norm", path))  # norm(x + residual)
                act_node, act = self._act_after(node, calls, mods, path)
                if act is None:
                    continue
                target = {nn.LayerNorm: "LayerNormAct", nn.GroupNorm: "GroupNormAct"}.get(
                    kind, "RMSNormAct")
                cls = R.fused_class(target)
                if cls is None:
                    self.skip(path, f"{kind.__name__} -> {act[0]}: tilefuse.nn.{target} not "
                                    f"available")
                elif self._absorb(path, act_node, act, prefix, target):
                    self.replace(path, R.convert(cls, m, R.act_spec(act[0], act[1])), True,
                                 f"{kind.__name__} -> {act[0]}: {target}")
            elif kind is nn.Conv2d and "conv" in self.ops and not R.is_depthwise(m):
                self._conv_act(node, m, path, prefix, calls, mods)
            elif kind is nn.Dropout and "dropout" in self.ops:
                users = list(node.users)
                if len(users) == 1 and R.is_add(users[0]):
                    self.candidates.append(("dropout_add", path))

    def _conv_act(self, node, conv, path, prefix, calls, mods):
        """Dense Conv2d -> act => ``tilefuse.nn.Conv2d(activation=act)``. A conv feeding a BN is
        left to the BN rules (folded in eval; in train the conv is converted by :meth:`leaves`)."""
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and \
                type(mods.get(users[0].target)) is nn.BatchNorm2d:
            return
        act_node, act = self._act_after(node, calls, mods, path)
        if act is None or R.conv_blocker(conv) is not None:
            return  # a plain conv: leaves() converts it (or reports why not)
        cls = R.fused_class("Conv2d")
        if cls is not None and self._absorb(path, act_node, act, prefix, "Conv2d"):
            self.replace(path, R.convert(cls, conv, R.act_spec(act[0], act[1])), True,
                         f"Conv2d -> {act[0]}: Conv2d(activation={act[0]!r})")

    def _bn(self, node, bn, path, prefix, calls, mods, done):
        conv_node = node.args[0] if node.args else None
        conv = None
        folding = not self.model.training and "conv_bn_act" in self.ops
        if (isinstance(conv_node, fx.Node) and conv_node.op == "call_module"
                and type(mods[conv_node.target]) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d)):
            cpath = _join(prefix, conv_node.target)
            if len(conv_node.users) != 1:
                if folding:
                    self.skip(cpath, "Conv2d -> BatchNorm2d not folded: the conv's output is "
                                     "also used elsewhere")
            elif calls[conv_node.target] != 1:
                if folding:
                    self.skip(cpath, f"Conv2d -> BatchNorm2d not folded: the conv is called at "
                                     f"{calls[conv_node.target]} places")
            else:
                conv = mods[conv_node.target]
        act_node, act = self._act_after(node, calls, mods)
        if folding and conv is not None and not (bn.track_running_stats
                                                and bn.running_mean is not None):
            self.skip(path, "Conv2d -> BatchNorm2d not folded: the BN has no running statistics "
                            "(track_running_stats=False)")
        elif folding and conv is not None:
            act_path = _join(prefix, act_node.target) \
                if act is not None and act_node.op == "call_module" else None
            PF.fold(self, _join(prefix, conv_node.target), conv, path, bn, act_path, act)
            done.add(conv_node.target)
            users = list(node.users)
            if act is None and len(users) == 1 and R.is_add(users[0]):
                # conv -> bn -> add(residual) (-> act): the residual joins the conv's epilogue
                self.candidates.append(("conv_bn_add", path, _join(prefix, R.owner_of(
                    users[0]))))
            return
        if "bn_act" not in self.ops:
            return
        act_node, act = self._act_after(node, calls, mods, path)
        users = list(node.users)
        if act is None and self.model.training and len(users) == 1 and R.is_add(users[0]):
            self.candidates.append(("bn_add_act", path))
        if act is None:
            return
        name = "BatchNormAct2d" if isinstance(bn, nn.BatchNorm2d) else "BatchNormAct1d"
        cls = R.fused_class(name)
        if cls is None:
            self.skip(path, f"BatchNorm -> {act[0]}: tilefuse.nn.{name} not available")
            return
        if self._absorb(path, act_node, act, prefix, name):
            self.replace(path, R.convert(cls, bn, R.act_spec(act[0], act[1])), True,
                         f"{type(bn).__name__} -> {act[0]}: {name}")

    def declared_residuals(self) -> None:
        PR.declared_residuals(self)

    def rewrite_owners(self) -> None:
        PR.rewrite_owners(self)

    def leaves(self) -> None:
        """Position-independent rules, applied to every module (traced or not)."""
        fused_parents: List[str] = []
        for path, m in self.model.named_modules():
            if path in self.plan:
                continue
            if any(path.startswith(p + ".") for p in self.plan):
                continue
            if any(path.startswith(p + ".") or not p for p in fused_parents):
                continue  # inside a fused module (e.g. DepthwiseSeparableConv2d's pointwise)
            if R.is_tilefuse(m):
                fused_parents.append(path)
                continue
            if R.is_torch_conv2d(m) and m.groups != m.in_channels and "conv" in self.ops:
                cls, why = R.fused_class("Conv2d"), R.conv_blocker(m)
                if cls is None or why is not None:
                    why = why or "tilefuse.nn.Conv2d not available"
                    self.skip(path, f"Conv2d: not converted ({why})")
                else:
                    self.replace(path, R.convert(cls, m), True, "Conv2d: tilefuse.nn.Conv2d")
            elif R.is_depthwise(m) and "depthwise" in self.ops:
                cls = R.fused_class("DepthwiseConv2d")
                if cls is None:
                    self.skip(path, "depthwise Conv2d: tilefuse.nn.DepthwiseConv2d not available")
                else:
                    self.replace(path, R.convert(cls, m), True, "depthwise Conv2d: DepthwiseConv2d")
            elif type(m) in (nn.Dropout, nn.Dropout2d) and "dropout" in self.ops:
                name = type(m).__name__
                cls = R.fused_class(name)
                if cls is None:
                    self.skip(path, f"{name}: tilefuse.nn.{name} not available")
                else:
                    self.replace(path, R.convert(cls, m), True, f"{name}: tilefuse.nn.{name}")


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
    planner = _Planner(model, ops, report)
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

"""The planner of :func:`tilefuse.patch`: walks each traced graph in order and, for every module
call, applies the first rule of :data:`tilefuse.patch.table.GRAPH_RULES` that matches it (the
rule's ``pattern`` names the step below), then the residual rules (owner rewrites,
:mod:`tilefuse.patch.residual`) and the position-independent :data:`~tilefuse.patch.table.LEAF_RULES`.
The result is a plan: path -> (new module, shares tensors, description), plus the declined
matches and their reasons in the report."""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch.fx as fx
import torch.nn as nn

from tilefuse.patch import fold as PF
from tilefuse.patch import residual as PR
from tilefuse.patch import rules as R
from tilefuse.patch import table as T
from tilefuse.patch.rules import PatchReport


def _target_class(name: str):
    """The tilefuse.nn class named ``name`` (None if it cannot be imported now)."""
    return R.fused_class(name, T.EXTRA_TARGETS.get(name, "tilefuse.nn"))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class Planner:
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
        rule = T.first(T.GRAPH_RULES, m, self.ops)
        if rule is None or rule.pattern not in ("act", "bn") or \
                _join(prefix, node.target) in self.plan:
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
            rule = T.first(T.GRAPH_RULES, m, self.ops)
            if rule is not None:
                getattr(self, "_" + rule.pattern)(rule, node, m, path, prefix, calls, mods, done)

    def _act(self, rule, node, m, path, prefix, calls, mods, done):
        """``module -> activation`` => ``target(activation=act)``; a norm whose input is an add
        is also noted for the ``norm(x + residual)`` owner rewrite."""
        if rule.residual is not None:
            src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if isinstance(src, fx.Node) and R.is_add(src):
                self.candidates.append((rule.residual, path))
        act_node, act = self._act_after(node, calls, mods, path)
        if act is None:
            return
        target = rule.target(m)
        cls = _target_class(target)
        kind = type(m).__name__
        if cls is None:
            self.skip(path, f"{kind} -> {act[0]}: tilefuse.nn.{target} not available")
        elif self._absorb(path, act_node, act, prefix, target):
            self.replace(path, R.convert(cls, m, R.act_spec(act[0], act[1])), True,
                         f"{kind} -> {act[0]}: {target}(activation={act[0]!r})")

    def _residual(self, rule, node, m, path, prefix, calls, mods, done):
        users = list(node.users)
        if len(users) == 1 and R.is_add(users[0]):
            self.candidates.append((rule.residual, path))

    def _conv_act(self, rule, node, conv, path, prefix, calls, mods, done):
        """Dense Conv2d -> act => ``tilefuse.nn.Conv2d(activation=act)``. A conv feeding a BN is
        left to the BN rules (folded in eval; in train the conv is converted by :meth:`leaves`)."""
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and \
                type(mods.get(users[0].target)) is nn.BatchNorm2d:
            return
        act_node, act = self._act_after(node, calls, mods, path)
        if act is None or R.conv_blocker(conv) is not None:
            return  # a plain conv: leaves() converts it (or reports why not)
        cls = _target_class(rule.target(conv))
        if cls is not None and self._absorb(path, act_node, act, prefix, "Conv2d"):
            self.replace(path, R.convert(cls, conv, R.act_spec(act[0], act[1])), True,
                         f"Conv2d -> {act[0]}: Conv2d(activation={act[0]!r})")

    def _bn(self, rule, node, bn, path, prefix, calls, mods, done):
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
        name = rule.target(bn)
        cls = _target_class(name)
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
            rule = T.first(T.LEAF_RULES, m, self.ops)
            if rule is None:
                continue
            target = rule.target(m)
            label = rule.label or type(m).__name__
            cls = _target_class(target)
            why = R.conv_blocker(m) if rule.blockers else None
            if cls is None or why is not None:
                self.skip(path, f"{label}: not converted "
                                f"({why or f'tilefuse.nn.{target} not available'})")
            else:
                self.replace(path, R.convert(cls, m), True, f"{label}: tilefuse.nn.{target}")

"""Residual rules of :func:`tilefuse.patch`: patterns that need the residual *passed into* the
fused op, so the module that owns the ``add`` gets a rewritten ``forward``.

* ``bn -> add -> act`` (train mode)      => ``BatchNormAct2d(act)`` called as ``bn(x, residual)``
* ``conv -> bn -> add (-> act)`` (eval)   => :func:`conv_bn_add`: the folded ``tilefuse.nn.Conv2d``
  called as ``conv(x, residual)`` with ``post_activation=act`` (one kernel: ResNet's
  ``relu(bn2(conv2(x)) + identity)``, MobileNetV2's ``x + bn(conv(h))``)
* ``dropout -> add``                     => ``DropoutAdd(x, residual)`` (``ops.dropout_add``)
* ``LayerNorm/RMSNorm(x + residual)``    => ``LayerNormAct/RMSNormAct(x, residual)`` (post-norm
  transformer blocks: BERT's output block, ``nn.TransformerEncoderLayer``-style forwards)
* ``LayerNorm(dropout(x) + residual)``   => :func:`add_norm`: ``dropout_add`` + ``LayerNormAct``
  while the dropout is active (train, ``p > 0``), one ``LayerNormAct(x, residual)`` otherwise

The owner is traced on its own with :mod:`torch.fx`, its graph is edited and the generated
``forward`` is bound to that instance (class, attributes and other methods kept; ``unpatch``
removes it). Also here: the *declared* residual fusion (``tilefuse_residual``) of tilefuse.models.
"""
from __future__ import annotations

import inspect

import operator
from typing import Dict, List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from tilefuse.patch import rules as R
from tilefuse.activations import parse_activation

# rewrites of one owner run in this order: dropout -> add first, so that an add -> norm rule
# right after it sees the DropoutAdd call and can take it in (Dropout -> add -> LayerNorm)
_ORDER = {"bn_add_act": 0, "conv_bn_add": 0, "dropout_add": 1, "add_norm": 2}
_NORM_TARGETS = {"LayerNorm": "LayerNormAct", "RMSNorm": "RMSNormAct"}
_LABEL = {"bn_add_act": "bn -> add -> act", "conv_bn_add": "conv -> bn -> add (-> act)",
          "dropout_add": "dropout -> add",
          "add_norm": "norm(x + residual)"}


def _path(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _fits(x, residual) -> bool:
    """``norm(x, residual)`` is valid: same dtype/device and ``residual`` broadcasts to ``x``."""
    return (isinstance(x, torch.Tensor) and isinstance(residual, torch.Tensor)
            and x.dtype == residual.dtype and x.device == residual.device
            and torch.broadcast_shapes(x.shape, residual.shape) == x.shape)


def add_norm(norm: nn.Module, x, residual, dropout: nn.Module = None):
    """``norm(x + residual)`` (``norm(dropout(x) + residual)`` with ``dropout``) where ``norm`` is a
    fused ``LayerNormAct``/``RMSNormAct``: the sum is computed inside the norm kernel.

    With an active ``dropout`` (a :class:`tilefuse.patch.rules.DropoutAdd`, training, ``p > 0``)
    the sum is ``tilefuse.ops.dropout_add`` (one pass) and the norm gets it without residual; in
    eval or with ``p == 0`` the dropout is the identity and the norm takes ``(x, residual)``.
    Operands the fused norm cannot take (different dtypes, e.g. under autocast, or a residual
    that does not broadcast to the other operand) fall back to ``norm(x + residual)``."""
    if isinstance(x, fx.Proxy) or isinstance(residual, fx.Proxy):  # traced again: plain math
        return norm(x + residual if dropout is None else dropout(x, residual))
    if dropout is not None and dropout.training and dropout.p > 0:
        return norm(dropout(x, residual))
    if R.is_tilefuse(norm):
        if _fits(x, residual):
            return norm(x, residual)
        if _fits(residual, x):
            return norm(residual, x)
    return norm(x + residual)


def add_norm_prenorm(norm: nn.Module, x, residual):
    """``(norm(h), h)`` with ``h = x + residual`` for a pre-norm residual stream (the sum feeds the
    norm *and* later code): one ``LayerNormAct``/``RMSNormAct(x, residual, prenorm=True)`` call
    writes both. Operands the fused norm cannot take fall back to the two torch steps."""
    if isinstance(x, fx.Proxy) or isinstance(residual, fx.Proxy):  # traced again: plain math
        h = x + residual
        return norm(h), h
    if R.is_tilefuse(norm):
        if _fits(x, residual):
            return norm(x, residual, prenorm=True)
        if _fits(residual, x):
            return norm(residual, x, prenorm=True)
    h = x + residual
    return norm(h), h


def conv_bn_add(conv: nn.Module, bn: nn.Module, x, residual, post=None):
    """``post(bn(conv(x)) + residual)`` for an eval-patched ``conv -> bn -> add (-> post)``: one
    fused call ``conv(x, residual)`` while the BN is folded into ``conv`` (a ``tilefuse.nn``
    conv whose ``post_activation`` is ``post``: ``Conv2d``, or the ``Int8Conv2d`` that
    ``tilefuse.quantize`` makes of it). After ``train()`` (the BN unfolded: the original
    ``Conv2d`` and ``BatchNorm2d`` are back) the torch ops run, with batch statistics."""
    if R.is_tilefuse(conv) and not getattr(bn, "unfolded", False):
        return conv(x, residual)
    from tilefuse.activations import parse_activation, torch_activation

    y = bn(conv(x)) + residual
    name, param = parse_activation(post)
    return y if name == "none" else torch_activation(y, name, param)


# ---- owner-forward rewriters: (planner, graph, node, owner_path, mods, calls) -> changed?
def residual_of(add, node):
    """The other operand of a binary ``add`` node whose one operand is ``node``."""
    if len(node.users) != 1 or not R.is_add(add) or add.op != "call_function" \
            or len(add.args) != 2 or add.kwargs:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    return other if isinstance(other, fx.Node) and other is not node else None


def rw_dropout_add(planner, graph, node, owner_path, mods, calls):
    """``dropout -> add`` in ``graph`` => one ``DropoutAdd(x, residual)`` call."""
    add = next(iter(node.users))
    residual = residual_of(add, node)
    path = _path(owner_path, node.target)
    if residual is None:
        planner.skip(path, "Dropout -> add: not fused, not a binary add of two tensors")
        return False
    if R.fused_class("dropout_add", "tilefuse.ops") is None:
        planner.skip(path, "Dropout -> add: tilefuse.ops.dropout_add not available")
        return False
    drop = mods[node.target]
    new = R.DropoutAdd(drop.p, drop.inplace)
    planner.replace(_path(owner_path, node.target), new, False,
                    "Dropout -> add(residual): tilefuse.ops.dropout_add (owner forward rewritten)")
    with graph.inserting_before(add):
        fused = graph.call_module(node.target, (node.args[0], residual))
    add.replace_all_uses_with(fused)
    graph.erase_node(add)
    graph.erase_node(node)
    return True


def rw_bn_add_act(planner, graph, node, owner_path, mods, calls):
    """``bn -> add -> act`` in ``graph`` => one ``BatchNormAct2d(x, residual)`` call."""
    add = next(iter(node.users))
    if not R.is_add(add):
        return False  # the add is outside this owner's forward (e.g. a downsample branch)
    residual = residual_of(add, node)
    cls = R.fused_class("BatchNormAct2d")
    path = _path(owner_path, node.target)
    what = f"{type(mods[node.target]).__name__} -> add(residual)"
    if residual is None:
        planner.skip(path, f"{what}: not fused, not a binary add of two tensors")
        return False
    if not isinstance(mods[node.target], nn.BatchNorm2d):
        return False
    if cls is None:
        planner.skip(path, f"{what}: tilefuse.nn.BatchNormAct2d not available")
        return False
    act_node, act = planner._act_after(add, calls, mods)
    if act is None:
        planner.skip(path, f"{what}: not fused, the sum is not followed by one supported "
                           f"activation (used elsewhere, or none)")
        return False
    name, param, _ = act
    bn = mods[node.target]
    planner.replace(_path(owner_path, node.target), R.convert(cls, bn, R.act_spec(name, param)),
                    True, f"BatchNorm2d -> add(residual) -> {name}: BatchNormAct2d(residual) "
                          f"(owner forward rewritten)")
    with graph.inserting_before(act_node):
        fused = graph.call_module(node.target, (node.args[0], residual))
    act_node.replace_all_uses_with(fused)
    for n in (act_node, add, node):
        graph.erase_node(n)
    return True


def rw_conv_bn_add(planner, graph, node, owner_path, mods, calls):
    """``conv -> bn -> add (-> act)`` in eval, the BN folded into a ``tilefuse.nn.Conv2d`` =>
    one :func:`conv_bn_add` call (the planned conv gets ``post_activation=act``)."""
    add = next(iter(node.users))
    conv_node = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not R.is_add(add) or not isinstance(conv_node, fx.Node) or conv_node.op != "call_module" \
            or len(conv_node.users) != 1 or len(conv_node.args) != 1 or conv_node.kwargs:
        return False
    cpath = _path(owner_path, conv_node.target)
    planned = planner.plan.get(cpath)
    cls = R.fused_class("Conv2d")
    if planned is None or cls is None or type(planned[0]) is not cls \
            or planned[0].post_activation[0] != "none":
        return False
    residual = residual_of(add, node)
    if residual is None:
        planner.skip(_path(owner_path, node.target), "Conv2d -> BatchNorm2d -> add(residual): "
                                                     "not fused, not a binary add of two tensors")
        return False
    act_node, act = planner._act_after(add, calls, mods)
    post = None if act is None else R.act_spec(act[0], act[1])
    conv = planned[0]
    conv.post_activation = parse_activation(post)
    shown = "" if post is None else f" -> {act[0]}"
    planner.replace(cpath, conv, planned[1],
                    f"{planned[2]}; add(residual){shown}: Conv2d(x, residual, post_activation="
                    f"{None if post is None else act[0]!r}) (owner forward rewritten)")
    end = add if act_node is None else act_node
    with graph.inserting_before(end):
        fused = graph.call_function(conv_bn_add, (graph.get_attr(conv_node.target),
                                                  graph.get_attr(node.target),
                                                  conv_node.args[0], residual, post))
    end.replace_all_uses_with(fused)
    for n in ((act_node,) if act_node is not None else ()) + (add, node, conv_node):
        graph.erase_node(n)
    return True


def add_operands(add):
    """``(a, b)`` of ``a + b`` when the fused norm can take it: a binary tensor add (its sum may
    have other users: the pre-norm form writes it out) and, for ``a += b``, whose ``a`` and sum
    are used nowhere else (they would see the mutation). Else a reason string."""
    if not R.is_add(add) or add.op != "call_function" or len(add.args) != 2 or add.kwargs:
        return "the add is not a plain binary add"
    a, b = add.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return "one operand of the add is not a tensor"
    if add.target is operator.iadd and (len(a.users) != 1 or len(add.users) != 1):
        return "in-place add whose target is used elsewhere"
    return a, b


def rw_add_norm(planner, graph, node, owner_path, mods, calls):
    """``norm(x + residual)`` / ``norm(DropoutAdd(x, residual))`` => :func:`add_norm` call with
    the norm converted to ``LayerNormAct``/``RMSNormAct`` (or already converted by ``norm_act``
    when an activation follows)."""
    path = _path(owner_path, node.target)
    norm = mods[node.target]
    kind = type(norm).__name__
    target = _NORM_TARGETS[kind]
    cls = R.fused_class(target)
    src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    planned = planner.plan.get(path)
    if cls is None:
        planner.skip(path, f"{kind}(x + residual): tilefuse.nn.{target} not available")
        return False
    if planned is not None and not isinstance(planned[0], cls):
        return False
    drop, prenorm = None, False
    if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
            and isinstance(planner.plan.get(_path(owner_path, src.target), (None,))[0],
                           R.DropoutAdd)):
        drop, (x, residual) = src, src.args
        what = f"Dropout -> add(residual) -> {kind}: dropout_add + {target} (train), " \
               f"{target}(x, residual) (eval)"
    else:
        ops = add_operands(src) if isinstance(src, fx.Node) else "input is not an add"
        if isinstance(ops, str):
            planner.skip(path, f"{kind}(x + residual): {ops}")
            return False
        x, residual = ops
        prenorm = len(src.users) > 1
        what = (f"add(residual) -> {kind} (pre-norm stream): {target}(x, residual, prenorm=True)"
                if prenorm else f"add(residual) -> {kind}: {target}(x, residual)")
    if planned is None:
        planner.replace(path, R.convert(cls, norm), True, what + " (owner forward rewritten)")
    else:
        planner.replace(path, planned[0], planned[1], planned[2] + "; " + what)
    if drop is None and prenorm:  # y, h from one call, placed where the sum was
        with graph.inserting_after(src):
            mod = graph.get_attr(node.target)
        with graph.inserting_after(mod):
            fused = graph.call_function(add_norm_prenorm, (mod, x, residual))
        with graph.inserting_after(fused):
            y = graph.call_function(operator.getitem, (fused, 0))
            h = graph.call_function(operator.getitem, (fused, 1))
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        src.replace_all_uses_with(h)
        graph.erase_node(src)
        return True
    with graph.inserting_before(node):
        args = (graph.get_attr(node.target), x, residual)
        if drop is not None:
            args += (graph.get_attr(drop.target),)
        fused = graph.call_function(add_norm, args)
    node.replace_all_uses_with(fused)
    graph.erase_node(node)
    graph.erase_node(src)
    return True


def _optional_params(module: nn.Module) -> str:
    """Names of ``module.forward``'s parameters that have defaults or are variadic: fx traces
    them as constants (e.g. Hugging Face's ``BertEmbeddings.forward(input_ids=None, ...)``), so a
    rewritten forward would be wrong for other call patterns."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return "signature unavailable"
    odd = [p.name for p in params
           if p.default is not inspect.Parameter.empty
           or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    return ", ".join(odd)


def rewrite_owners(planner) -> None:
    """Residual patterns inside one module's forward: trace the module that owns them, rewrite its
    graph and record the generated forward in ``planner.forwards`` (bound to that instance by
    :func:`tilefuse.patch`). Only for owners that trace to the same graph in train and eval
    mode."""
    owners: Dict[str, List[Tuple[str, str]]] = {}
    for kind, path, *where in planner.candidates:  # (kind, path[, owner path])
        planned = planner.plan.get(path)
        if planned is not None and not (kind == "add_norm" and R.is_tilefuse(planned[0])) \
                and not (kind == "conv_bn_add" and isinstance(planned[0], R.FoldedBatchNorm)):
            continue
        if where and (not where[0] or path.startswith(where[0] + ".")):
            owner = where[0]
            local = path[len(owner) + 1:] if owner else path
        else:
            owner, _, local = path.rpartition(".")
        owners.setdefault(owner, []).append((kind, local))
    for owner_path, items in owners.items():
        items.sort(key=lambda kl: _ORDER[kl[0]])
        owner = planner.model.get_submodule(owner_path) if owner_path else planner.model
        where = f"{_LABEL[items[0][0]]} in {type(owner).__name__}"
        if not owner_path:
            for kind, local in items:
                planner.skip(local, f"{_LABEL[kind]} in {type(owner).__name__}: the owner is "
                                    f"the root module; its forward is not rewritten")
            continue
        optional = _optional_params(owner)
        if optional:
            planner.skip(owner_path, f"{where}: forward has optional arguments ({optional}); a "
                                     f"traced forward would freeze their defaults")
            continue
        try:
            mode = owner.training
            graph = R.Tracer().trace(owner)
            owner.train(not mode)
            other = R.Tracer().trace(owner)
            owner.train(mode)
        except Exception:  # noqa: BLE001
            planner.skip(owner_path, f"{where}: owner not fx-traceable on its own")
            continue
        if graph.python_code("self").src != other.python_code("self").src:
            planner.skip(owner_path, f"{where}: forward depends on train/eval mode")
            continue
        mods = {n.target: owner.get_submodule(n.target) for n in graph.nodes
                if n.op == "call_module"}
        calls: Dict[str, int] = {}
        for n in graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        changed = False
        for kind, local in items:
            nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == local]
            if len(nodes) > 1:
                planner.skip(_path(owner_path, local), f"{_LABEL[kind]}: not fused, the module is "
                                                       f"called at {len(nodes)} places")
            if len(nodes) != 1:
                continue
            changed |= globals()["rw_" + kind](planner, graph, nodes[0], owner_path, mods, calls)
        if changed:
            graph.lint()
            gm = fx.GraphModule(owner, graph)
            planner.forwards[owner_path] = type(gm).forward


def declared_residuals(planner) -> None:
    """Modules that declare ``tilefuse_residual = (("bn2", "relu_out"), ...)`` compute
    ``act(bn(x) + residual)`` and call ``bn(x, residual)`` once ``act`` is ``nn.Identity``
    (tilefuse.models' ResNet blocks). The pattern is invisible to module replacement
    otherwise: ``bn -> add -> act`` needs the residual passed into the fused BN."""
    if "bn_act" not in planner.ops:
        return
    cls = R.fused_class("BatchNormAct2d")
    for path, m in planner.model.named_modules():
        for bn_name, act_name in getattr(type(m), "tilefuse_residual", ()):
            bn_path, act_path = _path(path, bn_name), _path(path, act_name)
            bn, act = getattr(m, bn_name, None), getattr(m, act_name, None)
            if bn_path in planner.plan or type(bn) is not nn.BatchNorm2d or act is None:
                continue
            if cls is None:
                planner.skip(bn_path, "BatchNorm2d -> add -> act: tilefuse.nn.BatchNormAct2d "
                                      "not available")
                continue
            try:
                name, param = R.activation_from_module(act)
            except ValueError:
                planner.skip(bn_path, f"declared BatchNorm2d -> add -> {type(act).__name__}: no "
                                      f"fused kernel for {type(act).__name__}")
                continue
            planner.replace(bn_path, R.convert(cls, bn, R.act_spec(name, param)), True,
                            f"BatchNorm2d -> add(residual) -> {name}: BatchNormAct2d(residual)")
            planner.replace(act_path, nn.Identity(), False, "absorbed into BatchNormAct2d")

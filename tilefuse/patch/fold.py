"""Conv2d -> BatchNorm2d folding for :func:`tilefuse.patch` (eval mode).

:func:`fold` plans one fold (the BN's path gets a :class:`~tilefuse.patch.rules.FoldedBatchNorm`,
the conv's path the folded conv, a depthwise conv becomes ``DepthwiseConv2d`` with the activation
absorbed when it can be). It serves two rules:

* the fx rule (:mod:`tilefuse.patch`): ``conv -> bn`` found in a traced graph;
* the structural rule (:func:`structural_folds`): a module fx cannot trace (Hugging Face's
  ``MobileNetV2ConvLayer`` computes TF "SAME" padding with ``int()`` on the input size) whose
  children are exactly ``Conv2d, BatchNorm2d(, activation)``. The pattern is only taken when a
  probe call of that module on a random input shows the forward calls the conv, then the BN on
  the conv's output (then the activation on the BN's output), each once, and the module's output
  with the folded conv in place matches the original within floating-point error.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from tilefuse.patch import rules as R
from tilefuse.patch.trace import untraced_reason


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fused_target(planner, conv: nn.Conv2d):
    """``(class, name, None)`` of the fused conv a folded ``conv`` becomes, or ``(None, None,
    why)`` when it stays a torch conv."""
    if R.is_depthwise(conv):
        cls, name, rule = R.fused_class("DepthwiseConv2d"), "DepthwiseConv2d", "depthwise"
    else:
        cls, name, rule = R.fused_class("Conv2d"), "Conv2d", "conv"
    if cls is None:
        return None, None, f"tilefuse.nn.{name} not available"
    if rule not in planner.ops:
        return None, None, f"the {rule} rule is not selected"
    why = R.conv_blocker(conv)
    return (None, None, why) if why else (cls, name, None)


def fold(planner, cpath: str, conv: nn.Conv2d, path: str, bn: nn.BatchNorm2d,
         act_path: Optional[str], act: Optional[Tuple[str, float, bool]], how: str = "") -> None:
    """Plan ``bn`` (at ``path``) folded into ``conv`` (at ``cpath``). ``act`` is ``(name, param,
    removable)`` of the activation applied to the BN output, if any, and ``act_path`` the path
    of its module (``None``: a functional call). ``how`` is appended to the report line.

    The folded conv becomes ``tilefuse.nn.Conv2d`` (dense/grouped, ``conv`` rule) or
    ``DepthwiseConv2d`` (``depthwise`` rule) with the activation absorbed: a removable activation
    module becomes ``nn.Identity``; a shared or functional one stays in place when it is
    idempotent (ReLU/ReLU6), else it is not absorbed (reported)."""
    folded = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    descr = f"Conv2d -> BatchNorm2d folded (eval{how})"
    cls, name, why = _fused_target(planner, conv)
    spec = None
    if cls is not None:
        if act is not None and act[2] and act_path is not None:
            spec = R.act_spec(act[0], act[1])
            planner.replace(act_path, nn.Identity(), False, f"absorbed into {name}")
        elif act is not None and act[0] in R.IDEMPOTENT:
            spec = R.act_spec(act[0], act[1])  # kept in place too: act(act(x)) == act(x)
        elif act is not None:
            where = "shared by several call sites" if act_path else "functional"
            planner.skip(cpath, f"folded {name} -> {act[0]}: activation is {where} and not "
                                f"idempotent, not absorbed (runs as a torch op)")
        folded = R.convert(cls, folded, spec)
        shown = spec[0] if isinstance(spec, tuple) else spec
        descr += f" into {name}(activation={shown!r})"
    elif act is not None:
        planner.skip(cpath, f"folded Conv2d -> {act[0]}: activation not absorbed ({why}; runs "
                            f"as a torch op)")
    planner.replace(cpath, folded, False, descr)
    parent, _, name = cpath.rpartition(".")
    slot = (planner.model.get_submodule(parent) if parent else planner.model, name)
    # an activation kept in place (idempotent) is not re-applied by the unfolded BN
    kept = spec if act is not None and act[2] and act_path is not None else None
    planner.replace(path, R.FoldedBatchNorm(path, cpath, slot, conv, bn, folded, kept,
                                            planner.fold_group),
                    False, "folded into the preceding conv")


def _probe_input(conv: nn.Conv2d) -> torch.Tensor:
    size = [max(8, 2 * ((k - 1) * d + 1) + s)
            for k, d, s in zip(conv.kernel_size, conv.dilation, conv.stride)]
    return torch.randn(2, conv.in_channels, *size, device=conv.weight.device,
                       dtype=conv.weight.dtype)


def _probe(owner: nn.Module, names: List[str], conv, bn):
    """Check that ``owner``'s forward is ``conv -> bn (-> act)`` and that folding is exact on a
    probe input. Returns whether the third child is applied to the BN output, or a reason string
    when the structure is not the pattern."""
    calls = []
    children = [owner._modules[n] for n in names]
    hooks = [c.register_forward_hook(lambda mod, inp, out, n=n: calls.append((n, inp, out)))
             for n, c in zip(names, children)]
    x = _probe_input(conv)
    try:
        with torch.no_grad():
            ref = owner(x)
    except Exception as e:  # noqa: BLE001 - not the pattern we can prove
        return f"calling it on a {tuple(x.shape)} probe input raised {type(e).__name__}"
    finally:
        for h in hooks:
            h.remove()
    order = [n for n, _, _ in calls]
    if order not in (names[:2], names):
        return f"its forward calls {order}, not {' -> '.join(names)} once each"
    if len(calls[1][1]) != 1 or calls[1][1][0] is not calls[0][2]:
        return f"{names[1]} is not applied to the output of {names[0]}"
    act_follows = len(calls) == 3 and len(calls[2][1]) == 1 and calls[2][1][0] is calls[1][2]
    if not isinstance(ref, torch.Tensor):
        return "its output is not a tensor"
    folded = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    owner._modules[names[0]], owner._modules[names[1]] = folded, nn.Identity()
    try:
        with torch.no_grad():
            got = owner(x)
    finally:
        owner._modules[names[0]], owner._modules[names[1]] = conv, bn
    tol = max(1e-4, 8 * torch.finfo(ref.dtype).eps) * ref.abs().max().item()
    err = (got - ref).abs().max().item() if got.shape == ref.shape else float("inf")
    if not err <= tol + torch.finfo(ref.dtype).tiny:
        return f"the probe output with the folded conv differs by {err:.3g} (tolerance {tol:.3g})"
    return act_follows


def _uses(model: nn.Module, module: nn.Module) -> int:
    return sum(m is module for _, m in model.named_modules(remove_duplicate=False))


def structural_folds(planner, untraced) -> None:
    """Report the modules fx cannot trace; fold ``Conv2d -> BatchNorm2d (-> act)`` inside those
    whose children are exactly that (eval, ``conv_bn_act`` selected), after a probe proves it."""
    folding = not planner.model.training and "conv_bn_act" in planner.ops
    for path, owner, why in untraced:
        line = untraced_reason(owner, why)
        names = list(owner._modules)
        kids = [owner._modules[n] for n in names]
        shape = (folding and len(kids) in (2, 3) and type(kids[0]) is nn.Conv2d
                 and type(kids[1]) is nn.BatchNorm2d)
        if not shape:
            planner.skip(path, line)
            continue
        conv, bn = kids[0], kids[1]
        cpath, bpath = _join(path, names[0]), _join(path, names[1])
        if cpath in planner.plan or bpath in planner.plan:
            planner.skip(path, line)
            continue
        if not (bn.track_running_stats and bn.running_mean is not None) \
                or bn.num_features != conv.out_channels or conv.training or bn.training:
            why_not = "the BatchNorm2d has no running statistics or is in train mode"
            result = why_not if bn.num_features == conv.out_channels else "channel counts differ"
        else:
            result = _probe(owner, names, conv, bn)
        if isinstance(result, str):
            planner.skip(path, f"{line}; Conv2d -> BatchNorm2d inside it not folded by module "
                               f"structure: {result}")
            continue
        act, act_path = None, None
        if result:  # the third child runs on the BN output
            act_path = _join(path, names[2])
            try:
                name, param = R.activation_from_module(kids[2])
            except ValueError:
                name = "none"
            if name != "none":
                act = (name, param, _uses(planner.model, kids[2]) == 1)
        how = f"; {type(owner).__name__} not fx-traceable: matched by module structure"
        fold(planner, cpath, conv, bpath, bn, act_path, act, how)

"""Tracing for :func:`tilefuse.patch`: find the largest fx-traceable pieces of a model and say, in
plain words, why a module is not traceable.

A module whose forward torch.fx cannot follow (Python ``int()`` on a tensor size, a branch on a
tensor value, ``*args``/``**kwargs``...) no longer blocks its parent: the failing sub-module is
found from the traceback (the innermost ``forward`` that was running) and the parent is traced
again with that sub-module as one opaque call. The opaque module is then searched on its own
(child by child when its own forward does not trace either) and listed in ``untraced``, where the
structural Conv->BN rule (:mod:`tilefuse.patch.fold`) looks at it.
"""
from __future__ import annotations

from typing import List, Tuple

import torch.nn as nn

from tilefuse.patch import rules as R

MAX_OPAQUE = 256  # sub-modules made opaque while tracing one module (each costs one re-trace)

# (substring of the fx / Python error, what the forward does in plain words, what would trace)
_CAUSES = (
    ("co_varnames is too small",
     "its forward takes *args/**kwargs (or is wrapped by a decorator that does), which torch.fx "
     "cannot trace", "explicit forward arguments"),
    ("does not support item assignment",
     "its forward (or a decorator around it) assigns into a traced value (x[key] = value)",
     "torch ops or a new container instead of item assignment"),
    ("argument must be a string, a bytes-like object or a real number",
     "its forward turns a tensor size or value into a Python number with int()/float() (e.g. to "
     "compute padding)", "that computation moved into a function wrapped with torch.fx.wrap"),
    ("__index__", "its forward uses a tensor size or value as a Python integer",
     "that computation moved into a function wrapped with torch.fx.wrap"),
    ("cannot be used as inputs to control flow",
     "its forward branches on a tensor value or size (if/while/assert on data)",
     "the branch moved into a function wrapped with torch.fx.wrap"),
    ("cannot be iterated",
     "its forward loops over or unpacks a tensor (for x in t, *t)",
     "explicit indexing or torch.unbind instead"),
    ("len() is not supported", "its forward calls len() on a tensor", "x.shape[0] instead"),
)
_GENERIC_FIX = "code that torch.fx can trace symbolically (see the torch.fx documentation)"


def _first_sentence(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    sentence = line.split(". ")[0].rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def explain(error: BaseException) -> Tuple[str, str]:
    """``(why tracing failed, what would trace)`` in plain words (the raw error's first sentence
    when the cause is not one of the known ones)."""
    msg = str(error)
    for key, plain, fix in _CAUSES:
        if key in msg:
            return plain, fix
    first = _first_sentence(msg)
    return f"tracing raised {type(error).__name__}" + (f" ({first})" if first else ""), _GENERIC_FIX


def culprit(error: BaseException, module: nn.Module) -> nn.Module:
    """The sub-module of ``module`` whose code was running when tracing raised ``error``: the
    innermost traceback frame whose ``self`` is a module of ``module``'s tree (``module`` itself
    when none is, e.g. a signature fx rejects before running anything)."""
    tree = {id(m) for m in module.modules()}
    found, tb = module, error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in tree:
            found = owner
        tb = tb.tb_next
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_container(module: nn.Module) -> bool:
    """``nn.ModuleList``/``ModuleDict`` and friends: no ``forward`` of their own, nothing to
    trace, and nothing lost by looking at the children directly."""
    return getattr(type(module).forward, "__name__", "") == "_forward_unimplemented"


def graphs(module: nn.Module, prefix: str, untraced: List[Tuple[str, nn.Module, str]]):
    """Yield ``(prefix, graph)`` for the largest traceable pieces of ``module``; append
    ``(path, module, explain(error))`` to ``untraced`` for every module whose own forward does not
    trace (their children are searched one by one)."""
    if _is_container(module):
        for name, child in module.named_children():
            yield from graphs(child, _join(prefix, name), untraced)
        return
    opaque: dict = {}  # id -> sub-module traced as one call
    error = None
    while len(opaque) <= MAX_OPAQUE:
        try:
            graph = R.Tracer(opaque=opaque).trace(module)
        except Exception as e:  # noqa: BLE001 - any tracing failure: find who, go around it
            error, bad = e, culprit(e, module)
            if bad is module or id(bad) in opaque:
                break
            opaque[id(bad)] = bad
            continue
        yield prefix, graph
        paths = {id(m): p for p, m in module.named_modules()}
        for key, sub in opaque.items():
            yield from graphs(sub, _join(prefix, paths[key]), untraced)
        return
    if len(module._modules) == 0:
        return
    untraced.append((prefix, module, explain(error)))
    for name, child in module.named_children():
        yield from graphs(child, _join(prefix, name), untraced)


def untraced_reason(module: nn.Module, why: Tuple[str, str]) -> str:
    """The report line for a module whose forward does not trace (``why`` from :func:`explain`)."""
    return (f"{type(module).__name__} is not fx-traceable: {why[0]}. Its sub-modules are searched "
            f"one by one, so patterns that span them (Linear -> act, Conv2d -> BatchNorm2d, "
            f"residual adds) are not fused here; they would be with {why[1]}")

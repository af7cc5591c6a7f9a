"""``tilefuse.export_onnx(model, example, path)``: ONNX export of (patched) models as standard ops.

Fused modules have no ONNX symbolic (their forward is a ``tilefuse::`` custom op), so export works
on a *deep copy* converted back to torch: a patched model is first unpatched (its original torch
modules come back, sharing the trained tensors), then every remaining tilefuse module (used
directly in the model's code) becomes its torch base class
(``tilefuse.nn.Linear`` -> ``nn.Linear``, ``BatchNormAct2d`` -> ``nn.BatchNorm2d``...), sharing
the same tensors, followed by the torch module of its fused activation. (The exporter's constant
folding folds eval-mode BN into the convs itself.) The copy is exported in eval mode with torch's
TorchScript-based exporter (``dynamo=False``: the dynamo exporter needs ``onnxscript``, which is
not a dependency) and checked with ``onnx.checker``.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn

from tilefuse.activations import NAMES, activation_module, parse_activation


def _torch_base(cls):
    for base in cls.__mro__:
        if base.__module__.startswith("torch.nn"):
            return base
    return None


def _activation_of(m: nn.Module) -> Optional[nn.Module]:
    act = getattr(m, "activation", None)
    if act is None:
        return None
    if isinstance(act, nn.Module):
        return act
    if isinstance(act, int):
        name, param = NAMES[act], float(getattr(m, "act_param", 0.0))
    else:
        name, param = parse_activation(act)
        if isinstance(act, str):
            param = float(getattr(m, "act_param", param))
    return None if name == "none" else activation_module(name, param)


def to_torch(model: nn.Module) -> nn.Module:
    """Replace (in place) every tilefuse module under ``model`` by torch modules computing the
    same function; returns ``model`` (or the replacement when ``model`` itself is fused)."""
    def convert(m):
        base = _torch_base(type(m))
        if base is None or base is nn.Module:
            raise TypeError(f"{type(m).__name__} has no torch equivalent for export")
        new = base.__new__(base)
        new.__dict__ = dict(m.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            new.__dict__[key] = dict(m.__dict__[key])
        act = _activation_of(m)
        new.__dict__.pop("activation", None)
        return nn.Sequential(new, act) if act is not None else new

    if type(model).__module__.startswith("tilefuse.nn"):
        if hasattr(model, "to_torch"):
            return model.to_torch()
        if _torch_base(type(model)) in (None, nn.Module):
            raise TypeError(f"{type(model).__name__} has no standard-op form for ONNX export; "
                            f"build the model from torch modules and tilefuse.patch it instead")
        return convert(model)
    for name, child in list(model.named_children()):
        setattr(model, name, to_torch(child))
    return model


def export_onnx(model: nn.Module, example, path: str | os.PathLike, *, opset: int = 17,
                input_names: Optional[Sequence[str]] = None,
                output_names: Sequence[str] = ("output",), dynamic_batch: bool = True,
                check: bool = True) -> str:
    """Export ``model`` (patched or not) to ONNX with standard ops only; returns ``path``.

    Args:
        example: an input tensor or a tuple of inputs.
        opset: ONNX opset (>= 14 for ``scaled_dot_product_attention``).
        dynamic_batch: mark dim 0 of every input/output dynamic.
        check: run ``onnx.checker.check_model`` on the file.

    >>> import torch, tilefuse, tempfile, os
    >>> m = tilefuse.patch(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> p = tilefuse.export_onnx(m, torch.randn(2, 4), os.path.join(tempfile.mkdtemp(), "m.onnx"))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = example if isinstance(example, tuple) else (example,)
    if not args or not all(torch.is_tensor(a) for a in args):
        raise TypeError("example must be a tensor or a non-empty tuple of tensors")
    path = os.fspath(path)
    from tilefuse.patch import unpatch

    clone = to_torch(unpatch(copy.deepcopy(model))).eval()
    names = list(input_names) if input_names else [f"input{i}" if len(args) > 1 else "input"
                                                   for i in range(len(args))]
    axes = {n: {0: "batch"} for n in list(names) + list(output_names)} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(clone, args, path, dynamo=False, opset_version=opset,
                          input_names=names, output_names=list(output_names),
                          dynamic_axes=axes, do_constant_folding=True)
    if check:
        import onnx

        onnx.checker.check_model(path)
    return path


def run_onnx(path: str | os.PathLike, example):
    """Run the ONNX file with onnxruntime (CPU) on ``example``; returns the first output (numpy)."""
    import onnxruntime as ort

    args = example if isinstance(example, tuple) else (example,)
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess.run(None, feeds)[0]

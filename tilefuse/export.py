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

import contextlib
import copy
import inspect
import os
import sys
import tempfile
import warnings
from typing import Mapping, Optional, Sequence

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


class ExportError(RuntimeError):
    """``torch.onnx.export`` failed; the message is one line (model class + torch's first line),
    torch's exception is chained as ``__cause__`` and anything torch's exporter printed meanwhile
    (its IR graph dump) is kept in ``torch_log``."""

    def __init__(self, message: str, torch_log: str = "") -> None:
        super().__init__(message)
        self.torch_log = torch_log


def _first_line(e: BaseException) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


@contextlib.contextmanager
def _captured_stdout_fd():
    """Capture file descriptor 1 (torch's exporter writes its whole TorchScript IR to the C++
    stdout when a symbolic fails); yields a list that receives the captured text."""
    out = []
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no usable fd 1: nothing to capture
        yield out
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield out
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _example_inputs(model: nn.Module, example, kwargs):
    """``(args, kwargs)`` validated against ``model.forward``; kwargs ordered as in the signature
    (the TorchScript exporter passes them positionally, in that order)."""
    args = example if isinstance(example, tuple) else (example,)
    if not all(torch.is_tensor(a) for a in args) or not (args or kwargs):
        raise TypeError("example must be a tensor or a tuple of tensors (empty only with kwargs), "
                        f"got {type(example).__name__}")
    if kwargs is None:
        return args, {}
    if not isinstance(kwargs, Mapping) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in kwargs.items()):
        raise TypeError(f"kwargs must map forward's parameter names to tensors, got {kwargs!r}")
    sig = inspect.signature(model.forward)
    where = f"{type(model).__name__}.forward{sig}"
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"example and kwargs do not fit {where}: {e}") from None
    params = list(sig.parameters.values())[len(args):]
    named = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    for k in kwargs:
        if k not in named:
            raise TypeError(f"kwargs key {k!r} must name a positional-or-keyword parameter of "
                            f"{where} after the positional inputs (the exporter passes keyword "
                            f"inputs by position)")
    return args, {k: kwargs[k] for k in named if k in kwargs}


def export_onnx(model: nn.Module, example, path: str | os.PathLike, *,
                kwargs: Optional[Mapping[str, torch.Tensor]] = None, opset: int = 17,
                input_names: Optional[Sequence[str]] = None,
                output_names: Sequence[str] = ("output",), dynamic_batch: bool = True,
                check: bool = True) -> str:
    """Export ``model`` (patched or not) to ONNX with standard ops only; returns ``path``.

    Args:
        example: an input tensor or a tuple of positional inputs (``()`` with only ``kwargs``).
        kwargs: keyword inputs of ``model.forward`` (``{"attention_mask": mask}``). ONNX inputs
            are the positional ones (named ``input`` / ``input0``, ``input1``...) then these, in
            ``forward``'s parameter order, named after their keys.
        opset: ONNX opset (>= 14 for ``scaled_dot_product_attention``).
        input_names: one name per ONNX input, replacing the default names.
        dynamic_batch: mark dim 0 of every input/output dynamic.
        check: run ``onnx.checker.check_model`` on the file.

    Raises :class:`ExportError` (one line: model class and torch's first error line; torch's
    exception chained) when ``torch.onnx.export`` fails.

    >>> import torch, tilefuse, tempfile, os
    >>> m = tilefuse.patch(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> p = tilefuse.export_onnx(m, torch.randn(2, 4), os.path.join(tempfile.mkdtemp(), "m.onnx"))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kw = _example_inputs(model, example, kwargs)
    path = os.fspath(path)
    from tilefuse.patch import unpatch

    clone = to_torch(unpatch(copy.deepcopy(model))).eval()
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))] + list(kw)
    if input_names is not None:
        if isinstance(input_names, str) or len(input_names) != len(names):
            raise ValueError(f"input_names must give one name per ONNX input ({len(names)}: "
                             f"{names}), got {input_names!r}")
        names = list(input_names)
    if len(set(names) | set(output_names)) != len(names) + len(output_names):
        raise ValueError(f"input and output names must be distinct, got {names} and "
                         f"{list(output_names)}")
    axes = {n: {0: "batch"} for n in names + list(output_names)} if dynamic_batch else None
    with warnings.catch_warnings(), _captured_stdout_fd() as log:
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(clone, args, path, kwargs=kw or None, dynamo=False,
                              opset_version=opset, input_names=names,
                              output_names=list(output_names), dynamic_axes=axes,
                              do_constant_folding=True)
            failed = None
        except Exception as e:  # noqa: BLE001 (re-raised below as one line, chained)
            failed = e
    torch_log = "".join(log)
    if failed is not None:
        hint = ("; a tilefuse op called directly in forward has no ONNX form: use tilefuse.nn "
                "modules or tilefuse.patch" if "tilefuse::" in str(failed) else "")
        raise ExportError(f"ONNX export of {type(model).__name__} failed in torch.onnx.export: "
                          f"{_first_line(failed)}{hint}", torch_log) from failed
    if torch_log:
        sys.stdout.write(torch_log)  # a successful export's own output is passed through
    if check:
        import onnx

        onnx.checker.check_model(path)
    return path


def run_onnx(path: str | os.PathLike, example, kwargs: Optional[Mapping] = None):
    """Run the ONNX file with onnxruntime (CPU); returns the first output (numpy). ``example``
    fills the graph's inputs in order, ``kwargs`` by name (as :func:`export_onnx` named them)."""
    import onnxruntime as ort

    args = example if isinstance(example, tuple) else (example,)
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    graph_inputs = [i.name for i in sess.get_inputs()]
    if len(args) > len(graph_inputs):
        raise ValueError(f"{len(args)} positional inputs for a graph with inputs {graph_inputs}")
    feeds = dict(zip(graph_inputs, args))
    for k, v in (kwargs or {}).items():
        if k not in graph_inputs or k in feeds:
            raise ValueError(f"kwargs key {k!r} is not a free input of the graph; its inputs are "
                             f"{graph_inputs}")
        feeds[k] = v
    return sess.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})[0]

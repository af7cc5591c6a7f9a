"""``tilefuse.quantize``: whole-model post-training quantization with a size/accuracy report.

Modes: ``'w8a8'`` (dynamic per-row int8 activations x per-channel int8 weights), ``'weight_only'``
(int8 weights, float activations), ``'fp8'`` (every Linear / HF ``Conv1D`` becomes an
:class:`~tilefuse.nn.Fp8Linear`: e4m3 weights per output channel, dynamic per-row e4m3
activations; every ``nn.Embedding`` an int8 per-row :class:`~tilefuse.nn.QuantizedEmbedding`,
and a projection tied to it reads the same 8-bit table (:mod:`tilefuse.quantize_fp8`);
convolutions stay in float and are listed in ``report.skipped``), and the float
steps of the deployment pipeline ``'fp16'`` / ``'bf16'`` (a cast of every floating parameter and
buffer). In the int8 modes every
:class:`torch.nn.Linear` (including :class:`tilefuse.nn.Linear`) and Hugging Face ``Conv1D``
(GPT-2's transposed Linear, recognised by duck typing) becomes an :class:`~tilefuse.nn.Int8Linear`,
every ungrouped Conv2d (any kernel size, stride, padding, dilation, padding mode; a
``tilefuse.nn.Conv2d`` keeps its fused activations and residual input) an
:class:`~tilefuse.nn.Int8Conv2d`, and every 1x1/stride-1/unpadded/ungrouped Conv1d an
:class:`~tilefuse.nn.Int8Conv1x1` (all keeping the replaced module's attributes: ``stride``,
``nf``...). Grouped and depthwise convs stay in float (no int8 grouped kernel) and are listed in
``report.skipped``. In the int8 modes a layer whose weight is tied
to another module's (GPT-2's ``lm_head`` and token embedding) stays in float and is listed in
``report.skipped``: an int8 copy next to the shared float tensor would make the model larger. With
``min_agreement`` and a calibration batch, the layers that cost the most accuracy are put back to
float (:mod:`tilefuse.quantize_sensitivity`). The result is for inference.

Sizes are real serialized sizes: ``torch.save(model.state_dict())`` into a ``BytesIO`` (the state
dict rather than the pickled module, so models defined in a script or a test serialize too).
"""
from __future__ import annotations

import copy
import fnmatch
import io
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import torch

MODES = ("w8a8", "weight_only", "fp8", "fp16", "bf16")
_SHOWN = 10  # skipped modules listed by str(report)


def serialized_size(model: torch.nn.Module) -> int:
    """Bytes written by ``torch.save(model.state_dict(), buffer)``."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@dataclass
class QuantizationReport:
    mode: str
    size_before: int                      # bytes, torch.save of the state_dict
    size_after: int
    replaced: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)     # "name (reason)"
    max_abs_dev: Optional[float] = None   # on the calibration batch, vs the original model
    mean_abs_dev: Optional[float] = None
    max_rel_dev: Optional[float] = None   # max_abs_dev / max |original output|
    argmax_agreement: Optional[float] = None  # fraction of rows whose last-dim argmax is kept

    @property
    def compression(self) -> float:
        return self.size_before / max(1, self.size_after)

    def __str__(self) -> str:
        mb = 1024 * 1024
        if self.size_after > self.size_before:
            change = f"{self.size_after / max(1, self.size_before):.2f}x larger"
        else:
            change = f"{self.compression:.2f}x smaller"
        lines = [f"quantize(mode={self.mode!r}): {len(self.replaced)} module(s) replaced, "
                 f"{len(self.skipped)} skipped",
                 f"  size: {self.size_before / mb:.3f} MiB -> {self.size_after / mb:.3f} MiB "
                 f"({change})"]
        lines += [f"  skipped {s}" for s in self.skipped[:_SHOWN]]
        if len(self.skipped) > _SHOWN:
            lines.append(f"  ... and {len(self.skipped) - _SHOWN} more in report.skipped")
        if self.max_abs_dev is not None:
            lines.append(f"  output deviation: max {self.max_abs_dev:.4g} (relative "
                         f"{self.max_rel_dev:.3g}), mean {self.mean_abs_dev:.4g}")
        if self.argmax_agreement is not None:
            lines.append(f"  argmax agreement: {100 * self.argmax_agreement:.2f}%")
        return "\n".join(lines)


def _skipped(name: str, module: torch.nn.Module, skip: tuple) -> bool:
    for rule in skip:
        if isinstance(rule, type):
            if isinstance(module, rule):
                return True
        elif name == rule or name.startswith(rule + ".") or fnmatch.fnmatchcase(name, rule):
            return True
    return False


def _tied(model: torch.nn.Module) -> Dict[int, List[tuple]]:
    """``id(parameter) -> [(path, module), ...]`` of the modules that hold it (tied weights:
    several modules; one module registered at several paths is not a tie)."""
    owners: Dict[int, List[tuple]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append((path, m))
    return owners


def _replace_modules(model: torch.nn.Module, mode: str, skip: tuple, report: QuantizationReport,
                     prefix: str | None = "", owners: Optional[Dict[int, List[tuple]]] = None,
                     memo: Optional[dict] = None, swaps: Optional[list] = None) -> None:
    """Replace Linear/HF-Conv1D/conv children of ``model`` (and embeddings in fp8 mode);
    ``prefix=None`` marks the holder of the root (its one child is named "" in the report).
    ``owners``: :func:`_tied` of the root; ``memo``: a module object registered at several paths
    gets one replacement; ``swaps``: ``(parent, attribute, float module, new module, path)`` of
    every replacement made is appended there."""
    from tilefuse.nn.hf_conv1d import is_hf_conv1d
    from tilefuse.nn.int8 import Int8Conv1x1, Int8Linear
    from tilefuse.nn.int8_conv import Int8Conv2d

    owners = {} if owners is None else owners
    memo = {} if memo is None else memo
    swaps = [] if swaps is None else swaps
    for child_name, child in list(model._modules.items()):  # duplicates too
        if child is None:
            continue
        name = "" if prefix is None else f"{prefix}{child_name}"
        if id(child) in memo:
            if memo[id(child)] is not None:
                setattr(model, child_name, memo[id(child)])
                swaps.append((model, child_name, child, memo[id(child)], name))
            continue
        is_linear = isinstance(child, torch.nn.Linear) or is_hf_conv1d(child)
        is_conv = isinstance(child, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
        is_linear = is_linear or (mode == "fp8" and isinstance(child, torch.nn.Embedding))
        new, why = None, None
        if (is_linear or is_conv) and _skipped(name, child, skip):
            why = "skip"
        elif is_linear or is_conv:
            tied = [p for p, m in owners.get(id(child.weight), []) if m is not child]
            if mode == "fp8":  # Linear / HF Conv1D / Embedding -> fp8; convs stay float
                from tilefuse.quantize_fp8 import fp8_replacement

                new, why = fp8_replacement(child, owners.get(id(child.weight), []),
                                           lambda p, m: _skipped(p, m, skip), memo)
            elif tied:
                why = (f"weight tied to {tied[0]}: a quantized copy would be stored next to the "
                       f"float tensor, so the model would grow")
            elif is_linear:
                new = Int8Linear.from_float(child, mode=mode)
            elif Int8Conv2d.supports(child):
                new = Int8Conv2d.from_float(child, mode=mode)
            elif isinstance(child, torch.nn.Conv2d):
                why = (f"grouped/depthwise conv (groups={child.groups}): no int8 grouped "
                       f"kernel, kept in float")
            elif Int8Conv1x1.supports(child):
                new = Int8Conv1x1.from_float(child, mode=mode)
            else:
                why = "conv is not a Conv2d or a 1x1/stride 1/unpadded/ungrouped Conv1d"
        elif not _skipped(name, child, skip):
            _replace_modules(child, mode, skip, report, name + "." if name else "", owners, memo,
                             swaps)
            continue
        else:
            continue
        memo[id(child)] = new
        if new is not None:
            setattr(model, child_name, new)
            swaps.append((model, child_name, child, new, name))
            report.replaced.append(name)
        else:
            report.skipped.append(f"{name} ({why})")


def _call(model: torch.nn.Module, calibration: Any, dtype: Optional[torch.dtype] = None):
    def cast(t):
        if dtype is not None and isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.to(dtype)
        return t

    if isinstance(calibration, dict):
        return model(**{k: cast(v) for k, v in calibration.items()})
    if isinstance(calibration, (tuple, list)):
        return model(*[cast(v) for v in calibration])
    return model(cast(calibration))


def _flat_outputs(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_outputs(o)]
    return []


def _deviation(ref, got, report: QuantizationReport) -> None:
    refs = [t for t in _flat_outputs(ref) if t.is_floating_point()]
    gots = [t for t in _flat_outputs(got) if t.is_floating_point()]
    if not refs or len(refs) != len(gots):
        return
    diffs = [(g.double() - r.double()).abs().flatten() for r, g in zip(refs, gots)]
    d = torch.cat(diffs)
    if d.numel() == 0:
        return
    report.max_abs_dev = d.max().item()
    report.mean_abs_dev = d.mean().item()
    scale = max(r.double().abs().max().item() for r in refs if r.numel())
    report.max_rel_dev = report.max_abs_dev / scale if scale > 0 else 0.0
    r0, g0 = refs[0], gots[0]
    if r0.dim() >= 2 and r0.shape[-1] > 1:
        report.argmax_agreement = (r0.argmax(-1) == g0.argmax(-1)).double().mean().item()


def _has_argmax(ref: List[torch.Tensor]) -> bool:
    floats = [t for t in ref if t.is_floating_point()]
    return bool(floats) and floats[0].dim() >= 2 and floats[0].shape[-1] > 1


def _fall_back(holder: torch.nn.Module, swaps: list, calibration: Any, ref: List[torch.Tensor],
               min_agreement: float, report: QuantizationReport) -> None:
    """``min_agreement``: put the most sensitive quantized units back to float."""
    from tilefuse.quantize_sensitivity import keep_sensitive

    def first(out) -> torch.Tensor:
        return [t for t in _flat_outputs(out) if t.is_floating_point()][0]

    kept, lines = keep_sensitive(
        swaps, group=lambda s: id(getattr(s[2], "weight", s[2])),
        run=lambda: first(_call(holder.root, calibration)), ref=first(ref),
        min_agreement=min_agreement)
    report.replaced[:] = [r for r in report.replaced if r not in kept]
    report.skipped += lines


def quantize(model: torch.nn.Module, mode: str = "w8a8", skip: Iterable = (),
             inplace: bool = False, calibration: Any = None,
             min_agreement: Optional[float] = None):
    """Quantize ``model`` for inference; returns ``(quantized_model, QuantizationReport)``.

    Args:
        model: any :class:`torch.nn.Module` (call ``.eval()`` first so dropout does not count as
            quantization error).
        mode: ``'w8a8'``, ``'weight_only'``, ``'fp8'``, ``'fp16'`` or ``'bf16'``.
        skip: module names (exact, a prefix such as ``'head'`` for ``'head.*'``, or an
            ``fnmatch`` pattern such as ``'*.classifier'``) and/or module classes to leave in
            float (int8 and fp8 modes only).
        inplace: modify ``model`` itself instead of a deep copy (a model that *is* a Linear or
            conv is returned as a new module either way).
        calibration: an input batch (a tensor, a tuple of positional args, or a dict of keyword
            args). When given, the report has the max/mean/relative deviation of the outputs and
            the argmax agreement of the first output, measured against the original model.
        min_agreement: with ``calibration`` (int8 and fp8 modes), the argmax agreement to reach:
            when the fully quantized model is below it, the layers whose quantization moves the
            output most are put back to float, one by one, until it is reached; they are listed
            in ``report.skipped`` with their sensitivity and the agreement before and after
            (:mod:`tilefuse.quantize_sensitivity`). The agreement is measured on the
            calibration batch itself: check it on held-out inputs.

    >>> import torch, tilefuse
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    >>> qnet, report = tilefuse.quantize(net.eval(), mode="w8a8", calibration=torch.randn(8, 64))
    >>> report.size_after < report.size_before and report.max_rel_dev < 0.1
    True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(skip, (str, type)):
        skip = (skip,)
    skip = tuple(skip)
    for rule in skip:
        if not isinstance(rule, (str, type)):
            raise TypeError(f"skip entries must be module names or classes, got {rule!r}")
    if skip and mode in ("fp16", "bf16"):
        raise ValueError(f"skip is not supported for mode={mode!r} (the whole model is cast)")
    if min_agreement is not None:
        if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) \
                or not 0 < min_agreement <= 1:
            raise ValueError(f"min_agreement must be a number in (0, 1], got {min_agreement!r}")
        if calibration is None or mode in ("fp16", "bf16"):
            raise ValueError("min_agreement needs a calibration batch and an int8 or fp8 mode")

    report = QuantizationReport(mode=mode, size_before=serialized_size(model), size_after=0)
    ref = None
    if calibration is not None:
        with torch.no_grad():
            ref = _call(model, calibration)
        ref = [t.detach().clone() for t in _flat_outputs(ref)]
        if min_agreement is not None and not _has_argmax(ref):
            raise ValueError("min_agreement: the model's first output has no last dimension "
                             "to take an argmax over")
    target = model if inplace else copy.deepcopy(model)
    if mode in ("fp16", "bf16"):
        dtype = torch.float16 if mode == "fp16" else torch.bfloat16
        target.to(dtype)
        report.replaced.append("(all floating parameters and buffers)")
    else:
        dtype = None
        with torch.no_grad():
            holder = torch.nn.Module()  # so that a bare Linear/Conv model is replaced too
            holder.add_module("root", target)
            swaps: list = []
            _replace_modules(holder, mode, skip, report, prefix=None, owners=_tied(target),
                             swaps=swaps)
            if min_agreement is not None:
                _fall_back(holder, swaps, calibration, ref, min_agreement, report)
            target = holder.root
    report.size_after = serialized_size(target)
    if calibration is not None:
        with torch.no_grad():
            got = _call(target, calibration, dtype)
        _deviation(ref, got, report)
    return target, report

"""``tilefuse.prune``: magnitude pruning on top of :mod:`torch.nn.utils.prune`, with a sparsity
report.

Kinds:

* ``'l1_unstructured'``: each layer loses the ``amount`` fraction of its smallest-|w| weights
  (:func:`torch.nn.utils.prune.l1_unstructured`).
* ``'global_l1_unstructured'``: the smallest ``amount`` fraction across all selected layers
  together (:func:`torch.nn.utils.prune.global_unstructured`).
* ``'2:4'``: in every group of 4 consecutive weights along the input dim, the 2 of largest |w|
  are kept: the semi-structured pattern that :func:`torch.sparse.to_sparse_semi_structured` takes
  on GPUs with sparse tensor cores (which adds its own dtype/shape constraints, see
  docs/quantization.md). Implemented as a :class:`torch.nn.utils.prune.BasePruningMethod`, so
  masks, ``weight_orig`` and ``prune.remove`` behave exactly as torch's own methods.

Linear and Conv1d/2d/3d weights are pruned (2:4: Linear only, ``in_features % 4 == 0``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from torch.nn.utils import prune as torch_prune

KINDS = ("l1_unstructured", "global_l1_unstructured", "2:4")


class SemiStructured24(torch_prune.BasePruningMethod):
    """Keep the 2 largest-magnitude weights of every 4 consecutive ones along the last dim."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] % 4:
            raise ValueError(f"2:4 pruning needs the last dim to be a multiple of 4, got "
                             f"{tuple(t.shape)}")
        groups = (t * default_mask).abs().reshape(-1, 4)
        keep = groups.topk(2, dim=1).indices
        mask = torch.zeros_like(groups).scatter_(1, keep, 1.0).reshape(t.shape)
        return mask * default_mask

    @classmethod
    def apply(cls, module, name, importance_scores=None):
        return super().apply(module, name, importance_scores=importance_scores)


def is_2to4_sparse(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive elements along the last dim has <= 2 non-zeros."""
    if weight.shape[-1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


@dataclass
class PruneReport:
    kind: str
    amount: float
    layer_sparsity: Dict[str, float] = field(default_factory=dict)  # name -> fraction of zeros
    skipped: List[str] = field(default_factory=list)                # "name (reason)"
    sparsity: float = 0.0         # zeros / elements over the pruned weights
    model_sparsity: float = 0.0   # zeros / elements over all floating parameters

    def __str__(self) -> str:
        return (f"prune(kind={self.kind!r}, amount={self.amount}): {len(self.layer_sparsity)} "
                f"layer(s) pruned, {len(self.skipped)} skipped; sparsity "
                f"{100 * self.sparsity:.2f}% of pruned weights, "
                f"{100 * self.model_sparsity:.2f}% of all parameters")


def _targets(model, kind, skip, report):
    from tilefuse.quantize import _skipped

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear,) + convs):
            continue
        if _skipped(name, mod, skip):
            report.skipped.append(f"{name} (skip)")
        elif kind == "2:4" and not isinstance(mod, torch.nn.Linear):
            report.skipped.append(f"{name} (2:4 applies to Linear weights only)")
        elif kind == "2:4" and mod.weight.shape[1] % 4:
            report.skipped.append(f"{name} (in_features {mod.weight.shape[1]} is not a multiple "
                                  f"of 4)")
        else:
            out.append((name, mod))
    return out


def _effective_params(model):
    """Parameters as the forward sees them (the masked ``weight`` instead of ``weight_orig``)."""
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if pname.endswith("_orig") and hasattr(mod, pname[:-5]):
                yield getattr(mod, pname[:-5])
            else:
                yield p


def prune(model: torch.nn.Module, amount: Optional[float] = None, kind: str = "l1_unstructured",
          skip: Iterable = (), inplace: bool = False, permanent: bool = True):
    """Prune ``model``'s Linear/Conv weights; returns ``(pruned_model, PruneReport)``.

    Args:
        amount: fraction in [0, 1] (or an int count per layer for ``'l1_unstructured'``);
            for ``'2:4'`` it is fixed at 0.5 (pass ``None`` or ``0.5``).
        kind: ``'l1_unstructured'``, ``'global_l1_unstructured'`` or ``'2:4'``.
        skip: module names/prefixes/fnmatch patterns or classes to leave dense.
        inplace: prune ``model`` itself instead of a deep copy.
        permanent: apply :func:`torch.nn.utils.prune.remove` so ``weight`` is a plain parameter
            with zeros (no ``weight_orig``/``weight_mask`` in the state dict).

    >>> import torch, tilefuse
    >>> net, rep = tilefuse.prune(torch.nn.Linear(16, 8), kind="2:4")
    >>> rep.sparsity
    0.5
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "2:4":
        if amount not in (None, 0.5):
            raise ValueError(f"amount is fixed at 0.5 for kind='2:4', got {amount!r}")
        amount = 0.5
    else:
        if amount is None:
            raise TypeError(f"amount is required for kind={kind!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise TypeError(f"amount must be a float in [0, 1] or an int, got "
                            f"{type(amount).__name__}")
        if isinstance(amount, float) and not 0.0 <= amount <= 1.0:
            raise ValueError(f"amount must be in [0, 1], got {amount}")
        if isinstance(amount, int) and (amount < 0 or kind == "global_l1_unstructured"
                                        and amount != 0):
            raise ValueError(f"amount must be a fraction in [0, 1] for kind={kind!r}, got "
                             f"{amount}")
    skip = (skip,) if isinstance(skip, (str, type)) else tuple(skip)
    target = model if inplace else copy.deepcopy(model)
    report = PruneReport(kind=kind, amount=float(amount))
    layers = _targets(target, kind, skip, report)
    if kind == "l1_unstructured":
        for _, mod in layers:
            torch_prune.l1_unstructured(mod, "weight", amount=amount)
    elif kind == "global_l1_unstructured" and layers:
        torch_prune.global_unstructured([(m, "weight") for _, m in layers],
                                        pruning_method=torch_prune.L1Unstructured,
                                        amount=float(amount))
    elif kind == "2:4":
        for _, mod in layers:
            SemiStructured24.apply(mod, "weight")
    if permanent:
        for _, mod in layers:
            torch_prune.remove(mod, "weight")
    zeros = total = 0
    for name, mod in layers:
        w = mod.weight.detach()
        z = int((w == 0).sum())
        report.layer_sparsity[name] = z / max(1, w.numel())
        zeros, total = zeros + z, total + w.numel()
    report.sparsity = zeros / total if total else 0.0
    params = [p.detach() for p in _effective_params(target) if p.is_floating_point()]
    all_total = sum(p.numel() for p in params)
    report.model_sparsity = (sum(int((p == 0).sum()) for p in params) / all_total
                             if all_total else 0.0)
    return target, report

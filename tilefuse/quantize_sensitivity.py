"""Sensitivity-driven fallback for ``tilefuse.quantize(..., min_agreement=...)``.

Quantization error is not spread evenly: a layer whose output feeds a residual stream is diluted
by it, while the layers outside the residual path (a classifier head, a pooler, an MLM head's
transform, the logits projection) pass their whole rounding error on to the output. When the
quantized model's argmax agreement on the calibration batch is below ``min_agreement``:

1. each quantized unit (one module, or every owner of a tied weight together) is scored alone:
   only it is quantized, the rest of the model is float, and the score is the mean absolute
   output deviation on the calibration batch (a continuous figure: a single layer rarely flips
   an argmax of the batch by itself);
2. units are put back to float from the highest score down, re-measuring the agreement after
   each, until it reaches ``min_agreement`` (or every unit is float).

Cost: one forward of the calibration batch per unit and per unit put back. The kept units are
reported in ``report.skipped`` with their score and the agreement before and after.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

Swap = Tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module, str]
# (parent, attribute, float module, quantized module, path)


def _set(units: List[List[Swap]], quantized: bool) -> None:
    for unit in units:
        for parent, attr, flt, q, _ in unit:
            setattr(parent, attr, q if quantized else flt)


def _agreement(ref: torch.Tensor, got: torch.Tensor) -> float:
    return (ref.argmax(-1) == got.argmax(-1)).double().mean().item()


def keep_sensitive(swaps: List[Swap], group: Callable[[Swap], object],
                   run: Callable[[], torch.Tensor], ref: torch.Tensor,
                   min_agreement: float) -> Tuple[List[str], List[str]]:
    """Put the most sensitive units back to float until ``run()``'s argmax agreement with
    ``ref`` reaches ``min_agreement``. ``swaps``: every replacement made (the model currently
    holds the quantized modules); ``group``: the unit a swap belongs to. Returns ``(kept
    paths, "path (reason)" lines)``; the model is left with the kept units in float."""
    units: Dict[object, List[Swap]] = {}
    for s in swaps:
        units.setdefault(group(s), []).append(s)
    agree = _agreement(ref, run())
    if agree >= min_agreement or not units:
        return [], []
    all_units = list(units.values())
    scale = ref.double().abs().mean().item() or 1.0
    scores = []
    _set(all_units, quantized=False)
    for unit in all_units:
        _set([unit], quantized=True)
        scores.append(((run().double() - ref.double()).abs().mean().item() / scale, unit))
        _set([unit], quantized=False)
    _set(all_units, quantized=True)
    scores.sort(key=lambda t: -t[0])
    kept, lines = [], []
    for rank, (score, unit) in enumerate(scores, 1):
        _set([unit], quantized=False)
        before, agree = agree, _agreement(ref, run())
        paths = list(dict.fromkeys(s[4] for s in unit))
        kept += paths
        lines += [f"{p} (kept in float by min_agreement={min_agreement:g}: sensitivity rank "
                  f"{rank}, relative output deviation {score:.3g} with only it quantized; "
                  f"argmax agreement {100 * before:.2f}% -> {100 * agree:.2f}%)" for p in paths]
        if agree >= min_agreement:
            break
    return kept, lines

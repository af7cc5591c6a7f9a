"""The fp8 side of ``tilefuse.quantize(model, mode="fp8")``: 8-bit embedding tables, tied weights
stored once.

``mode="fp8"`` runs every Linear / Hugging Face ``Conv1D`` as an :class:`~tilefuse.nn.Fp8Linear`
(the FLOPs) and stores every ``nn.Embedding`` as an int8 :class:`~tilefuse.nn.QuantizedEmbedding`
(the bytes: a gather needs no tensor core, and int8 rows are several times more accurate than
e4m3 ones on outlier-free tables; docs/fp8.md has the measurements).

Tied weights: GPT-2's ``lm_head`` is its token embedding ``wte`` (BERT's MLM decoder, RoBERTa's
``lm_head.decoder``, DistilBERT's ``vocab_projector`` likewise). The table is quantized once, per
row (the rows are the projection's output channels), and every module that held the float tensor
reads the same 8-bit ``weight`` / ``weight_scale`` tensors (:func:`~tilefuse.nn.quantized_embedding
.tied_linear`): ``torch.save`` stores them once, as it stored the float tensor once. A tie that
cannot be shared this way (an owner skipped by the caller, a Hugging Face ``Conv1D``, a conv, an
embedding with ``max_norm``) keeps every owner in float, with the reason in the report.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from tilefuse.nn.fp8 import fp8_convert
from tilefuse.nn.hf_conv1d import is_hf_conv1d
from tilefuse.nn.quantized_embedding import QuantizedEmbedding, tied_linear

TABLE_DTYPE = torch.int8


def _convert(module: torch.nn.Module) -> Tuple[Optional[torch.nn.Module], Optional[str]]:
    if isinstance(module, torch.nn.Embedding):
        if module.max_norm is not None:
            return None, "embedding with max_norm (renormalizes its float table in place)"
        return QuantizedEmbedding.from_float(module, dtype=TABLE_DTYPE), None
    return fp8_convert(module)


def _shareable(module: torch.nn.Module) -> bool:
    """An owner of a tied tensor that can read a shared per-row 8-bit table."""
    if isinstance(module, torch.nn.Embedding):
        return module.max_norm is None
    return isinstance(module, torch.nn.Linear) and not is_hf_conv1d(module)


def fp8_replacement(child: torch.nn.Module, owners: List[Tuple[str, torch.nn.Module]],
                    skipped: Callable[[str, torch.nn.Module], bool], memo: dict
                    ) -> Tuple[Optional[torch.nn.Module], Optional[str]]:
    """``(quantized module, None)`` or ``(None, reason)`` for ``child``, a Linear / HF Conv1D /
    Embedding / conv. ``owners``: the ``(path, module)`` pairs holding ``child.weight``
    (``child`` included); ``memo`` maps ``("table", id(weight))`` to the shared table."""
    others = [(p, m) for p, m in owners if m is not child]
    if not others:
        return _convert(child)
    if not _shareable(child) or any(not _shareable(m) or skipped(p, m) for p, m in others):
        return None, (f"weight tied to {others[0][0]}, which stays in float (skipped, or no "
                      f"shared 8-bit form): a quantized copy next to the float tensor would "
                      f"grow the model")
    key = ("table", id(child.weight))
    table = memo.get(key)
    if table is None:  # the first owner reached quantizes the table, in the embedding's layout
        w = child.weight
        table = QuantizedEmbedding.from_float(
            torch.nn.Embedding(w.shape[0], w.shape[1], _weight=w.detach(), _freeze=True),
            dtype=TABLE_DTYPE)
        memo[key] = table
    if isinstance(child, torch.nn.Embedding):
        return QuantizedEmbedding.tied_to(table, padding_idx=child.padding_idx,
                                          out_dtype=table.out_dtype), None
    return tied_linear(table, child), None

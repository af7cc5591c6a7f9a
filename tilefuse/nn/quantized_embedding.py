"""8-bit token / position embeddings, and output projections tied to them.

An embedding table is most of a small language model's bytes (GPT-2 small: 38.6M of 124M
parameters, and its ``lm_head`` is the same tensor), so a quantized model that keeps it in float
is far from half the size of the bf16 model. :class:`QuantizedEmbedding` stores the table in 8
bits with one fp32 scale per row (absmax-based: the per-output-channel scales of a tied output
projection) and dequantizes only the looked-up rows. :func:`tied_linear` builds the projection
that shares the table (stored once). Inference only: tables and scales are buffers.

Formats: ``torch.int8`` (symmetric, [-127, 127]) or ``torch.float8_e4m3fn`` /
``torch.float8_e5m2``. On rows without outliers (embedding tables) int8 is the more accurate:
its step is ``absmax / 127`` everywhere, while e4m3 keeps 3 mantissa bits (relative steps of
1/16 to 1/8), several times the int8 error at the typical |value| ~ absmax / 3 (docs/fp8.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tilefuse.fused.fp8 import FP8_DTYPES, quantize_fp8_per_row
from tilefuse.fused.int8 import quantize_per_row

TABLE_DTYPES = (torch.int8,) + FP8_DTYPES
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _table_dtype(dtype) -> torch.dtype:
    if dtype not in TABLE_DTYPES:
        raise TypeError(f"dtype must be torch.int8, torch.float8_e4m3fn or torch.float8_e5m2, "
                        f"got {dtype!r}")
    return dtype


class QuantizedEmbedding(torch.nn.Module):
    """A quantized :class:`torch.nn.Embedding`: 8-bit rows with per-row fp32 scales, dequantized
    on lookup (``weight[ids] * weight_scale[ids]`` in ``out_dtype``, the replaced table's dtype).

    ``state_dict`` holds ``weight`` (``dtype``, ``(num_embeddings, embedding_dim)``) and
    ``weight_scale`` (fp32, ``(num_embeddings,)``).

    >>> import torch, tilefuse
    >>> emb = torch.nn.Embedding(100, 16)
    >>> q = tilefuse.nn.QuantizedEmbedding.from_float(emb)          # int8 rows
    >>> ids = torch.tensor([[1, 5, 99]])
    >>> bool(((q(ids) - emb(ids)).abs() <= emb.weight.abs().max() / 254 + 1e-6).all())
    True
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, dtype: torch.dtype = torch.int8,
                 out_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if out_dtype not in _OUT_DTYPES:
            raise TypeError(f"out_dtype must be a floating dtype (float32, bfloat16, float16, "
                            f"float64), got {out_dtype!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.out_dtype = padding_idx, out_dtype
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim,
                                                   dtype=_table_dtype(dtype), device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32,
                                                        device=device))

    @classmethod
    def from_float(cls, embedding: torch.nn.Embedding,
                   dtype: torch.dtype = torch.int8) -> "QuantizedEmbedding":
        """Quantize ``embedding``'s table per row with the fused int8 / fp8 quantizer.
        ``max_norm`` (which renormalizes looked-up rows in place) is refused."""
        if not isinstance(embedding, torch.nn.Embedding):
            raise TypeError(f"embedding must be a torch.nn.Embedding, got "
                            f"{type(embedding).__name__}")
        if embedding.max_norm is not None:
            raise ValueError("embedding.max_norm is set: the lookup renormalizes the float "
                             "table in place, which a quantized table cannot do")
        w = embedding.weight.detach()
        out_dtype = w.dtype if w.dtype in _OUT_DTYPES else torch.float32
        m = cls(w.shape[0], w.shape[1], padding_idx=embedding.padding_idx, dtype=dtype,
                out_dtype=out_dtype, device=w.device)
        q, s = quantize_per_row(w) if dtype == torch.int8 else quantize_fp8_per_row(w, dtype)
        m.weight.copy_(q)
        m.weight_scale.copy_(s.reshape(-1))
        return m

    @classmethod
    def tied_to(cls, table: torch.nn.Module, padding_idx: Optional[int] = None,
                out_dtype: torch.dtype = torch.float32) -> "QuantizedEmbedding":
        """An embedding reading ``table``'s ``weight`` and ``weight_scale`` (the same tensors,
        stored once): a second embedding tied to the first (T5/BART encoder and decoder)."""
        n, d = table.weight.shape
        m = cls(n, d, padding_idx=padding_idx, dtype=table.weight.dtype, out_dtype=out_dtype,
                device=table.weight.device)
        m.weight, m.weight_scale = table.weight, table.weight_scale
        return m

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or self.weight_scale.requires_grad:
            raise RuntimeError("QuantizedEmbedding is inference-only: its buffers must not "
                               "require grad")
        rows = F.embedding(input, self.weight)                 # 8-bit gather: 1 byte per value
        scale = F.embedding(input, self.weight_scale[:, None])
        return (rows.float() * scale).to(self.out_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        fmt = str(self.weight.dtype).replace("torch.", "")
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, dtype={fmt}"


def tied_linear(table: QuantizedEmbedding, linear: torch.nn.Linear) -> torch.nn.Module:
    """The quantized form of ``linear``, whose weight is ``table``'s float table (GPT-2's
    ``lm_head`` tied to ``wte``), reading ``table``'s 8-bit ``weight`` and per-row scales (the
    projection's per-output-channel scales): an :class:`~tilefuse.nn.Fp8Linear` on an fp8
    table, a weight-only :class:`~tilefuse.nn.Int8Linear` on an int8 one (float activations:
    the logits see the table's rounding only). ``linear``'s bias tensor is kept as is (a bias
    tied elsewhere stays tied); a :class:`tilefuse.nn.Linear` keeps its fused activation."""
    from tilefuse.nn.fp8 import Fp8Linear
    from tilefuse.nn.int8 import Int8Linear

    if not isinstance(linear, torch.nn.Linear) or linear.weight.shape != table.weight.shape:
        raise ValueError(f"linear must be a torch.nn.Linear with the table's shape "
                         f"{tuple(table.weight.shape)}, got {linear!r}")
    n, k = table.weight.shape
    act = getattr(linear, "activation", "none")
    act = None if act == "none" else (act, linear.act_param)
    has_bias = linear.bias is not None
    bias_dtype = linear.bias.dtype if has_bias else None
    if table.weight.dtype == torch.int8:
        m = Int8Linear(k, n, bias=has_bias, mode="weight_only", activation=act,
                       device=table.weight.device, dtype=bias_dtype)
    else:
        m = Fp8Linear(k, n, bias=has_bias, dtype=table.weight.dtype, activation=act,
                      device=table.weight.device, bias_dtype=bias_dtype)
    m.weight, m.weight_scale = table.weight, table.weight_scale
    if has_bias:
        m.bias = linear.bias.detach()
    return m

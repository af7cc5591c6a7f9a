"""A small BERT-style transformer text classifier sized for the cheat sheet's text target
(< 10 MB after int8 quantization; 1.83M parameters with the defaults: ~7.0 MB fp32, ~1.8 MB
weight-only int8 by :func:`int8_size_mb`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tilefuse.models._common import CheckpointMixin, finish


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    ``tilefuse_leaf``: its forward branches on ``self.training`` (SDPA's dropout), so it is
    opaque to :func:`tilefuse.patch`'s tracer, which keeps the owning layer's graph
    mode-independent (and lets the residual ``dropout -> add`` around it be fused)."""
    tilefuse_leaf = True

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.p = dropout

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.p if self.training else 0.0)
        return self.proj(a.transpose(1, 2).reshape(B, L, D))


class EncoderLayer(nn.Module):
    """Post-LN BERT layer: ``LN(x + drop(attn(x)))`` then ``LN(h + drop(W2 gelu(W1 h)))``."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = SelfAttention(dim, heads, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, dim)
        self.ffn_dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.norm1(x + self.attn_dropout(self.attn(x, mask)))
        return self.norm2(h + self.ffn_dropout(self.fc2(self.act(self.fc1(h)))))


class TextClassifier(CheckpointMixin, nn.Module):
    """Token + position embeddings -> ``depth`` encoder layers -> first-token pooling -> logits.

    ``forward(input_ids, attention_mask=None)``: ``input_ids`` (B, L) int64 with L <= max_len,
    ``attention_mask`` (B, L) with 1 for real tokens and 0 for padding."""

    def __init__(self, vocab_size: int = 8000, dim: int = 128, depth: int = 4, heads: int = 4,
                 ffn: int = 512, max_len: int = 128, num_classes: int = 2, dropout: float = 0.1):
        super().__init__()
        self.vocab_size = vocab_size
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn, dropout) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.dropout(self.norm(self.tok(input_ids) + self.pos(pos)))
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].to(torch.bool)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return self.head(x[:, 0])


def text_classifier(fused: bool = True, **kwargs) -> TextClassifier:
    """The small transformer classifier (keyword arguments: see :class:`TextClassifier`)."""
    return finish(TextClassifier(**kwargs), fused)


def int8_size_mb(model: nn.Module) -> float:
    """Serialized size after weight-only int8 quantization of every Linear/Embedding/Conv weight
    (1 byte per weight + one fp32 scale per output row; everything else stays fp32)."""
    total = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if name == "weight" and p.dim() >= 2:
                total += p.numel() + 4 * p.shape[0]
            else:
                total += 4 * p.numel()
        for b in m.buffers(recurse=False):
            total += b.numel() * b.element_size()
    return total / 2 ** 20

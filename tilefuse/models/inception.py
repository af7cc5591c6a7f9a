"""The cheat sheet's Inception v1 module and a small GoogLeNet-style classifier."""
from __future__ import annotations

import torch
import torch.nn as nn

from tilefuse.models._common import CheckpointMixin, ConvNormAct, finish


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels (defaults: the cheat sheet's module)::

        1x1 conv (c1)                          + ReLU
        1x1 conv (c3_reduce) -> 3x3 conv (c3)  + ReLU
        1x1 conv (c5_reduce) -> 5x5 conv (c5)  + ReLU
        3x3 maxpool -> 1x1 conv (pool_proj)    + ReLU

    Each conv is followed by BatchNorm (as torchvision's GoogLeNet), so every branch is a
    Conv->BN->ReLU chain that :func:`tilefuse.patch` fuses. Output channels:
    ``c1 + c3 + c5 + pool_proj`` (256 with the defaults)."""

    def __init__(self, cin: int, c1: int = 64, c3_reduce: int = 96, c3: int = 128,
                 c5_reduce: int = 16, c5: int = 32, pool_proj: int = 32):
        super().__init__()
        self.branch1 = ConvNormAct(cin, c1, 1)
        self.branch2 = nn.Sequential(ConvNormAct(cin, c3_reduce, 1), ConvNormAct(c3_reduce, c3, 3))
        self.branch3 = nn.Sequential(ConvNormAct(cin, c5_reduce, 1), ConvNormAct(c5_reduce, c5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvNormAct(cin, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNetSmall(CheckpointMixin, nn.Module):
    """GoogLeNet's stem and its inception 3a/3b/4a modules, then global pooling, dropout and a
    linear classifier. ``width`` scales every channel count."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        w = lambda c: max(1, int(round(c * width)))  # noqa: E731
        self.stem = nn.Sequential(ConvNormAct(3, w(64), 7, 2), nn.MaxPool2d(3, 2, 1),
                                  ConvNormAct(w(64), w(64), 1), ConvNormAct(w(64), w(192), 3),
                                  nn.MaxPool2d(3, 2, 1))
        a = InceptionBlock(w(192), w(64), w(96), w(128), w(16), w(32), w(32))
        b = InceptionBlock(a.out_channels, w(128), w(128), w(192), w(32), w(96), w(64))
        c = InceptionBlock(b.out_channels, w(192), w(96), w(208), w(16), w(48), w(64))
        self.inception = nn.Sequential(a, b, nn.MaxPool2d(3, 2, 1), c)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stage(self.inception, self.stem(x))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def inception_block(cin: int = 192, fused: bool = True, **channels) -> InceptionBlock:
    """One Inception v1 module (the cheat sheet's 64 / 96->128 / 16->32 / pool->32 by default)."""
    return finish(InceptionBlock(cin, **channels), fused)


def googlenet_small(num_classes: int = 1000, width: float = 1.0, fused: bool = True):
    """A small GoogLeNet-style network (stem + 3 inception modules, ~2M params at width 1)."""
    return finish(GoogLeNetSmall(num_classes, width), fused)

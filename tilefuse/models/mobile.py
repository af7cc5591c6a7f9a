"""MobileNetV2 (Sandler et al. 2018) and EfficientNet-B0..B3 (Tan & Le 2019) in torchvision's
attribute layout (``features``, ``classifier``), built from depthwise separable convolutions.

EfficientNet uses the cheat sheet's compound scaling: depth ``d = alpha**phi``, width
``w = beta**phi``, resolution ``r = gamma**phi`` with alpha=1.2, beta=1.1, gamma=1.15 and
phi = 0..3 for B0..B3. (torchvision's B1..B3 use the paper's hand-rounded coefficients instead, so
their channel/depth counts differ from ours beyond B0.)

Stochastic depth (Huang et al. 2016; EfficientNet paper, torchvision's ``stochastic_depth_prob``):
in training, each MBConv residual branch is dropped for a whole sample with probability
``p_i = stochastic_depth_prob * i / num_blocks`` (block ``i`` counted from 0 over the network, so
the rate ramps linearly from 0 towards 0.2) and the kept branches are scaled by ``1 / (1 - p_i)``;
identity in eval. The mask is drawn with ``torch.bernoulli_`` on the input's device, exactly as
``torchvision.ops.stochastic_depth(mode="row")``: same seed, same mask as torchvision, and
``torch.utils.checkpoint`` (which restores the RNG state) recomputes the same mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from tilefuse.models._common import CheckpointMixin, ConvNormAct, finish, make_divisible

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection (+ x if shapes
    allow)."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(cin, hidden, 1, act=nn.ReLU6))
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(CheckpointMixin, nn.Module):
    """MobileNetV2 with ``width_mult`` (1.0 = the paper, 3.5M params)."""

    SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                [6, 160, 3, 2], [6, 320, 1, 1]]  # t (expansion), c, n (repeats), s (stride)

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        cin = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features = [ConvNormAct(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in self.SETTINGS:
            cout = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvNormAct(cin, self.last_channel, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel,
                                                                       num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stage(self.features, x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    """``x * sigmoid(fc2(silu(fc1(avgpool(x)))))`` (torchvision's ``SqueezeExcitation`` keys)."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


def stochastic_depth(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Drop whole samples of a residual branch: ``x * keep / (1 - p)`` with one Bernoulli(1 - p)
    ``keep`` per sample (first dim); ``x`` itself when not training or ``p == 0``
    (``torchvision.ops.stochastic_depth(x, p, "row", training)``, same RNG use).

    >>> import torch
    >>> y = stochastic_depth(torch.ones(1000, 3), p=0.25)
    >>> bool(((y == 0) | (y == 4 / 3)).all()) and bool((y[:, 0:1] == y).all())
    True
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"stochastic depth probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    noise = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    noise.bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return x * noise


class StochasticDepth(nn.Module):
    """:func:`stochastic_depth` as a module (torchvision's ``StochasticDepth(p, "row")``; no
    state). A leaf for ``tilefuse.patch``'s tracer (its forward branches on ``self.training``)."""

    tilefuse_leaf = True

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"stochastic depth probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (SE ratio 0.25 of the input) and
    stochastic depth ``sd_prob`` on the residual branch (training only)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: int,
                 sd_prob: float = 0.0):
        super().__init__()
        hidden = make_divisible(cin * expand_ratio)
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if hidden != cin:
            layers.append(ConvNormAct(cin, hidden, 1, act=nn.SiLU))
        layers += [ConvNormAct(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcitation(hidden, max(1, cin // 4)),
                   ConvNormAct(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)
        self.out_channels = cout

    def forward(self, x):
        if self.use_res_connect:
            return self.stochastic_depth(self.block(x)) + x
        return self.block(x)


class EfficientNet(CheckpointMixin, nn.Module):
    """EfficientNet from the B0 baseline scaled by ``phi`` (see module docstring).

    ``resolution`` holds the scaled input size ``round(224 * gamma**phi)``; any size works.
    ``stochastic_depth_prob``: drop rate of the last residual branches (ramped linearly over the
    blocks, see the module docstring; 0 disables it)."""

    # expand_ratio, kernel, stride, in, out, repeats (the B0 baseline)
    B0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]

    def __init__(self, phi: float = 0, num_classes: int = 1000, dropout: float = 0.2,
                 width_mult: float = 1.0, stochastic_depth_prob: float = 0.2):
        super().__init__()
        depth, width = ALPHA ** phi, BETA ** phi * width_mult
        self.resolution = int(round(224 * GAMMA ** phi))
        ch = lambda c: make_divisible(c * width)  # noqa: E731
        features = [ConvNormAct(3, ch(32), 3, 2, act=nn.SiLU)]
        repeats = [int(math.ceil(n * depth)) for *_, n in self.B0]
        total, block_id = sum(repeats), 0
        for (t, k, s, cin, cout, _), n in zip(self.B0, repeats):
            stage = []
            cin = ch(cin)
            for i in range(n):
                sd_prob = stochastic_depth_prob * block_id / total  # torchvision's linear ramp
                stage.append(MBConv(cin, ch(cout), k, s if i == 0 else 1, t, sd_prob))
                cin = ch(cout)
                block_id += 1
            features.append(nn.Sequential(*stage))
        last = 4 * ch(320)
        features.append(ConvNormAct(ch(320), last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(last,
                                                                                    num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.features:
            x = self._stage(stage, x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, fused: bool = True):
    """MobileNetV2: inverted residuals with depthwise 3x3 convs and ReLU6 (3.5M params)."""
    return finish(MobileNetV2(num_classes, width_mult), fused)


def _effnet(phi, dropout, num_classes, width_mult, fused, stochastic_depth_prob):
    return finish(EfficientNet(phi, num_classes, dropout, width_mult, stochastic_depth_prob),
                  fused)


def efficientnet_b0(num_classes=1000, width_mult=1.0, fused=True, stochastic_depth_prob=0.2):
    """EfficientNet-B0 (phi=0): the MBConv+SE baseline, 224x224, 5.3M params. Stochastic depth
    up to ``stochastic_depth_prob`` on the residual branches in training (all B0..B3)."""
    return _effnet(0, 0.2, num_classes, width_mult, fused, stochastic_depth_prob)


def efficientnet_b1(num_classes=1000, width_mult=1.0, fused=True, stochastic_depth_prob=0.2):
    """EfficientNet-B1 (phi=1): depth x1.2, width x1.1, resolution 258."""
    return _effnet(1, 0.2, num_classes, width_mult, fused, stochastic_depth_prob)


def efficientnet_b2(num_classes=1000, width_mult=1.0, fused=True, stochastic_depth_prob=0.2):
    """EfficientNet-B2 (phi=2): depth x1.44, width x1.21, resolution 296."""
    return _effnet(2, 0.3, num_classes, width_mult, fused, stochastic_depth_prob)


def efficientnet_b3(num_classes=1000, width_mult=1.0, fused=True, stochastic_depth_prob=0.2):
    """EfficientNet-B3 (phi=3): depth x1.728, width x1.331, resolution 341."""
    return _effnet(3, 0.3, num_classes, width_mult, fused, stochastic_depth_prob)

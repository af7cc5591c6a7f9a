"""ResNet-18/34/50/101/152 in torchvision's layout (``conv1, bn1, relu, maxpool, layer1..4,
avgpool, fc``; same ``state_dict`` keys as ``torchvision.models.resnetXX``).

Depths per stage are the standard ones (He et al. 2016, torchvision): 18 -> [2,2,2,2] basic,
34 -> [3,4,6,3] basic, 50 -> [3,4,6,3] bottleneck, 101 -> [3,4,23,3], 152 -> [3,8,36,3]. (The
cheat sheet's table lists these counts column-wise and is garbled; we follow the paper.)
"""
from __future__ import annotations

from typing import List, Type, Union

import torch
import torch.nn as nn

from tilefuse.models._common import CheckpointMixin, finish


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs, ``H(x) = relu(F(x) + x)``. Unlike torchvision the two ReLUs are separate
    modules (``relu``, ``relu_out``; no parameters, so keys are unchanged), which lets
    :func:`tilefuse.patch` absorb the first into ``BatchNormAct2d`` and, through the
    ``tilefuse_residual`` declaration, turn ``relu(bn2(x) + identity)`` into one fused
    ``bn2(x, identity)`` (BatchNormAct2d's residual input)."""
    expansion = 1
    tilefuse_residual = (("bn2", "relu_out"),)  # patch: relu(bn2(x) + identity) in one kernel

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu_out = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        if isinstance(self.relu_out, nn.Identity):  # patched: bn2 = BatchNormAct2d(relu)
            return self.bn2(out, identity)
        return self.relu_out(self.bn2(out) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), stride on the 3x3 (torchvision "ResNet v1.5")."""
    expansion = 4
    tilefuse_residual = (("bn3", "relu"),)

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.conv3(out)
        if isinstance(self.relu, nn.Identity):  # patched: bn3 = BatchNormAct2d(relu)
            return self.bn3(out, identity)
        return self.relu(self.bn3(out) + identity)


class ResNet(CheckpointMixin, nn.Module):
    """ResNet with ``block`` and ``layers`` blocks per stage; ``width`` scales every channel
    count (1.0 = the paper; tests use e.g. 0.125 to stay small)."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int],
                 num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._stage(stage, x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(block, layers, num_classes, width, fused):
    return finish(ResNet(block, layers, num_classes, width), fused)


def resnet18(num_classes: int = 1000, width: float = 1.0, fused: bool = True) -> ResNet:
    """ResNet-18: basic blocks [2, 2, 2, 2], 512 -> num_classes (11.7M params at width 1)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, width, fused)


def resnet34(num_classes: int = 1000, width: float = 1.0, fused: bool = True) -> ResNet:
    """ResNet-34: basic blocks [3, 4, 6, 3] (21.8M params)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, width, fused)


def resnet50(num_classes: int = 1000, width: float = 1.0, fused: bool = True) -> ResNet:
    """ResNet-50: bottlenecks [3, 4, 6, 3], 2048 -> num_classes (25.6M params)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, width, fused)


def resnet101(num_classes: int = 1000, width: float = 1.0, fused: bool = True) -> ResNet:
    """ResNet-101: bottlenecks [3, 4, 23, 3] (44.5M params)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, width, fused)


def resnet152(num_classes: int = 1000, width: float = 1.0, fused: bool = True) -> ResNet:
    """ResNet-152: bottlenecks [3, 8, 36, 3] (60.2M params)."""
    return _resnet(Bottleneck, [3, 8, 36, 3], num_classes, width, fused)

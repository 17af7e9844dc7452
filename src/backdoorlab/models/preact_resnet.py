"""PreAct-ResNet18 (He et al. 2016, "Identity Mappings in Deep Residual Networks"), the field's
standard benchmark model, as BackdoorBench defines it (``SCLBD/BackdoorBench``,
``models/preact_resnet.py``, after ``kuangliu/pytorch-cifar``): 3x3 stem, no max pool, four stages of
pre-activation basic blocks (64, 128, 256, 512), global average pool, linear. 11.2M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.models.classifier import Classifier
from backdoorlab.models.registry import MODELS


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [PreActBlock(c_in, c_out, stride)]
    layers += [PreActBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


@MODELS.register("preact_resnet18", "PreAct-ResNet18, BackdoorBench's benchmark model (11.2M params)")
def preact_resnet18(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    body = nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
        _stage(64, 64, 2, 1),
        _stage(64, 128, 2, 2),
        _stage(128, 256, 2, 2),
        _stage(256, 512, 2, 2),
    )
    return Classifier(body, 512, num_classes, mean, std)

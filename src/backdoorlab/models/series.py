"""1-D convolutional classifiers for time series, with the image models' interface.

Each is a :class:`Classifier` (normalisation inside, ``forward_features`` / ``forward_head``), its
body an ``nn.Sequential`` of stages, so defenses that read features or attach shallow heads (NAD,
Fine-Pruning, E2ABL) run on series unchanged.

- ``fcn`` and ``resnet1d``: Wang, Yan, Oates, "Time Series Classification from Scratch with Deep
  Neural Networks: A Strong Baseline" (IJCNN 2017), as in Ismail Fawaz et al.'s review code
  (``hfawaz/dl-4-tsc``): FCN = three conv blocks (128 k8, 256 k5, 128 k3; BN, ReLU), global
  average pooling; ResNet = three residual blocks of three convs (k8, k5, k3) with 64, 128, 128
  filters and a 1x1-conv (or BN) shortcut.
- ``inception_time`` and ``inception_time_small``: Ismail Fawaz et al., "InceptionTime: Finding
  AlexNet for Time Series Classification" (DMKD 2020; ``hfawaz/InceptionTime``): modules of a
  1x1 bottleneck (32), three convolutions and a max-pool branch, concatenated, BN, ReLU; a residual
  connection every three modules; depth 6, 32 filters. The reference kernels are 40, 20, 10
  (even, "same" padding in Keras); here 39, 19, 9, odd so the padding is symmetric, as tsai's
  port does. ``inception_time_small`` is one network of depth 6 with 16 filters per branch (the
  paper's ensemble of five is left to the user): 4x fewer multiply-adds, for CPU-sized runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from backdoorlab.models.classifier import Classifier
from backdoorlab.models.registry import MODELS
from backdoorlab.options import PositiveInt


def models_for(modality: str) -> list[str]:
    """The registered models for ``"image"`` or ``"series"`` data (their registry metadata), sorted."""
    return MODELS.names(modality)


def conv_bn_relu_1d(c_in: int, c_out: int, kernel: int, relu: bool = True) -> nn.Sequential:
    """Conv (Keras' "same" padding: (k-1)//2 zeros before, k//2 after, also for even k) -> BN
    (-> ReLU)."""
    layers: list[nn.Module] = [
        nn.ConstantPad1d(((kernel - 1) // 2, kernel // 2), 0.0),
        nn.Conv1d(c_in, c_out, kernel, bias=False),
        nn.BatchNorm1d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@MODELS.register("fcn", "time series: Fully Convolutional Network (Wang et al. 2017), 128-256-128", modality="series")
def fcn(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """FCN: conv(128, k8) -> conv(256, k5) -> conv(128, k3), each BN + ReLU, global average pool,
    linear. About 265k parameters for one input channel."""
    body = nn.Sequential(
        conv_bn_relu_1d(in_channels, 128, 8),
        conv_bn_relu_1d(128, 256, 5),
        conv_bn_relu_1d(256, 128, 3),
    )
    return Classifier(body, 128, num_classes, mean, std)


class ResidualBlock1d(nn.Module):
    """Three convs (k8, k5, k3) with BN, the last without ReLU, plus a shortcut, then ReLU.
    The shortcut is a 1x1 conv + BN where the width changes, else BN alone (as dl-4-tsc)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu_1d(c_in, c_out, 8),
            conv_bn_relu_1d(c_out, c_out, 5),
            conv_bn_relu_1d(c_out, c_out, 3, relu=False),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out))
            if c_in != c_out
            else nn.BatchNorm1d(c_out)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.convs(x) + self.shortcut(x))


@MODELS.register(
    "resnet1d", "time series: ResNet of three residual blocks (Wang et al. 2017), 64-128-128", modality="series"
)
def resnet1d(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """ResNet for time series: residual blocks of 64, 128 and 128 filters, global average pool,
    linear. About 507k parameters for one input channel."""
    body = nn.Sequential(ResidualBlock1d(in_channels, 64), ResidualBlock1d(64, 128), ResidualBlock1d(128, 128))
    return Classifier(body, 128, num_classes, mean, std)


class InceptionModule(nn.Module):
    """Bottleneck 1x1 (where the input has more than one channel), three convs of falling kernel
    size, and max-pool -> 1x1; concatenated (4 x ``filters`` channels), BN, ReLU."""

    def __init__(self, c_in: int, filters: int, kernels: Sequence[int] = (39, 19, 9), bottleneck: int = 32) -> None:
        super().__init__()
        self.bottleneck = nn.Conv1d(c_in, bottleneck, 1, bias=False) if c_in > 1 else nn.Identity()
        width = bottleneck if c_in > 1 else c_in
        self.convs = nn.ModuleList(nn.Conv1d(width, filters, k, padding=k // 2, bias=False) for k in kernels)
        self.pool_branch = nn.Sequential(nn.MaxPool1d(3, stride=1, padding=1), nn.Conv1d(c_in, filters, 1, bias=False))
        self.bn = nn.BatchNorm1d(filters * (len(kernels) + 1))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bottleneck(x)
        out = [conv(h) for conv in self.convs] + [self.pool_branch(x)]
        return self.relu(self.bn(torch.cat(out, dim=1)))


class InceptionBlock(nn.Module):
    """Three inception modules with a residual connection around them (1x1 conv + BN shortcut)."""

    def __init__(self, c_in: int, filters: int) -> None:
        super().__init__()
        width = 4 * filters
        self.modules_ = nn.Sequential(
            InceptionModule(c_in, filters), InceptionModule(width, filters), InceptionModule(width, filters)
        )
        self.shortcut = nn.Sequential(nn.Conv1d(c_in, width, 1, bias=False), nn.BatchNorm1d(width))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.modules_(x) + self.shortcut(x))


def _inception_time(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], filters: int, depth: int
) -> Classifier:
    if depth < 3 or depth % 3:
        raise ValueError(f"InceptionTime depth must be a positive multiple of 3, got {depth}")
    blocks = [InceptionBlock(in_channels if i == 0 else 4 * filters, filters) for i in range(depth // 3)]
    return Classifier(nn.Sequential(*blocks), 4 * filters, num_classes, mean, std)


@MODELS.register(
    "inception_time", "time series: InceptionTime (Ismail Fawaz et al. 2020), depth 6, 32 filters", modality="series"
)
def inception_time(
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    filters: PositiveInt = 32,
    depth: PositiveInt = 6,
) -> Classifier:
    """One InceptionTime network (the paper ensembles five): ``depth`` modules of ``filters``
    filters per branch, residual every three."""
    return _inception_time(num_classes, in_channels, mean, std, filters, depth)


@MODELS.register(
    "inception_time_small", "time series: InceptionTime with 16 filters per branch (CPU-sized)", modality="series"
)
def inception_time_small(
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    filters: PositiveInt = 16,
    depth: PositiveInt = 6,
) -> Classifier:
    """InceptionTime at depth 6 with 16 filters per branch (64 channels)."""
    return _inception_time(num_classes, in_channels, mean, std, filters, depth)

"""A small CNN for digits and MNIST (the CPU default for grey images)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from backdoorlab.models.classifier import Classifier
from backdoorlab.models.registry import MODELS
from backdoorlab.options import PositiveInt


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@MODELS.register("small_cnn", "3-layer CNN (32-64-128, BN, ReLU), for digits and MNIST")
def small_cnn(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], width: PositiveInt = 32
) -> Classifier:
    """conv(w) -> pool -> conv(2w) -> pool -> conv(4w), global average pool, linear.

    8x8 digits end at 2x2, 28x28 MNIST at 7x7. About 95k parameters at ``width=32``.
    """
    body = nn.Sequential(
        conv_bn_relu(in_channels, width),
        nn.MaxPool2d(2),
        conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2),
        conv_bn_relu(2 * width, 4 * width),
    )
    return Classifier(body, 4 * width, num_classes, mean, std)

"""torchvision's ResNet-18/50, VGG-16-BN and MobileNetV2, adapted to small (32 px) inputs.

Adaptations, as CIFAR versions of these networks commonly make them (``kuangliu/pytorch-cifar``,
BackdoorBench): the first convolution becomes stride 1 (ResNet: 3x3 kernel, and no max pool), it takes
``in_channels``, and torchvision's classifier is replaced by our pooled linear head. Randomly
initialised; ImageNet weights do not fit the changed stem. VGG's five max pools need inputs of at
least 32 px.
"""

from __future__ import annotations

from collections.abc import Sequence

import torchvision.models as tvm
from torch import nn

from backdoorlab.models.classifier import Classifier
from backdoorlab.models.registry import MODELS


def _resnet(model: tvm.ResNet, in_channels: int) -> tuple[nn.Module, int]:
    stem = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    body = nn.Sequential(stem, model.bn1, model.relu, model.layer1, model.layer2, model.layer3, model.layer4)
    return body, model.fc.in_features


@MODELS.register("resnet18", "torchvision ResNet-18, 3x3 stride-1 stem, no max pool")
def resnet18(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    body, features = _resnet(tvm.resnet18(), in_channels)
    return Classifier(body, features, num_classes, mean, std, shallow_depth=3)  # stem conv, BN, ReLU


@MODELS.register("resnet50", "torchvision ResNet-50, 3x3 stride-1 stem, no max pool")
def resnet50(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    body, features = _resnet(tvm.resnet50(), in_channels)
    return Classifier(body, features, num_classes, mean, std, shallow_depth=3)  # stem conv, BN, ReLU


@MODELS.register("vgg16_bn", "torchvision VGG-16 with BatchNorm, conv features + linear head")
def vgg16_bn(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    features = tvm.vgg16_bn().features
    first = features[0]
    features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    return Classifier(features, 512, num_classes, mean, std, shallow_depth=3)  # first conv, BN, ReLU


@MODELS.register("mobilenet_v2", "torchvision MobileNetV2, stride-1 first conv")
def mobilenet_v2(num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    model = tvm.mobilenet_v2()
    features = model.features
    first = features[0][0]
    features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride=1, padding=1, bias=False)
    return Classifier(features, model.last_channel, num_classes, mean, std, dropout=0.2)

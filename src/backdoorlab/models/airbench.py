"""The airbench94 network (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
code ``KellerJordan/cifar10-airbench``, ``airbench94.py``): the CPU default for 32x32 images.

Architecture as in the reference: a frozen 2x2 patch-whitening convolution (2 x C x 4 filters,
initialised from the eigenvectors of the training patches' covariance, positive and negative), GELU,
three conv groups (widths 64, 256, 256: conv -> maxpool -> BN -> GELU -> conv -> BN -> GELU) with
identity-initialised (Dirac) convolutions and BatchNorm without a learned scale (momentum 0.4,
eps 1e-12), a global max pool, a bias-free linear head and logits scaled by 1/9.

The training side of airbench94 (its optimiser parametrisation, triangular schedule, Lookahead
averaging, whitening-bias freeze, alternating flip and test-time augmentation) lives in the training
loop's options and the ``fast`` recipe (``experiments.recipes``). Differences from the reference, by
choice: weights stay float32 (bf16 autocast on CUDA instead of fp16 weights), ``width`` may be
changed, and ``in_channels`` may be 1 (MNIST: 8 whitening filters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from backdoorlab.models.classifier import Classifier
from backdoorlab.models.registry import MODELS
from backdoorlab.options import PositiveInt


class _BatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=1e-12, momentum=0.4)
        self.weight.requires_grad = False  # airbench: no learned scale, bias only


class _Conv(nn.Conv2d):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])  # an implicit residual


class _ConvGroup(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            _Conv(c_in, c_out),
            nn.MaxPool2d(2),
            _BatchNorm(c_out),
            nn.GELU(),
            _Conv(c_out, c_out),
            _BatchNorm(c_out),
            nn.GELU(),
        )


class _Whitening(nn.Conv2d):
    """The frozen patch-whitening convolution, run in float32 also under autocast: its filters scale
    the least-varying patch directions by up to 1/sqrt(eps) ~ 45, and in bf16 MNIST training
    diverged on CUDA (CA 0.11 at 2 epochs; 0.989 with float32)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class AirbenchBody(nn.Sequential):
    """Whitening conv + GELU + three conv groups."""

    def __init__(self, in_channels: int, width: int = 64, whiten_kernel: int = 2) -> None:
        whiten_width = 2 * in_channels * whiten_kernel**2
        whiten = _Whitening(in_channels, whiten_width, whiten_kernel, padding=0, bias=True)
        whiten.weight.requires_grad = False
        nn.init.zeros_(whiten.bias)
        super().__init__(
            whiten,
            nn.GELU(),
            _ConvGroup(whiten_width, width),
            _ConvGroup(width, 4 * width),
            _ConvGroup(4 * width, 4 * width),
        )

    @property
    def whitening_bias(self) -> nn.Parameter:
        """The whitening layer's bias (trained for the first epochs of airbench94, then frozen)."""
        return self[0].bias

    @torch.no_grad()
    def init_from_data(self, x: Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised images ``x`` (airbench uses 5000)."""
        whiten = self[0]
        c, (h, w) = x.shape[1], whiten.kernel_size
        patches = x.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
        filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(-1, c, h, w)
        whiten.weight.copy_(torch.cat((filters, -filters)))


@MODELS.register("airbench", "airbench94 network (whitening conv, 3 conv groups), fast on 32x32")
def airbench(
    num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float], width: PositiveInt = 64
) -> Classifier:
    """airbench94 with base width ``width`` (64 in the reference; about 1.97M parameters)."""
    body = AirbenchBody(in_channels, width)
    return Classifier(body, 4 * width, num_classes, mean, std, pool="max", head_bias=False, logit_scale=1 / 9)

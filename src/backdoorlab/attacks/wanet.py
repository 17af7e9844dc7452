"""WaNet (Nguyen & Tran 2021, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR; code
``VinAIResearch/Warping-based_Backdoor_Attack-release``).

A fixed smooth warping field: a ``k x k`` grid of uniform noise in [-1, 1], normalised by its mean
absolute value, upsampled bicubically to the image, scaled by ``s / H`` and added to the identity
sampling grid (clamped to [-1, 1]); images are resampled with ``grid_sample``. Defaults k = 4,
s = 0.5, grid rescale 1, as the paper's CIFAR-10 setting.

Noise mode: ``cross_ratio`` times as many other training samples as poisoned ones are warped with
the field plus per-image random noise (``U(-1, 1) / H``) and keep their true labels, so the network
must learn the exact warp rather than any warp (cross ratio 2, as the paper).
Reconstructed detail: the paper poisons each batch anew during training; here the poisoned and
cross samples are chosen once (a fixed poisoned dataset, as a data-poisoning attacker ships it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from backdoorlab.attacks.triggers import ATTACKS, Trigger
from backdoorlab.options import NonNegativeFloat, PositiveFloat, PositiveInt


@ATTACKS.register("wanet", "WaNet (Nguyen & Tran 2021): smooth warping field, noise mode")
class WaNet(Trigger):
    """Warp images with a fixed random field (``seed``); ``strength`` 0 is the identity."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        k: PositiveInt = 4,
        strength: NonNegativeFloat = 0.5,
        grid_rescale: PositiveFloat = 1.0,
        cross_ratio: NonNegativeFloat = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__(input_shape)
        _, h, w = self.input_shape
        if h != w:
            raise ValueError(f"WaNet's grid needs square images, got {h}x{w}")
        if k < 2 or cross_ratio < 0 or strength < 0:
            raise ValueError("WaNet needs k >= 2, strength >= 0 and cross_ratio >= 0")
        noise = torch.rand(1, 2, k, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        noise = noise / noise.abs().mean()
        noise_grid = F.interpolate(noise, size=h, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        line = torch.linspace(-1, 1, h)
        rows, cols = torch.meshgrid(line, line, indexing="ij")
        identity = torch.stack((cols, rows), 2)[None]
        self.grid = ((identity + strength * noise_grid / h) * grid_rescale).clamp(-1, 1)
        self.cross_ratio = float(cross_ratio)

    def _warp(self, x: Tensor, grid: Tensor) -> Tensor:
        return F.grid_sample(x, grid.to(x.device), align_corners=True)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self._warp(x, self.grid.expand(len(x), -1, -1, -1))

    def cross(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noise-mode samples: the warp plus per-image random noise (uint8 in and out)."""
        h = self.input_shape[1]
        jitter = (torch.rand(len(images), h, h, 2, generator=generator) * 2 - 1) / h
        grid = (self.grid + jitter).clamp(-1, 1)
        out = self._warp(images.float().div(255.0), grid)
        return out.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)

"""Batch augmentation with tensor ops (no per-sample Python, no PIL).

Image functions take a whole uint8 or float batch ``(N, C, H, W)`` and a generator; series
functions a float batch ``(N, C, L)``. All work on any device. The crop pads with zeros and shifts each image by up to ``padding`` pixels, which is
``RandomCrop(size, padding)`` as torchvision applies it, done for the batch in one gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and crop each image back to its size at a random offset."""
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(images.device)
    rows = offsets[0][:, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[1][:, None] + torch.arange(w, device=images.device)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # (N, H, W, C) from advanced indexing, back to (N, C, H, W)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_hflip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def jitter(series: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Add Gaussian noise of ``sigma`` times each series' std (Um et al., "Data Augmentation of
    Wearable Sensor Data for Parkinson's Disease Monitoring using CNNs", ICMI 2017)."""
    noise = torch.randn(series.shape, generator=generator).to(series.device)
    return series + sigma * series.std(dim=-1, keepdim=True, unbiased=False) * noise


def random_scaling(series: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Multiply each series (per channel) by a factor drawn from N(1, sigma^2) (Um et al. 2017)."""
    factor = 1.0 + sigma * torch.randn((*series.shape[:2], 1), generator=generator).to(series.device)
    return series * factor

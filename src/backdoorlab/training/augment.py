"""Batch augmentation with tensor ops (no per-sample Python, no PIL).

Image functions take a whole uint8 or float batch ``(N, C, H, W)`` and a generator; series
functions a float batch ``(N, C, L)``. All work on any device. The crop pads with zeros and shifts each image by up to ``padding`` pixels, which is
``RandomCrop(size, padding)`` as torchvision applies it, done for the batch in one gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: What fills the border a translation opens (``random_crop``'s ``mode``).
CROP_MODES = ("zeros", "reflect")


def random_crop(images: Tensor, padding: int, generator: torch.Generator, mode: str = "zeros") -> Tensor:
    """Shift each image by up to ``padding`` pixels in each direction, filling the border with zeros
    (``mode="zeros"``, torchvision's ``RandomCrop(size, padding)``) or with the mirrored image
    (``"reflect"``, as airbench94)."""
    if padding <= 0:
        return images
    if mode not in CROP_MODES:
        raise ValueError(f"unknown crop padding mode '{mode}'; valid: {', '.join(CROP_MODES)}")
    n, c, h, w = images.shape
    device = images.device
    offsets = torch.randint(-padding, padding + 1, (2, n), generator=generator).to(device)
    rows = offsets[0][:, None] + torch.arange(h, device=device)  # (N, H) source rows, may fall outside
    cols = offsets[1][:, None] + torch.arange(w, device=device)  # (N, W)
    if mode == "reflect":
        source = images
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
    else:
        source = F.pad(images, (padding,) * 4)
        rows, cols = rows + padding, cols + padding
    batch = torch.arange(n, device=device)[:, None, None]
    # (N, H, W, C) from advanced indexing, back to (N, C, H, W)
    return source.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_hflip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image left-right with probability 1/2."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def alternating_hflip(images: Tensor, first_flips: Tensor, epoch: int) -> Tensor:
    """airbench's derandomised flip (Jordan 2024, section 3.6): image ``i`` is mirrored in even
    epochs where ``first_flips[i]`` (drawn once per run) is true, and in odd epochs where it is false,
    so over any two epochs every image is seen once each way."""
    flip = first_flips ^ bool(epoch % 2)
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

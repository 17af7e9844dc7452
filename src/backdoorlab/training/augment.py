"""Batch augmentation with tensor ops (no per-sample Python, no PIL).

Image functions take a whole uint8 or float batch ``(N, C, H, W)`` and a generator; series
functions a float batch ``(N, C, L)``. All work on any device. The crop pads with zeros and shifts each image by up to ``padding`` pixels, which is
``RandomCrop(size, padding)`` as torchvision applies it, done for the batch in one gather.
"""

from __future__ import annotations

import math

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


# --- SupContrast's views (D-ST, NAB) -----------------------------------------------------------

#: ITU-R 601 luma weights (torchvision's ``rgb_to_grayscale``).
LUMA = (0.2989, 0.587, 0.114)


def sample_affine(images: Tensor, matrices: Tensor, mode: str) -> Tensor:
    """``images`` (float) sampled through per-image 2x3 affine maps in pixel offsets from the
    image centre (output offset -> input offset), zeros outside."""
    n, _, h, w = images.shape
    scale = torch.tensor([w / 2, h / 2], device=images.device, dtype=images.dtype)
    theta = matrices.to(images.device, images.dtype).clone()
    # pixel offsets u = x_n * (W/2, H/2): conjugate the map into grid_sample's normalised frame
    theta[:, :, :2] = theta[:, :, :2] * scale[None, None, :] / scale[None, :, None]
    theta[:, :, 2] = theta[:, :, 2] / scale[None, :]
    grid = F.affine_grid(theta, [n, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _grey(images: Tensor) -> Tensor:
    """Luma of RGB images, (N, 1, H, W)."""
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    return (images * weights[None, :, None, None]).sum(1, keepdim=True)


def _shift_hue(images: Tensor, shift: Tensor) -> Tensor:
    """RGB -> HSV, hue + ``shift`` (per image, in turns), -> RGB (torchvision's ``adjust_hue``)."""
    r, g, b = images.unbind(1)
    high, low = images.amax(1), images.amin(1)
    chroma = high - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift[:, None, None]) % 1.0
    saturation = torch.where(high > 0, chroma / torch.where(high > 0, high, torch.ones_like(high)), 0 * high)
    k = (torch.tensor([5.0, 3.0, 1.0], device=images.device)[None, :, None, None] + hue[:, None] * 6) % 6
    part = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return high[:, None] * (1 - saturation[:, None] * part)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def contrastive_views(images: Tensor, generator: torch.Generator, flip: bool) -> Tensor:
    """SupContrast's augmentation, as D-ST's ST module uses it, on a float batch in [0, 1]:
    ``RandomResizedCrop(scale=(0.2, 1))``, a horizontal flip (where ``flip``), ``ColorJitter(0.4,
    0.4, 0.4, 0.1)`` with probability 0.8 and ``RandomGrayscale(0.2)`` (the last two change colour
    images only). Reconstructed for whole batches: a crop larger than the image is clipped to it
    (torchvision redraws it, up to 10 times), its resampling reads up to half a pixel beyond the
    crop at its edges (torchvision's stays inside), and the jitter applies brightness, contrast,
    saturation, hue in that order (torchvision draws an order per image). The views keep the
    batch's memory format."""
    n, c, h, w = images.shape
    area = _uniform(n, 0.2, 1.0, generator) * h * w
    ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), generator))
    cw, ch = (area * ratio).sqrt().clamp(max=w), (area / ratio).sqrt().clamp(max=h)
    cx = (w - cw) * (torch.rand(n, generator=generator) - 0.5)  # crop centre offset, pixels
    cy = (h - ch) * (torch.rand(n, generator=generator) - 0.5)
    sx = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    zero = torch.zeros(n)
    maps = torch.stack([torch.stack([sx * cw / w, zero, cx], 1), torch.stack([zero, ch / h, cy], 1)], 1)
    x = sample_affine(images, maps, "bilinear").clamp(0, 1)
    jitter = (torch.rand(n, generator=generator) < 0.8).to(x.device)

    def factor(low: float, high: float) -> Tensor:
        drawn = _uniform(n, low, high, generator).to(x.device, x.dtype)
        return torch.where(jitter, drawn, torch.full_like(drawn, 1.0 if low > 0 else 0.0))[:, None, None, None]

    brightness, contrast, saturation = factor(0.6, 1.4), factor(0.6, 1.4), factor(0.6, 1.4)
    hue = factor(-0.1, 0.1)
    x = (x * brightness).clamp(0, 1)
    grey = _grey(x) if c == 3 else x
    x = (contrast * x + (1 - contrast) * grey.mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    if c == 3:
        x = (saturation * x + (1 - saturation) * _grey(x)).clamp(0, 1)
        x = _shift_hue(x, hue.flatten())
        to_grey = (torch.rand(n, generator=generator) < 0.2).to(x.device)[:, None, None, None]
        x = torch.where(to_grey, _grey(x).expand_as(x), x)
    layout = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return x.contiguous(memory_format=layout)

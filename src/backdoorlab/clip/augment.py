"""The augmentations of the cleaning methods, on batches.

- PAR (``utils.load_clip_model`` of nmndeep/PerturbAndRecover): Gaussian noise (std 0.2, p 0.5, clipped)
  and a small square cut-out (``RandomErasing(p=0.5, scale=(0.005, 0.01), ratio=(1, 1), value=0)``
  after normalisation, i.e. the normalisation mean in pixel space).
- CleanCLIP: torchvision's AutoAugment (ImageNet policy) per image, and EDA text augmentation (Wei &
  Zou 2019). EDA's synonym replacement and insertion need WordNet, which cannot be fetched offline:
  reconstructed with its two WordNet-free operations (random swap, random deletion, α = 0.1) and
  insertion of a copy of a word of the caption; one operation per caption, as CleanCLIP takes EDA's
  first output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.transforms import AutoAugment, AutoAugmentPolicy


def par_augment(
    x: Tensor,
    fill: Tensor,
    generator: torch.Generator,
    *,
    noise_std: float = 0.2,
    p: float = 0.5,
    erase_scale: tuple[float, float] = (0.005, 0.01),
) -> Tensor:
    """PAR's light augmentation of float images in [0, 1] ``(B, C, H, W)``; ``fill`` is the per-channel
    value a cut-out takes (the model's normalisation mean)."""
    n, _, h, w = x.shape
    noisy = torch.rand(n, generator=generator) < p
    noise = torch.randn(x.shape, generator=generator) * noise_std
    x = torch.where(noisy.view(-1, 1, 1, 1).to(x.device), (x + noise.to(x.device)).clamp(0.0, 1.0), x)
    erase = (torch.rand(n, generator=generator) < p).tolist()
    area = torch.empty(n).uniform_(*erase_scale, generator=generator) * h * w
    x = x.clone()
    for i in (i for i, e in enumerate(erase) if e):
        side = max(1, min(h, w, round(math.sqrt(float(area[i])))))
        top = int(torch.randint(h - side + 1, (1,), generator=generator))
        left = int(torch.randint(w - side + 1, (1,), generator=generator))
        x[i, :, top : top + side, left : left + side] = fill.view(-1, 1, 1).to(x)
    return x


_AUTOAUGMENT = AutoAugment(AutoAugmentPolicy.IMAGENET)


def autoaugment(images: Tensor, generator: torch.Generator) -> Tensor:
    """AutoAugment (ImageNet policy) drawn per image of a uint8 batch (CleanCLIP's image augmentation).
    torchvision draws from the global generator; it is seeded from ``generator`` for reproducibility."""
    state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    try:
        return torch.stack([_AUTOAUGMENT(image) for image in images.cpu()]).to(images.device)
    finally:
        torch.random.set_rng_state(state)


def eda(caption: str, generator: torch.Generator, alpha: float = 0.1) -> str:
    """One EDA operation on ``caption`` (random swap, deletion, or insertion of a copy of a word)."""
    words = caption.split()
    if len(words) < 2:
        return caption
    changes = max(1, round(alpha * len(words)))
    op = int(torch.randint(3, (1,), generator=generator))
    for _ in range(changes):
        i, j = (int(v) for v in torch.randint(len(words), (2,), generator=generator))
        if op == 0:
            words[i], words[j] = words[j], words[i]
        elif op == 1 and len(words) > 1:
            del words[i]
        else:
            words.insert(j, words[i])
    return " ".join(words)

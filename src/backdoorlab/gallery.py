"""Pictures of triggers: clean images, their triggered copies, and the amplified difference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from backdoorlab.attacks.triggers import create_trigger
from backdoorlab.data.dataset import TensorDataset, seeded_permutation
from backdoorlab.data.sources import load_dataset


def trigger_rows(
    images: TensorDataset, attack: str, options: dict[str, Any], count: int, seed: int, difference: bool
) -> torch.Tensor:
    """Float images in [0, 1]: ``count`` clean test images, then triggered, then (optionally) the
    absolute difference scaled so its largest value is white."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    trigger = create_trigger(attack, images.input_shape, **options)
    picked = images.inputs[seeded_permutation(len(images), seed)[: min(count, len(images))]]
    triggered = trigger(picked, torch.Generator().manual_seed(seed))
    rows = [picked.float() / 255.0, triggered.float() / 255.0]
    if difference:
        diff = (rows[1] - rows[0]).abs()
        rows.append(diff / diff.max().clamp_min(1e-8))
    return torch.cat(rows)


def save_grid(images: torch.Tensor, columns: int, output: str | Path, min_side: int = 96) -> Path:
    """Save images as a grid PNG, enlarging small ones with nearest-neighbour so pixels stay visible."""
    scale = max(1, -(-min_side // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, output, nrow=columns, padding=2, pad_value=0.5)
    return output


def trigger_grid(
    dataset: str,
    attack: str,
    options: dict[str, Any],
    count: int = 8,
    output: str | Path = "trigger.png",
    seed: int = 0,
    data_root: str | None = None,
    difference: bool = False,
) -> Path:
    """Save a grid of ``count`` test images of ``dataset``: clean (top row), triggered, and with
    ``difference`` the amplified difference. Returns the path."""
    test = load_dataset(dataset, data_root).test
    images = trigger_rows(test, attack, options, count, seed, difference)
    return save_grid(images, min(count, len(test)), output)

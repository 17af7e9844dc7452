"""Pictures of triggers: clean images above their triggered copies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from backdoorlab.attacks.triggers import create_trigger
from backdoorlab.data.dataset import seeded_permutation
from backdoorlab.data.sources import load_dataset


def trigger_grid(
    dataset: str,
    attack: str,
    options: dict[str, Any],
    count: int = 8,
    output: str | Path = "trigger.png",
    seed: int = 0,
    data_root: str | None = None,
    min_side: int = 96,
) -> Path:
    """Save a 2-row PNG grid (clean, triggered) of ``count`` test images; small images are
    enlarged with nearest-neighbour so single pixels stay visible. Returns the path."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    test = load_dataset(dataset, data_root).test
    trigger = create_trigger(attack, test.input_shape, **options)
    picked = test.inputs[seeded_permutation(len(test), seed)[: min(count, len(test))]]
    triggered = trigger(picked, torch.Generator().manual_seed(seed))
    images = torch.cat([picked, triggered]).float() / 255.0
    scale = max(1, -(-min_side // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, output, nrow=len(picked), padding=2, pad_value=0.5)
    return output

"""Pictures of triggers: clean images, their triggered copies, and the amplified difference; for
time series, line plots of clean and triggered series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from backdoorlab.attacks.triggers import Trigger, create_trigger
from backdoorlab.data.dataset import Splits, TensorDataset, seeded_permutation, subsample
from backdoorlab.data.sources import load_dataset
from backdoorlab.plotting import pyplot
from backdoorlab.training.loop import resolve_device


def fitted_trigger(attack: str, options: dict[str, Any], splits: Splits, seed: int = 0, device: str = "cpu") -> Trigger:
    """Build a trigger; an attack that adapts to a model (TrojanNN, label-consistent) is fitted on a
    quick surrogate: the quick recipe's model, one epoch on at most 5000 training images. A
    training-controlled attack (Input-aware) is fitted the same way: its generators train with a
    quick victim, one epoch of the quick recipe on those images (after its own pre-training, such as
    Input-aware's mask generator), so the picture shows a lightly trained generator, not a run's.
    An attack that fits on clean images alone (SSBA's encoder) is fitted on those images."""
    trigger = create_trigger(attack, splits.train.input_shape, **options)
    if trigger.fits_first:
        from backdoorlab.experiments import RunConfig, fit_attack

        train = subsample(splits.train, min(5000, len(splits.train)), seed)
        config = RunConfig(
            dataset=splits.train.name, recipe="quick", attack=attack, attack_options=dict(options), epochs=1, seed=seed
        )
        fit_attack(trigger, train, config, resolve_device(device))
    return trigger


def trigger_rows(images: TensorDataset, trigger: Trigger, count: int, seed: int, difference: bool) -> torch.Tensor:
    """Float images in [0, 1]: ``count`` clean test images, then as poisoned training images
    (:meth:`Trigger.poison`: the trigger, plus label-consistent's perturbation), then (optionally)
    the absolute difference scaled so its largest value is white."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    chosen = seeded_permutation(len(images), seed)[: min(count, len(images))]
    picked = images.inputs[chosen]
    triggered = trigger.poison(picked, images.labels[chosen], torch.Generator().manual_seed(seed))
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


def series_plot(images: TensorDataset, trigger: Trigger, count: int, seed: int, output: str | Path) -> Path:
    """Save ``count`` test series (first channel) with their triggered copies overlaid, one panel
    each (needs matplotlib: the ``plot`` extra; a ``RuntimeError`` says so where it is missing)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    plt = pyplot()
    chosen = seeded_permutation(len(images), seed)[: min(count, len(images))]
    clean = images.inputs[chosen]
    triggered = trigger.poison(clean, images.labels[chosen], torch.Generator().manual_seed(seed))
    columns = min(4, len(chosen))
    rows = -(-len(chosen) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.2 * rows), squeeze=False)
    for ax, before, after, label in zip(axes.flat, clean, triggered, images.labels[chosen], strict=False):
        ax.plot(after[0].numpy(), color="tab:red", lw=1.2, label="triggered")
        ax.plot(before[0].numpy(), color="black", lw=1.0, label="clean")
        ax.set_title(f"class {images.classes[int(label)]}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{images.name}: {trigger!r}", fontsize=9)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def trigger_grid(
    dataset: str,
    attack: str | None,
    options: dict[str, Any],
    count: int = 8,
    output: str | Path = "trigger.png",
    seed: int = 0,
    data_root: str | None = None,
    difference: bool = False,
) -> Path:
    """Save a grid of ``count`` test images of ``dataset``: clean (top row), poisoned, and with
    ``difference`` the amplified difference (for series: :func:`series_plot`). Returns the path."""
    from backdoorlab.experiments.config import DEFAULT_ATTACK

    splits = load_dataset(dataset, data_root)
    trigger = fitted_trigger(attack or DEFAULT_ATTACK[splits.test.modality], options, splits, seed)
    if splits.test.modality == "series":
        return series_plot(splits.test, trigger, count, seed, output)
    images = trigger_rows(splits.test, trigger, count, seed, difference)
    return save_grid(images, min(count, len(splits.test)), output)

"""Helpers that repairs and detectors share: the recipe of a fine-tuning step, copies of the suspect
model, a held-out share of the trusted split, and a callback that hands each epoch to the observer.

The repair and detector interfaces themselves live in :mod:`backdoorlab.defenses.base` with the
training-time one; their names are imported here too, for code that imported them from this module.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from backdoorlab.data.dataset import TensorDataset, seeded_permutation
from backdoorlab.defenses.base import (  # noqa: F401  (the old import path of these names)
    DETECTORS,
    REPAIRS,
    DefenseContext,
    Detection,
    Detector,
    Observer,
    Repair,
    RepairDefense,
    create_detector,
    create_repair,
)
from backdoorlab.metrics import clean_accuracy
from backdoorlab.training.loop import Callback, TrainConfig, predict


def tuning_recipe(
    recipe: TrainConfig,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    milestones: Sequence[int] = (),
    momentum: float = 0.9,
) -> TrainConfig:
    """The recipe of a fine-tuning step inside a repair: the run's augmentation and device settings
    with the repair's own optimiser settings, no label smoothing, no data-dependent initialisation
    (that would overwrite the trained weights), and none of airbench's optimiser tricks (BN-bias
    rate, Lookahead, whitening-bias schedule), which belong to training from scratch."""
    return replace(
        recipe,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        schedule=schedule,
        milestones=list(milestones),
        momentum=momentum,
        min_last_batch=0.0,  # a small trusted set keeps every sample
        label_smoothing=0.0,
        data_init=False,
        regularizer=None,
        regularizer_options={},
        norm_lr_scale=1.0,
        lookahead_epoch=None,
        whiten_bias_epochs=None,
    )


def suspect_copy(model: nn.Module) -> nn.Module:
    """A deep copy to repair, so the caller's suspect model stays as it was."""
    return copy.deepcopy(model)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off: the pivot / teacher of a repair."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def shuffled_index_batches(
    size: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """One shuffled pass over ``size`` samples as index batches of ``batch_size`` on ``device``
    (the permutation drawn from ``generator``): the repairs' own loops over the trusted split."""
    return torch.randperm(size, generator=generator).to(device).split(batch_size)


def holdout_split(data: TensorDataset, share: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Split trusted data into ``(tune, held_out)``; ``held_out`` (``share`` of it, at least one
    sample) is what a repair chooses its hyperparameters or checkpoints on."""
    count = max(1, round(share * len(data)))
    if count >= len(data):
        raise ValueError(f"a held-out share of {share} leaves no trusted data to tune on ({len(data)} samples)")
    order = seeded_permutation(len(data), seed)
    return data.subset(order[count:].sort().values), data.subset(order[:count].sort().values)


def accuracy(model: nn.Module, data: TensorDataset, device: torch.device) -> float:
    """Top-1 accuracy on (clean) ``data``."""
    return clean_accuracy(predict(model, data.inputs, device=device), data.labels)


class ObserveEachEpoch(Callback):
    """Hands the model to the context's observer after each training epoch (checkpoint = epoch + 1)."""

    def __init__(self, ctx: DefenseContext) -> None:
        self.ctx = ctx

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        self.ctx.observe(model, epoch + 1)

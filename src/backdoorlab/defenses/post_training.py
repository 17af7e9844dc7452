"""The post-training interfaces: repairing and detecting a suspect model with trusted clean data.

A **repair** defense gets a trained (suspect) model, the trusted clean split (by default 1% of the
training set, carved off before poisoning) and the run's recipe, and returns a repaired model. A
**detector** gets the same and returns a score: higher means more likely backdoored. Neither gets
the test set, the trigger, the target or the poison mask (DESIGN.md). Where a method wants to be
watched while it works (fine-tuning's persistence curve), the evaluation passes an ``observer``
that the method calls with the model at each checkpoint. The observer only copies the model's
weights (``experiments.run.CheckpointSnapshots``) and returns nothing; the evaluation measures the
copies after the repair has returned, so no measurement exists while the repair runs.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from backdoorlab.data.dataset import TensorDataset, seeded_permutation
from backdoorlab.defenses.base import DefenseOutcome
from backdoorlab.metrics import clean_accuracy
from backdoorlab.registry import Registry
from backdoorlab.training.loop import Callback, TrainConfig, predict

#: ``observer(model, checkpoint) -> None``: called by a repair at its checkpoints (0 = before
#: repairing); it keeps a copy of the model's weights and nothing the repair could read back.
Observer = Callable[[nn.Module, int], None]

#: Repair defenses by name: ``cls(**options)``.
REPAIRS: Registry[type[RepairDefense]] = Registry("repair defense")
#: Detectors by name: ``cls(**options)``.
DETECTORS: Registry[type[Detector]] = Registry("detector")


class _Configurable:
    _options: dict[str, Any] = {}

    def check_trusted(self, trusted: TensorDataset) -> None:
        """Refuse, before any training, a trusted split too small for this method (a
        ``ValueError`` that says how small it is); the default asks for two samples."""
        if len(trusted) < 2:
            raise ValueError(
                f"{type(self).__name__} needs a trusted split of at least 2 samples, got {len(trusted)}: "
                "raise --trusted-size"
            )

    def config(self) -> dict[str, Any]:
        """The options that rebuild this method (stored with results)."""
        return dict(self._options)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class RepairDefense(_Configurable, ABC):
    """Base class of post-training repairs; subclasses keep their options in ``self._options``."""

    #: What the checkpoints passed to an ``observer`` count: epochs of clean fine-tuning here.
    checkpoint_unit: ClassVar[str] = "epoch"

    @abstractmethod
    def repair(
        self,
        model: nn.Module,
        trusted: TensorDataset,
        recipe: TrainConfig,
        *,
        device: torch.device,
        seed: int,
        observer: Observer | None = None,
    ) -> DefenseOutcome:
        """Return a repaired model (``model`` itself is left unchanged)."""


@dataclass
class Detection:
    """A detector's verdict: ``score`` (higher = more likely backdoored), whether it crosses the
    method's own threshold (``None`` when the method has none), and details (per-class scores...)."""

    score: float
    flagged: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Detector(_Configurable, ABC):
    """Base class of backdoor detectors."""

    @abstractmethod
    def detect(
        self, model: nn.Module, trusted: TensorDataset, recipe: TrainConfig, *, device: torch.device, seed: int
    ) -> Detection:
        """Score ``model`` (left unchanged)."""


def create_repair(name: str, **options: Any) -> RepairDefense:
    return REPAIRS.create(name, **options)


def create_detector(name: str, **options: Any) -> Detector:
    return DETECTORS.create(name, **options)


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
    """Calls an observer after each training epoch (checkpoint = epoch + 1)."""

    def __init__(self, observer: Observer | None) -> None:
        self.observer = observer

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        if self.observer is not None:
            self.observer(model, epoch + 1)

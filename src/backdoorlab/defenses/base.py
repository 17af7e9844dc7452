"""The training-time defense interface.

A training-time defense gets the untrusted (possibly poisoned) training set, a factory for fresh
models of the run's architecture (``run`` passes an ``experiments.run.ModelSpec``: the model's
name, options and the data's shape facts, nothing else) and the run's training recipe. It never gets the poison mask, the
trigger, the target class or the test set (DESIGN.md); it returns a trained model and, where it
isolates samples, its own verdict as a mask over the training set. How good that verdict is
(isolation precision and recall) is measured by the evaluation, which alone holds the truth.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.registry import Registry
from backdoorlab.training.loop import TrainConfig

#: Training-time defenses by name: ``cls(**options)``.
DEFENSES: Registry[type[TrainingDefense]] = Registry("defense")

ModelFactory = Callable[[], nn.Module]


class DefenseWarning(UserWarning):
    """A defense ran but could not act: it returns the model as undefended training (or the suspect
    model, for a repair) would. Shown once per place in the code; turn it into an error with
    ``warnings.simplefilter("error", DefenseWarning)``."""


@dataclass
class DefenseOutcome:
    """What a defense returns: the model to deploy, the samples it isolated (a boolean mask over
    the training set it got, or ``None``), and method-specific details (stored with the result)."""

    model: nn.Module
    isolated: Tensor | None = None
    details: dict[str, Any] = field(default_factory=dict)


class TrainingDefense(ABC):
    """Base class; subclasses store their options in ``self._options`` (see :meth:`config`)."""

    _options: dict[str, Any] = {}

    @abstractmethod
    def train(
        self,
        data: TensorDataset,
        build_model: ModelFactory,
        recipe: TrainConfig,
        *,
        device: torch.device,
        seed: int,
    ) -> DefenseOutcome:
        """Train a model on ``data`` (untrusted) defensively."""

    def config(self) -> dict[str, Any]:
        """The options that rebuild this defense (stored with results)."""
        return dict(self._options)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def create_defense(name: str, **options: Any) -> TrainingDefense:
    """Build a registered defense; unknown options are refused with the valid ones listed."""
    return DEFENSES.create(name, **options)


def lowest(scores: Tensor, ratio: float) -> Tensor:
    """Boolean mask of the ``ratio`` share (at least one) of samples with the lowest scores."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"an isolation ratio must be in (0, 1), got {ratio}")
    count = max(1, round(ratio * len(scores)))
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[scores.argsort()[:count]] = True
    return mask


def require_images(data: TensorDataset, method: str) -> None:
    """Refuse series for a method that works in pixel space (trigger inversion)."""
    if data.modality != "image":
        raise ValueError(
            f"{method} inverts triggers in pixel space and takes images only, not {data.modality} data "
            "(fine_tuning, fine_pruning, nad, abl and e2abl take series)"
        )

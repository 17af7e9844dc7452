"""Training-controlled attacks: the attacker also controls the victim's training.

A poison-only attack changes the training data and lets the toolkit train the victim as any user
would. A training-controlled attack (Input-aware, LIRA, Blind in BackdoorBench) also shapes the
training itself: a trigger generator trained jointly with the victim, a loss added inside the loop.
Here the victim is still trained by the toolkit's one loop with the run's recipe (epochs, learning
rate, schedule, augmentation); the attack only supplies what the loop already takes from a defense:

1. :meth:`TrainingControlledTrigger.begin` fits what the attack fits before training (Input-aware's
   mask generator) on the attacker's clean copy of the training set, and returns an
   :class:`AttackStep`: a ``TrainStep`` (``training.steps``; a structural protocol, so this layer
   needs no import from ``training``) that poisons a share of each augmented batch on the fly and
   returns logits and per-sample losses, with :meth:`AttackStep.after_step` and
   :meth:`AttackStep.after_epoch` for the attacker's own optimiser (``experiments.run`` wraps them
   in a ``Callback``);
2. :meth:`TrainingControlledTrigger.end` freezes the attack: from then on the object is an
   ordinary fitted :class:`~backdoorlab.attacks.triggers.Trigger`, a pure function of its inputs,
   that triggers the test set once (and, as BackdoorBench saves its ``bd_train``, builds the fixed
   poisoned training set that defenses get).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from backdoorlab.attacks.poisoning import PoisonSpec
from backdoorlab.attacks.triggers import Trigger
from backdoorlab.data.dataset import TensorDataset

#: ``training.steps.PerSampleLoss`` (``loss_fn(logits, labels, indices, epoch) -> per-sample losses``),
#: restated: this layer imports nothing from ``training``.
PerSampleLoss = Callable[[Tensor, Tensor, Tensor, int], Tensor]


class AttackStep(ABC):
    """The attack's part of the victim's training. ``step(model, x, y, loss_fn, indices, epoch,
    generator) -> (logits, per-sample losses)`` as a ``TrainStep``; the loop's one backward pass
    also fills the gradients of the attack's own trainable parts, which :meth:`after_step` applies."""

    @abstractmethod
    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: PerSampleLoss,
        indices: Tensor,
        epoch: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]: ...

    def after_step(self) -> None:
        """After each optimiser step of the victim (the attacker's own optimiser steps here)."""

    def after_epoch(self, epoch: int) -> None:
        """After each epoch (0-based): the attacker's schedules."""


def batch_count(rate: float, batch: int, generator: torch.Generator) -> int:
    """Samples of a batch of ``batch`` to poison at ``rate``: ``int(rate * batch)``, or, where that
    is below one, one sample with probability ``rate * batch`` (BackdoorBench's
    ``generalize_to_lower_pratio`` in ``attack/inputaware.py``; the draw comes from ``generator``)."""
    expected = rate * batch
    if expected >= 1:
        return int(expected)
    return int(float(torch.rand((), generator=generator)) < expected)


def batch_rate(spec: PoisonSpec, size: int) -> float:
    """The share of each batch a training-controlled attack poisons: the run's poison rate, a
    fraction of the training set (a count is turned into its fraction of ``size``)."""
    if isinstance(spec.rate, int):
        return min(1.0, spec.rate / max(1, size))
    return float(spec.rate)


def data_normalization(data: TensorDataset) -> tuple[Tensor, Tensor]:
    """``data``'s per-channel mean and std shaped (C, 1, 1): the normalisation the reference attacks'
    generators read their images in."""
    c = data.inputs.shape[1]
    mean = torch.tensor(data.mean, dtype=torch.float32).reshape(c, 1, 1)
    return mean, torch.tensor(data.std, dtype=torch.float32).reshape(c, 1, 1)


class TrainingControlledTrigger(Trigger):
    """Base of a training-controlled attack; see the module's docstring for the protocol. Unfitted
    until :meth:`end`; the run (``experiments.run.fit_attack``) calls :meth:`begin`, trains the
    victim with the returned step, then :meth:`end`."""

    controls_training: ClassVar[bool] = True

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__(input_shape)
        self.fitted = False

    def check_spec(self, spec: PoisonSpec) -> None:
        """Refuse a poisoning strategy the attack cannot follow (before any work): it poisons a share
        of every batch, all-to-one or all-to-all, from all classes, dirty-label."""
        name = type(self).__name__
        if spec.clean_label:
            raise ValueError(
                f"{name} poisons each training batch with relabelled samples: clean-label is not supported"
            )
        if spec.source is not None:
            raise ValueError(f"{name} poisons samples of every class: a source class is not supported")

    @abstractmethod
    def begin(
        self,
        data: TensorDataset,
        spec: PoisonSpec,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        epochs: int | None = None,
    ) -> AttackStep:
        """Fit what is fitted before the victim's training on ``data`` (the attacker's clean copy)
        and return the step the victim's training runs with; ``epochs`` are the victim's (for an
        attack whose stages divide them)."""

    def end(self) -> None:
        """Freeze the attack after the victim's training: it is now a fitted, pure trigger."""
        self.fitted = True

    def _require_trained(self) -> None:
        if not self.fitted:
            raise ValueError(
                f"{type(self).__name__} is a training-controlled attack: its trigger is trained with the victim "
                "(backdoorlab.experiments.fit_attack trains both), so it cannot trigger images before that"
            )

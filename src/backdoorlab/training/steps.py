"""What one training step computes: the loop's forward-and-loss hook.

A :class:`TrainStep` turns a batch into logits and per-sample losses; the loop then averages the
losses and takes the optimiser step. :func:`plain_step` (forward, then the per-sample loss) is the
default; a defensive regulariser (``training.regularizers``) is a step that adds its term, and a
defense that trains extra heads in the same run (E2ABL) passes its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: ``loss_fn(logits, labels, indices, epoch) -> per-sample losses (B,)``; ``indices`` index the
#: training set.
PerSampleLoss = Callable[[Tensor, Tensor, Tensor, int], Tensor]


class TrainStep(Protocol):
    """``step(model, x, y, loss_fn, indices, epoch, generator) -> (logits, per-sample losses)``.

    ``x`` is the augmented float batch, ``y`` its labels, ``indices`` its rows of the training set;
    draws must come from ``generator`` (or the global generator ``train`` seeds) so that runs
    repeat. The logits serve the history's accuracy; the losses' mean is the batch objective."""

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


def plain_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: PerSampleLoss,
    indices: Tensor,
    epoch: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """The default step: ``logits = model(x)`` and ``loss_fn`` on the float32 logits."""
    logits = model(x)
    return logits, loss_fn(logits.float(), y, indices, epoch)


def cross_entropy(label_smoothing: float = 0.0) -> PerSampleLoss:
    """The default per-sample loss: cross-entropy with ``label_smoothing``."""

    def loss_fn(logits: Tensor, targets: Tensor, _indices: Tensor, _epoch: int) -> Tensor:
        return F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)

    return loss_fn

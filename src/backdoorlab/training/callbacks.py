"""Hooks into the training loop, and the recipe tricks written as them.

A :class:`Callback` is called at each epoch's start, after each optimiser step, with each batch's
per-sample losses and at each epoch's end. ``train`` runs the recipe's own callbacks (airbench94's
whitening-bias freeze and Lookahead averaging, built from the ``TrainConfig``) before the caller's,
so a caller's ``on_epoch_end`` sees the averaged weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Callback:
    """Observe training; override what you need (every hook does nothing by default)."""

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        """Before the first batch of each epoch (0-based)."""

    def on_step_end(self, step: int, steps: int, model: nn.Module) -> None:
        """After optimiser step ``step`` (1-based, counted over the run) of ``steps``."""

    def on_batch_end(self, indices: Tensor, losses: Tensor, epoch: int) -> None:
        """Per-sample losses (detached) of the samples at ``indices`` of the training set."""

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        """After each epoch (0-based)."""


class CallbackList(Callback):
    """Several callbacks called as one, in order, at every hook."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        for callback in self.callbacks:
            callback.on_epoch_start(epoch, model)

    def on_step_end(self, step: int, steps: int, model: nn.Module) -> None:
        for callback in self.callbacks:
            callback.on_step_end(step, steps, model)

    def on_batch_end(self, indices: Tensor, losses: Tensor, epoch: int) -> None:
        for callback in self.callbacks:
            callback.on_batch_end(indices, losses, epoch)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(epoch, model)


class Lookahead:
    """airbench94's weight averaging (after Lookahead, Zhang et al. 2019): every ``every`` steps the
    float state (weights and BN statistics) moves to an exponential average and is replaced by it."""

    def __init__(self, model: nn.Module, every: int = 5, decay_base: float = 0.95, decay_power: float = 3.0) -> None:
        self.state = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.average = [t.detach().clone() for t in self.state]
        self.every, self.base, self.power = every, decay_base**every, decay_power

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for average, current in zip(self.average, self.state, strict=True):
            average.lerp_(current, 1.0 - decay)
            current.copy_(average)

    def step(self, step: int, steps: int) -> None:
        """Called after optimiser step ``step`` (1-based) of ``steps``."""
        if step % self.every == 0:
            self.update(self.base * (step / steps) ** self.power)


class LookaheadAveraging(Callback):
    """``TrainConfig.lookahead_epoch``: :class:`Lookahead` from epoch ``start`` on, the average
    copied back into the weights after the last step, as airbench94 does (``legacy/airbench94.py``
    l.433-436; copying it back at every
    epoch's end would drop the steps since the last average, 12 of 480 on CIFAR-10)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.lookahead: Lookahead | None = None

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        if epoch >= self.start and self.lookahead is None:
            self.lookahead = Lookahead(model)

    def on_step_end(self, step: int, steps: int, model: nn.Module) -> None:
        if self.lookahead is not None:
            self.lookahead.step(step, steps)
            if step == steps:
                self.lookahead.update(1.0)


class FreezeWhiteningBias(Callback):
    """``TrainConfig.whiten_bias_epochs``: a whitening layer's bias (airbench's first layer) trains
    for the first ``epochs`` epochs and is frozen afterwards (airbench94: 3)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        bias = whitening_bias(model)
        if bias is not None:
            bias.requires_grad_(epoch < self.epochs)


def whitening_bias(model: nn.Module) -> Tensor | None:
    """The bias of the model's whitening layer (``model.body.whitening_bias``), if it has one."""
    return getattr(getattr(model, "body", None), "whitening_bias", None)

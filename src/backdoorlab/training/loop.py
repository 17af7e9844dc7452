"""One training loop over in-memory tensors, and batched inference.

The dataset lives on the training device as one uint8 tensor; a batch is an index slice, augmented
as a whole (``training.augment``), converted to float in [0, 1] and fed to the model, which
normalises internally. SGD with Nesterov momentum under a one-cycle or cosine schedule, optional
label smoothing; channels_last for images; bf16 autocast on CUDA. Seeded: on the CPU the same seed gives
the same weights.

Defenses hook in two ways, without copying the loop:

- ``loss_fn(logits, labels, indices, epoch) -> per-sample losses`` replaces the per-sample loss
  (ABL's loss floor, gradient ascent on isolated samples, ...); ``indices`` index the training set;
- ``callbacks`` see every batch's per-sample losses and the model at each epoch's end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.progress import make_progress
from backdoorlab.training.augment import jitter, random_crop, random_hflip, random_scaling
from backdoorlab.training.regularizers import Regularizer, create_regularizer

SCHEDULES = ("onecycle", "cosine", "constant")

#: ``loss_fn(logits, labels, indices, epoch) -> per-sample losses (B,)``
PerSampleLoss = Callable[[Tensor, Tensor, Tensor, int], Tensor]


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (stored with every result).

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step (the last, smaller batch of an epoch is kept).
        lr: peak learning rate (one-cycle) or initial learning rate (cosine, constant).
        momentum, nesterov, weight_decay: SGD settings.
        schedule: ``onecycle`` (linear warm-up to ``lr`` over ``warmup`` of the steps, then cosine
            decay; ``torch.optim.lr_scheduler.OneCycleLR``), ``cosine`` (cosine decay to 0) or
            ``constant``.
        warmup: share of steps spent warming up, for one-cycle.
        label_smoothing: cross-entropy label smoothing.
        crop_padding: random-crop translation in pixels (0 turns it off).
        flip: random horizontal flips; ``None`` uses the dataset's ``hflip``.
        jitter, scaling: time-series augmentation (``training.augment``): Gaussian noise of
            ``jitter`` times each series' std, and a random factor N(1, ``scaling``^2); 0 is off
            (the default: Wang et al. 2017 train their baselines without augmentation).
        amp: bf16 autocast on CUDA (ignored on the CPU).
        channels_last: channels-last memory format for image batches (faster on CUDA and, measured,
            by about 20% on a 2-core CPU for the conv nets here).
        data_init: run the model's data-dependent initialisation (airbench's whitening) first.
        progress: show a progress bar (also subject to ``BACKDOORLAB_PROGRESS``).
        regularizer: a defensive regulariser (``training.regularizers``: ``logit_squeezing``,
            ``manifold_mixup``, ``soft_nearest_neighbour``, ``contrastive``) or ``None``.
        regularizer_options: its options (``weight``, ``alpha``...).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.2
    label_smoothing: float = 0.0
    crop_padding: int = 0
    flip: bool | None = None
    jitter: float = 0.0
    scaling: float = 0.0
    amp: bool = True
    channels_last: bool = True
    data_init: bool = True
    progress: bool = True
    regularizer: str | None = None
    regularizer_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{self.schedule}'; valid: {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.jitter < 0 or self.scaling < 0:
            raise ValueError("jitter and scaling must be >= 0")
        if not 0.0 < self.warmup < 1.0:
            raise ValueError(f"warmup must be in (0, 1), got {self.warmup}")
        if self.regularizer is not None:
            create_regularizer(self.regularizer, **self.regularizer_options)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Callback:
    """Observe training; override what you need."""

    def on_batch_end(self, indices: Tensor, losses: Tensor, epoch: int) -> None:
        """Per-sample losses (detached) of the samples at ``indices`` of the training set."""

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        """After each epoch (0-based)."""


@dataclass
class TrainHistory:
    """Per-epoch training loss and accuracy (on the augmented training batches), and time."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None picks CUDA when available; otherwise the given device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for but CUDA is not available; use cpu or auto")
    return resolved


def _autocast(device: torch.device, enabled: bool):  # noqa: ANN202
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _memory_format(inputs: Tensor, channels_last: bool) -> torch.memory_format:
    """channels_last for image batches (measured faster on CUDA and on this project's 2-core CPU)."""
    return torch.channels_last if channels_last and inputs.dim() == 4 else torch.contiguous_format


def to_float(inputs: Tensor) -> Tensor:
    """uint8 images to float in [0, 1]; float inputs pass through."""
    return inputs.float().div_(255.0) if inputs.dtype == torch.uint8 else inputs.float()


def make_optimizer(
    model: nn.Module, config: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (Nesterov) over trainable parameters, with the configured per-step schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )
    # OneCycleLR divides by its warm-up length in steps minus one: a run of a handful of steps (one
    # epoch of a tiny UCR set) gets at least two warm-up steps, and under four steps no schedule.
    warmup = max(config.warmup, 2.0 / steps)
    if config.schedule == "onecycle" and steps >= 4:
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.lr,
            total_steps=steps,
            pct_start=min(warmup, 0.5),
            cycle_momentum=False,
            div_factor=10.0,
            final_div_factor=100.0,
        )
    elif config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


def train(
    model: nn.Module,
    data: TensorDataset,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device | None = "cpu",
    seed: int = 0,
    loss_fn: PerSampleLoss | None = None,
    callbacks: Sequence[Callback] = (),
    description: str = "training",
    step: Regularizer | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``data`` and return its history.

    ``step`` replaces the forward-and-loss of a batch (same signature as a regulariser:
    ``step(model, x, y, loss_fn, indices, epoch, generator) -> (logits, per-sample losses)``), for
    defenses that train extra heads in the same run (E2ABL)."""
    config = config or TrainConfig()
    config.validate()
    device = resolve_device(device)
    torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
    generator = torch.Generator().manual_seed(seed)
    inputs = data.inputs.to(device)
    memory_format = _memory_format(inputs, config.channels_last)
    model.to(device=device, memory_format=memory_format)

    labels = data.labels.to(device)
    flip = data.hflip if config.flip is None else config.flip
    if config.data_init and hasattr(model, "init_from_data"):
        model.init_from_data(to_float(inputs[: min(5000, len(inputs))]))
    if loss_fn is None:
        smoothing = config.label_smoothing

        def loss_fn(logits: Tensor, targets: Tensor, _idx: Tensor, _epoch: int) -> Tensor:
            return F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)

    if step is not None and config.regularizer is not None:
        raise ValueError("a custom training step and a regularizer cannot be combined")
    regularizer = step or (
        create_regularizer(config.regularizer, **config.regularizer_options)
        if config.regularizer is not None
        else None
    )
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    optimizer, scheduler = make_optimizer(model, config, steps_per_epoch * config.epochs)
    history = TrainHistory()
    model.train()
    start = time.perf_counter()
    with make_progress(config.progress) as progress:
        task = progress.add_task(description, total=steps_per_epoch * config.epochs, status="")
        for epoch in range(config.epochs):
            order = torch.randperm(len(data), generator=generator).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            for batch in order.split(config.batch_size):
                x = inputs[batch]
                if config.crop_padding:
                    x = random_crop(x, config.crop_padding, generator)
                if flip:
                    x = random_hflip(x, generator)
                x = to_float(x).contiguous(memory_format=memory_format)
                if config.jitter:
                    x = jitter(x, config.jitter, generator)
                if config.scaling:
                    x = random_scaling(x, config.scaling, generator)
                y = labels[batch]
                with _autocast(device, config.amp):
                    if regularizer is None:
                        logits = model(x)
                        losses = loss_fn(logits.float(), y, batch, epoch)
                    else:
                        logits, losses = regularizer(model, x, y, loss_fn, batch, epoch, generator)
                losses = losses.float()
                optimizer.zero_grad(set_to_none=True)
                losses.mean().backward()
                optimizer.step()
                scheduler.step()
                losses = losses.detach()
                loss_sum += losses.sum()
                correct += (logits.detach().argmax(1) == y).sum()
                for callback in callbacks:
                    callback.on_batch_end(batch, losses, epoch)
                progress.advance(task)
            history.loss.append(float(loss_sum) / len(data))
            history.accuracy.append(float(correct) / len(data))
            progress.update(
                task,
                status=f"epoch {epoch + 1}/{config.epochs} loss {history.loss[-1]:.3f} "
                f"acc {history.accuracy[-1]:.3f}",
            )
            for callback in callbacks:
                callback.on_epoch_end(epoch, model)
    history.seconds = time.perf_counter() - start
    history.samples_per_second = len(data) * config.epochs / history.seconds
    return history


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    inputs: Tensor,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = "cpu",
    amp: bool = True,
    channels_last: bool = True,
    pre_logits: bool = False,
) -> Tensor:
    """Float32 logits for ``inputs`` (uint8 images or float) on the CPU, in large batches, no
    gradients, no augmentation. The model is put in eval mode for the call and restored afterwards.
    ``pre_logits``: the pooled embedding the linear head reads instead (a :class:`Classifier`'s
    ``forward_head(..., pre_logits=True)``)."""
    device = resolve_device(device)
    memory_format = _memory_format(inputs, channels_last)
    was_training = model.training
    model.to(device=device, memory_format=memory_format).eval()
    out = []
    try:
        for chunk in inputs.split(batch_size):
            x = to_float(chunk.to(device)).contiguous(memory_format=memory_format)
            with _autocast(device, amp):
                y = model.forward_head(model.forward_features(x), pre_logits=True) if pre_logits else model(x)
                out.append(y.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def predict(model: nn.Module, inputs: Tensor, **options: object) -> Tensor:
    """Predicted labels for ``inputs``; options as :func:`predict_logits`."""
    if len(inputs) == 0:
        return torch.empty(0, dtype=torch.int64)
    return predict_logits(model, inputs, **options).argmax(1)  # type: ignore[arg-type]


def per_sample_loss(model: nn.Module, data: TensorDataset, **options: object) -> Tensor:
    """Cross-entropy of every sample of ``data`` under its (possibly poisoned) label, in eval mode
    without augmentation: the score loss-based isolation (ABL, PT) ranks samples by."""
    logits = predict_logits(model, data.inputs, **options)  # type: ignore[arg-type]
    return F.cross_entropy(logits, data.labels, reduction="none")

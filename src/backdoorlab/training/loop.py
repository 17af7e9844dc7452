"""One training loop over in-memory tensors, and batched inference.

The dataset lives on the training device as one uint8 tensor; a batch is an index slice, augmented
as a whole (``training.augment``), converted to float in [0, 1] and fed to the model, which
normalises internally. SGD with Nesterov momentum under a one-cycle or cosine schedule, optional
label smoothing; channels_last for images; bf16 autocast on CUDA. Seeded: on the CPU the same seed gives
the same weights.

Defenses hook in three ways, without copying the loop:

- ``loss_fn(logits, labels, indices, epoch) -> per-sample losses`` replaces the per-sample loss
  (ABL's loss floor, gradient ascent on isolated samples, ...); ``indices`` index the training set;
- ``step`` (a :class:`~backdoorlab.training.steps.TrainStep`) replaces the forward-and-loss of a
  batch; the configured regulariser is one;
- ``callbacks`` (``training.callbacks``) see each epoch's start and end, each optimiser step and
  every batch's per-sample losses. The recipe's Lookahead averaging and whitening-bias freeze are
  callbacks too, run before the caller's.

A non-finite loss (NaN or infinity) stops training with :class:`TrainingDivergedError`, whichever
defense drives the loop: a diverged model must never be evaluated as if it had learned something
(NaN logits argmax to class 0, which reads as a perfect backdoor against target 0).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.models.classifier import model_device
from backdoorlab.options import Fraction, check_fields
from backdoorlab.progress import make_progress
from backdoorlab.training.augment import (
    CROP_MODES,
    alternating_hflip,
    jitter,
    random_crop,
    random_hflip,
    random_scaling,
)
from backdoorlab.training.callbacks import (
    Callback,
    CallbackList,
    FreezeWhiteningBias,
    LookaheadAveraging,
    whitening_bias,
)
from backdoorlab.training.callbacks import Lookahead as Lookahead  # re-exported: it lived here
from backdoorlab.training.regularizers import create_regularizer
from backdoorlab.training.steps import PerSampleLoss, TrainStep, cross_entropy, plain_step

SCHEDULES = ("onecycle", "triangle", "cosine", "step", "constant")
#: airbench94's triangular schedule: the learning-rate factor starts at 0.2, rises linearly to 1 at
#: ``warmup`` of the steps and falls linearly to 0.07 at the end.
TRIANGLE_START, TRIANGLE_END = 0.2, 0.07


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (stored with every result).

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step.
        min_last_batch: skip each epoch's last batch when it is smaller than this share of
            ``batch_size``: 0 keeps every batch (a ``DataLoader``'s default), 1 drops any partial one
            (airbench94's training loader). A batch of a few samples at a high learning rate can wreck
            the model. A set smaller than one batch is always trained on.
        lr: peak learning rate (one-cycle) or initial learning rate (cosine, constant).
        momentum, nesterov, weight_decay: SGD settings.
        schedule: ``onecycle`` (linear warm-up to ``lr`` over ``warmup`` of the steps, then cosine
            decay; ``torch.optim.lr_scheduler.OneCycleLR``), ``triangle`` (airbench94's: linear from
            0.2 x ``lr`` to ``lr`` at ``warmup`` of the steps, then linear to 0.07 x ``lr``),
            ``cosine`` (cosine decay to 0), ``step`` (``lr`` divided by 10 at each epoch in
            ``milestones``; ``torch.optim.lr_scheduler.MultiStepLR``) or ``constant``.
        milestones: the epochs at which the ``step`` schedule divides the rate by 10.
        warmup: share of steps spent warming up, for one-cycle and triangle.
        norm_lr_scale: learning-rate multiplier for the parameters of normalisation layers
            (airbench94's ``bias_scaler``, 64); their weight decay is divided by it, so the decay
            per step stays that of the other parameters.
        lookahead_epoch: from this epoch on, airbench94's Lookahead-style averaging: every 5 steps
            the weights (and BN statistics) move to an exponential average whose decay rises as
            0.95^5 x (step / steps)^3, and the average is copied back after the last step; ``None``
            is off.
        whiten_bias_epochs: freeze a whitening layer's bias (airbench's first layer) after this many
            epochs (airbench94: 3); ``None`` keeps it trainable.
        label_smoothing: cross-entropy label smoothing.
        crop_padding: random-crop translation in pixels (0 turns it off).
        crop_mode: what fills the border a translation opens: ``zeros`` (torchvision's default) or
            ``reflect`` (airbench94).
        flip: random horizontal flips; ``None`` uses the dataset's ``hflip``.
        alternating_flip: airbench's derandomised flip (Jordan 2024, section 3.6): each image is
            flipped at random in the first epoch and the opposite way in the next, alternating; only
            where flips are on.
        jitter, scaling: time-series augmentation (``training.augment``): Gaussian noise of
            ``jitter`` times each series' std, and a random factor N(1, ``scaling``^2); 0 is off
            (the default: Wang et al. 2017 train their baselines without augmentation).
        amp: bf16 autocast on CUDA (ignored on the CPU).
        channels_last: channels-last memory format for image batches (faster on CUDA and, measured,
            by about 20% on a 2-core CPU for the conv nets here).
        data_init: run the model's data-dependent initialisation (airbench's whitening) first.
        progress: show a progress bar (also subject to ``BACKDOORLAB_PROGRESS``).
        tta: test-time augmentation of the run's final evaluation (``training.loop.predict_logits``):
            0 none, 1 the mean of the image and its mirror (where flips are on), 2 also one-pixel
            translations, as airbench94's ``tta_level``. Not used inside defenses.
        regularizer: a defensive regulariser (``training.regularizers``: ``logit_squeezing``,
            ``manifold_mixup``, ``soft_nearest_neighbour``, ``contrastive``) or ``None``.
        regularizer_options: its options (``weight``, ``alpha``...).
    """

    epochs: int = 10
    batch_size: int = 128
    min_last_batch: Fraction = 0.0
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    milestones: list[int] = field(default_factory=list)
    warmup: float = 0.2
    norm_lr_scale: float = 1.0
    lookahead_epoch: int | None = None
    whiten_bias_epochs: int | None = None
    label_smoothing: float = 0.0
    crop_padding: int = 0
    crop_mode: str = "zeros"
    flip: bool | None = None
    alternating_flip: bool = False
    jitter: float = 0.0
    scaling: float = 0.0
    amp: bool = True
    channels_last: bool = True
    data_init: bool = True
    progress: bool = True
    tta: int = 0
    regularizer: str | None = None
    regularizer_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every field's type (converting an int given for a float) and range."""
        check_fields(self, "train field")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{self.schedule}'; valid: {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.schedule == "step" and (not self.milestones or any(not 0 < m < self.epochs for m in self.milestones)):
            raise ValueError(
                f"the step schedule needs milestones between 1 and epochs - 1 ({self.epochs - 1}), got {list(self.milestones)}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"unknown crop_mode '{self.crop_mode}'; valid: {', '.join(CROP_MODES)}")
        if self.jitter < 0 or self.scaling < 0:
            raise ValueError("jitter and scaling must be >= 0")
        if not 0.0 < self.warmup < 1.0:
            raise ValueError(f"warmup must be in (0, 1), got {self.warmup}")
        if self.norm_lr_scale <= 0:
            raise ValueError(f"norm_lr_scale must be > 0, got {self.norm_lr_scale}")
        if self.tta not in (0, 1, 2):
            raise ValueError(f"tta must be 0 (none), 1 (mirror) or 2 (mirror and translate), got {self.tta}")
        if self.regularizer is not None:
            create_regularizer(self.regularizer, **self.regularizer_options)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class NonFiniteError(ValueError):
    """A loss, a weight or a score that is NaN or infinite where a number was needed."""


class TrainingDivergedError(NonFiniteError):
    """Training diverged: a non-finite loss, or non-finite weights after the last step. The message
    names the training, the epoch and step (1-based) and the learning rate, and suggests a lower one."""


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` that hold a NaN or an infinity."""
    return [
        name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def _diverged(description: str, config: TrainConfig, where: str, what: str) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"training ({description}) diverged: {what} {where} (learning rate {config.lr:g}, {config.schedule} schedule); "
        "lower the learning rate (run --lr, or the defense's -d lr=...)"
    )


class FiniteLossGuard:
    """Stops training on a non-finite batch loss with :class:`TrainingDivergedError`.

    ``at_once`` (default: on the CPU, where reading the loss costs nothing) raises at the batch
    itself; otherwise the first non-finite step of an epoch is recorded on the device and raised at
    the epoch's end, so that a CUDA loop keeps no per-step host synchronisation."""

    def __init__(
        self,
        description: str,
        config: TrainConfig,
        steps_per_epoch: int,
        device: torch.device,
        at_once: bool | None = None,
    ) -> None:
        self.description, self.config, self.steps_per_epoch, self.device = description, config, steps_per_epoch, device
        self.at_once = device.type == "cpu" if at_once is None else at_once
        self.first = torch.full((), -1, device=device, dtype=torch.int64)

    def _where(self, epoch: int, step: int) -> str:
        return f"at epoch {epoch + 1}/{self.config.epochs}, step {step + 1}/{self.steps_per_epoch}"

    def batch(self, loss: Tensor, epoch: int, step: int) -> None:
        """After the loss of step ``step`` (0-based, within ``epoch``) is computed."""
        loss = loss.detach()
        if self.at_once:
            if not bool(torch.isfinite(loss)):
                raise _diverged(
                    self.description, self.config, self._where(epoch, step), f"the training loss is {float(loss)}"
                )
        else:
            self.first = torch.where((self.first < 0) & ~torch.isfinite(loss), step, self.first)

    def epoch_end(self, epoch: int) -> None:
        """At the end of ``epoch``, before its callbacks see the model."""
        if not self.at_once and int(self.first) >= 0:
            what = "the training loss became non-finite (NaN or infinity)"
            raise _diverged(self.description, self.config, self._where(epoch, int(self.first)), what)
        self.first.fill_(-1)

    def finish(self, model: nn.Module) -> None:
        """After the last step: the weights must be finite too."""
        broken = nonfinite_tensors(model)
        if broken:
            shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
            where = f"after the last step of epoch {self.config.epochs}"
            raise _diverged(self.description, self.config, where, f"the weights are NaN or infinite ({shown})")


@dataclass
class TrainHistory:
    """Per-epoch training loss and accuracy (on the augmented training batches), and time."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0


def parse_device(device: str | torch.device | None = None) -> torch.device | None:
    """The device ``device`` names (``None`` for ``"auto"``/None), without asking whether this
    machine has it; a name torch does not know is a ``ValueError``."""
    if device is None or str(device) == "auto":
        return None
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from err


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None picks CUDA when available; otherwise the given device, refused where this
    machine does not have it."""
    resolved = parse_device(device)
    if resolved is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for but CUDA is not available; use cpu or auto")
    return resolved


def flush_denormals() -> None:
    """Flush denormal floats to zero on the CPU for this process, as TensorFlow does by default:
    weights and activations that decay towards zero turn denormal (below 1.2e-38) and make CPU
    arithmetic many times slower (BppAttack's one-bit digits: 20 epochs in 178 s with denormals,
    4 s without, to the same CA and ASR). The command line and sweep workers call it before any
    work; it must come before torch starts its CPU threads, which copy the setting of the thread
    that creates them. A library user opts in by calling it first; it is process-wide, which is
    why importing backdoorlab does not do it (Hypothesis, for one, refuses to run under it)."""
    torch.set_flush_denormal(True)


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


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))


def make_optimizer(
    model: nn.Module, config: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (Nesterov) over trainable parameters, with the configured per-step schedule.

    Normalisation-layer parameters form their own group when ``norm_lr_scale`` is not 1."""
    norm_ids = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params}]
    if config.norm_lr_scale != 1.0 and any(id(p) in norm_ids for p in params):
        groups = [
            {"params": [p for p in params if id(p) not in norm_ids]},
            {
                "params": [p for p in params if id(p) in norm_ids],
                "lr": config.lr * config.norm_lr_scale,
                "weight_decay": config.weight_decay / config.norm_lr_scale,
            },
        ]
        groups = [group for group in groups if group["params"]]
    optimizer = torch.optim.SGD(
        groups,
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
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=steps,
            pct_start=min(warmup, 0.5),
            cycle_momentum=False,
            div_factor=10.0,
            final_div_factor=100.0,
        )
    elif config.schedule == "triangle":
        peak = max(1, round(config.warmup * steps))

        def triangle(step: int) -> float:
            if step < peak:
                return TRIANGLE_START + (1.0 - TRIANGLE_START) * step / peak
            return 1.0 + (TRIANGLE_END - 1.0) * (step - peak) / max(1, steps - peak)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, triangle)
    elif config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    elif config.schedule == "step":  # the scheduler steps per batch: epochs become steps
        per_epoch = steps // config.epochs
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [m * per_epoch for m in sorted(config.milestones)], gamma=0.1
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


class BatchAugmentation:
    """The configured augmentation of a training batch, built once per run: crop, flip (airbench's
    alternating flip or a random one), conversion to float in the model's memory format, then jitter
    and scaling for series. Its draws come from the run's ``generator``, in that order."""

    def __init__(
        self, config: TrainConfig, data: TensorDataset, generator: torch.Generator, device: torch.device
    ) -> None:
        self.config, self.generator = config, generator
        self.memory_format = _memory_format(data.inputs, config.channels_last)
        self.flip = data.hflip if config.flip is None else config.flip
        self.first_flips = (
            (torch.rand(len(data), generator=generator) < 0.5).to(device)
            if self.flip and config.alternating_flip
            else None
        )

    def __call__(self, x: Tensor, indices: Tensor, epoch: int) -> Tensor:
        """The model input for the samples at ``indices`` of the training set, ``x`` as stored."""
        config, generator = self.config, self.generator
        if config.crop_padding:
            x = random_crop(x, config.crop_padding, generator, config.crop_mode)
        if self.first_flips is not None:
            x = alternating_hflip(x, self.first_flips[indices], epoch)
        elif self.flip:
            x = random_hflip(x, generator)
        x = to_float(x).contiguous(memory_format=self.memory_format)
        if config.jitter:
            x = jitter(x, config.jitter, generator)
        if config.scaling:
            x = random_scaling(x, config.scaling, generator)
        return x


def train_step(config: TrainConfig, step: TrainStep | None = None) -> TrainStep:
    """The run's step: ``step`` if given, else the configured regulariser, else :func:`plain_step`."""
    if step is not None and config.regularizer is not None:
        raise ValueError("a custom training step and a regularizer cannot be combined")
    if step is not None:
        return step
    if config.regularizer is not None:
        return create_regularizer(config.regularizer, **config.regularizer_options)
    return plain_step


def recipe_callbacks(config: TrainConfig, model: nn.Module) -> list[Callback]:
    """The callbacks the recipe asks for: the whitening-bias freeze (where the model has one), then
    Lookahead averaging."""
    found: list[Callback] = []
    if config.whiten_bias_epochs is not None and whitening_bias(model) is not None:
        found.append(FreezeWhiteningBias(config.whiten_bias_epochs))
    if config.lookahead_epoch is not None:
        found.append(LookaheadAveraging(config.lookahead_epoch))
    return found


def _place(model: nn.Module, data: TensorDataset, config: TrainConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """Move the data and the model to ``device`` (channels_last for images where configured) and run
    the model's data-dependent initialisation (airbench's whitening) where configured; returns the
    inputs and labels on the device."""
    inputs = data.inputs.to(device)
    model.to(device=device, memory_format=_memory_format(inputs, config.channels_last))
    if config.data_init and hasattr(model, "init_from_data"):
        model.init_from_data(to_float(data_init_sample(inputs)))
    return inputs, data.labels.to(device)


#: Images a data-dependent initialisation sees (airbench94's whitening: 5,000).
DATA_INIT_SAMPLES = 5000


def data_init_sample(inputs: Tensor, samples: int = DATA_INIT_SAMPLES) -> Tensor:
    """``samples`` images spread evenly over ``inputs``, for a data-dependent initialisation.

    airbench94 (KellerJordan/cifar10-airbench, ``legacy/airbench94.py`` l.402) whitens with the first
    5,000 images of CIFAR-10's training set, which is in random class order; a set stored sorted by
    label (the shared CIFAR-10 and GTSRB parquet files) would give first images of one or two
    classes (4,959 airplanes), so the filters are set from images spread over the whole set instead:
    deterministic, and drawing nothing from the seeded generators."""
    if len(inputs) <= samples:
        return inputs
    return inputs[torch.linspace(0, len(inputs) - 1, samples, device=inputs.device).long()]


def steps_in_epoch(samples: int, config: TrainConfig) -> int:
    """Optimiser steps an epoch over ``samples`` takes: one per batch, less a last batch smaller
    than ``min_last_batch`` of a batch (but at least one)."""
    full, last = divmod(samples, config.batch_size)
    keep_last = last > 0 and (full == 0 or last >= config.min_last_batch * config.batch_size)
    return full + keep_last


def train(
    model: nn.Module,
    data: TensorDataset,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device | None = "auto",
    seed: int = 0,
    loss_fn: PerSampleLoss | None = None,
    callbacks: Sequence[Callback] = (),
    description: str = "training",
    step: TrainStep | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``data`` and return its history.

    ``step`` replaces each batch's forward-and-loss (a :class:`TrainStep`; E2ABL's trains extra
    heads), in place of ``config.regularizer``. ``optimizer``, where given, is one the caller built
    over ``model``'s parameters (DBD's Adam) and steps at its own rate, unscheduled; the config's
    ``lr``, ``momentum``, ``weight_decay`` and ``schedule`` are then unused, and its state carries
    over from call to call. A non-finite batch loss raises
    :class:`TrainingDivergedError` (on the CPU at once; on CUDA at its epoch's end, naming the first
    such step, so the loop keeps no per-step host synchronisation), as do non-finite final weights."""
    config = config or TrainConfig()
    config.validate()
    device = resolve_device(device)
    torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = _place(model, data, config, device)
    loss_fn, step = loss_fn or cross_entropy(config.label_smoothing), train_step(config, step)
    augment = BatchAugmentation(config, data, generator, device)
    steps_per_epoch = steps_in_epoch(len(data), config)
    seen = min(len(data), steps_per_epoch * config.batch_size)  # the samples an epoch trains on
    total_steps = steps_per_epoch * config.epochs
    if optimizer is None:
        optimizer, scheduler = make_optimizer(model, config, total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    hooks = CallbackList([*recipe_callbacks(config, model), *callbacks])  # the recipe's run first
    guard = FiniteLossGuard(description, config, steps_per_epoch, device)
    history = TrainHistory()
    model.train()
    start, done = time.perf_counter(), 0
    with make_progress(config.progress) as progress:
        task = progress.add_task(description, total=total_steps, status="")
        for epoch in range(config.epochs):
            hooks.on_epoch_start(epoch, model)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            order = torch.randperm(len(data), generator=generator).to(device)
            for step_in_epoch, batch in enumerate(order.split(config.batch_size)[:steps_per_epoch]):
                x, y = augment(inputs[batch], batch, epoch), labels[batch]
                with _autocast(device, config.amp):
                    logits, losses = step(model, x, y, loss_fn, batch, epoch, generator)
                losses = losses.float()
                loss = losses.mean()
                guard.batch(loss, epoch, step_in_epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                done += 1
                losses = losses.detach()
                loss_sum += losses.sum()
                correct += (logits.detach().argmax(1) == y).sum()
                hooks.on_step_end(done, total_steps, model)
                hooks.on_batch_end(batch, losses, epoch)
                progress.advance(task)
            guard.epoch_end(epoch)
            history.loss.append(float(loss_sum) / seen)
            history.accuracy.append(float(correct) / seen)
            status = f"epoch {epoch + 1}/{config.epochs} loss {history.loss[-1]:.3f} acc {history.accuracy[-1]:.3f}"
            progress.update(task, status=status)
            hooks.on_epoch_end(epoch, model)
    history.seconds = time.perf_counter() - start
    guard.finish(model)
    history.samples_per_second = seen * config.epochs / history.seconds
    return history


#: Inference batch sizes by device type: large batches fill a GPU; on a CPU, batches of 128 stay in
#: cache and predicted 2,000 MNIST images 3x faster than batches of 1,024 with the small CNN and 1.5x
#: with airbench (CIFAR-10 airbench 1.6x; 64 was no faster; measured 2026-12-06 on the 2-core CPU).
INFERENCE_BATCH = {"cuda": 1024, "cpu": 128}


def inference_batch_size(device: torch.device) -> int:
    """The default batch for predictions on ``device`` (:data:`INFERENCE_BATCH`; 1,024 elsewhere)."""
    return INFERENCE_BATCH.get(device.type, 1024)


def predict_logits(
    model: nn.Module,
    inputs: Tensor,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = True,
    channels_last: bool = True,
    pre_logits: bool = False,
    tta: int = 0,
) -> Tensor:
    """Float32 logits for ``inputs`` (uint8 images or float) on the CPU, in batches of
    ``batch_size`` (``None``: :func:`inference_batch_size` for the device), no gradients, on
    ``device`` (``None``: where the model is; ``"auto"``: CUDA where available; the model is moved
    there). The model is put in eval mode for the call and restored afterwards.
    ``pre_logits``: the pooled embedding the linear head reads instead (a :class:`Classifier`'s
    ``forward_head(..., pre_logits=True)``). ``tta``: test-time augmentation of images
    (:func:`tta_logits`; 0 is none)."""
    device = model_device(model) if device is None else resolve_device(device)
    batch_size = batch_size or inference_batch_size(device)
    memory_format = _memory_format(inputs, channels_last)
    was_training = model.training
    # Outside inference mode: a parameter converted inside it would become an inference tensor,
    # and training the model afterwards would fail.
    model.to(device=device, memory_format=memory_format).eval()
    out = []
    try:
        with torch.inference_mode():
            for chunk in inputs.split(batch_size):
                x = to_float(chunk.to(device)).contiguous(memory_format=memory_format)
                with _autocast(device, amp):
                    if pre_logits:
                        y = model.forward_head(model.forward_features(x), pre_logits=True)
                    else:
                        y = tta_logits(model, x, tta) if tta else model(x)
                    out.append(y.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def tta_logits(model: nn.Module, x: Tensor, level: int) -> Tensor:
    """airbench94's test-time augmentation (Jordan 2024, section 3.7) of a float image batch: level 1
    averages the logits of each image and its mirror; level 2 gives that weight 1/2 and splits the
    other 1/2 between the mirror-averaged logits of the image shifted one pixel up-left and one
    pixel down-right (reflect padding)."""
    if x.dim() != 4:
        raise ValueError("test-time augmentation (tta) is for images (N, C, H, W)")

    def mirrored(batch: Tensor) -> Tensor:
        return 0.5 * (model(batch) + model(batch.flip(-1)))

    logits = mirrored(x)
    if level < 2:
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    up_left, down_right = (padded[:, :, i : i + h, i : i + w].contiguous(memory_format=layout) for i in (0, 2))
    return 0.5 * logits + 0.25 * (mirrored(up_left) + mirrored(down_right))


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

"""Named training recipes: a model, its options and a training schedule for each dataset.

A recipe is what a run trains with when its config leaves the model and the schedule open
(``RunConfig.recipe``, ``backdoorlab run --recipe NAME``, ``recipe:`` in a grid). Three are
registered; docs/benchmarks.md, "Training recipes", has each piece and the measurements.

- ``fast`` (the default): airbench94 (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
  ``KellerJordan/cifar10-airbench``, ``airbench94.py``) for 32x32 colour images, with its training
  recipe as the official code has it (SGD Nesterov 0.85, batch 1024, its lr and weight decay
  restated for the mean loss: 1.5 and 1.33e-3; 64x the rate for BatchNorm biases; the triangular
  schedule; label smoothing 0.2; the whitening layer's bias frozen after 3 epochs; Lookahead from
  epoch 3; alternating flip, 2 px reflect translation; test-time augmentation). Epochs and width
  per dataset meet the 2-core-CPU budgets of docs/benchmarks.md. MNIST uses the same network with
  one input channel and no flips (digits are not mirror-symmetric); sklearn's 8x8 digits keep the
  small CNN; time series keep FCN (Wang et al. 2017). Reconstructed: an epoch's last batch is
  skipped when under half a batch (airbench94 skips any partial one; a 4-image one collapsed a run).
- ``quick``: the previous defaults, minutes on a CPU at lower accuracy (airbench width 32 with a
  one-cycle schedule, 3-4 epochs, for CIFAR-10 and GTSRB; the small CNN for MNIST): for smoke runs,
  tests and CPU grids. docs tables made before the recipes existed used it.
- ``backdoorbench``: BackdoorBench's protocol (Wu et al., NeurIPS 2022 Datasets and Benchmarks;
  ``SCLBD/BackdoorBench``, ``config/attack/prototype/cifar10.yaml``): PreAct-ResNet18, 100 epochs,
  batch 128, SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine annealing, random crop with
  padding 4 and flips, no label smoothing, no test-time augmentation. Images only.

**Step budget** (reconstructed: our rule, not a source's). A ``train_size`` subsample of MNIST,
CIFAR-10 or GTSRB under ``fast`` trains ``min(4 x E, max(E, round(E x full / subset)))`` epochs
(``E`` the recipe's), about the full run's steps, with the schedule's epoch-indexed parts stretched
alike; explicit epochs, ``backdoorbench``, ``quick``, digits and series are never scaled. The run
prints the choice (docs/benchmarks.md, "Subsets: the step budget").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from backdoorlab.data.sources import dataset_modality
from backdoorlab.registry import Registry
from backdoorlab.training.loop import TrainConfig

#: The full training sets ``fast`` sets its epochs for: the reference of its step budget.
FULL_TRAIN_SIZES = {"mnist": 60_000, "cifar10": 50_000, "gtsrb": 39_209}
#: The step budget's cap: a subset trains at most this many times the recipe's epochs (reconstructed).
MAX_EPOCH_SCALE = 4


@dataclass(frozen=True)
class Recipe:
    """A dataset's model (with options) and training schedule under one named recipe.

    ``full_size``: the training-set size the schedule's epochs are set for; a smaller subset trains
    more epochs under the step budget (module docstring), up to ``max_epoch_scale`` times the
    recipe's. ``None``: the epochs are fixed whatever the size.

    ``fallback``: the dataset whose settings these are, where the recipe has none for the one asked
    (a set the toolkit does not know: ``parquet:PATH``, a user's own); a run then warns
    (:func:`fallback_warning`)."""

    model: str
    model_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    full_size: int | None = None
    max_epoch_scale: int = MAX_EPOCH_SCALE
    fallback: str | None = None

    def epochs_for(self, size: int) -> int:
        """The epochs for a training set of ``size`` samples (before the trusted split): about the
        full set's number of steps, at least the recipe's epochs and at most ``max_epoch_scale`` x."""
        epochs = self.train.epochs
        if self.full_size is None or size >= self.full_size:
            return epochs
        return max(epochs, min(self.max_epoch_scale * epochs, round(epochs * self.full_size / size)))


@dataclass(frozen=True)
class StepBudget:
    """What the step budget chose for a subsampled run: its training images (before the trusted
    split) of the recipe's full set, and the epochs before and after."""

    recipe: str
    images: int
    full_images: int
    recipe_epochs: int
    epochs: int
    max_scale: int

    def note(self) -> str:
        """The line a run prints about the choice."""
        return (
            f"recipe {self.recipe}: {self.images:,} of {self.full_images:,} training images, "
            f"epochs {self.recipe_epochs} -> {self.epochs} (step budget, cap {self.max_scale}x; --epochs fixes them)"
        )


def step_budget(name: str, dataset: str, train_size: float | int | None) -> StepBudget | None:
    """The step budget's choice for recipe ``name`` on ``dataset`` subsampled to ``train_size`` (a
    fraction of the full set or a count), or ``None`` where it leaves the recipe's epochs as they are
    (no subsample, a recipe or dataset without a budget, a subset too close to the full set)."""
    recipe = RECIPES.get(name)(dataset)
    if train_size is None or recipe.full_size is None:
        return None
    images = train_size if isinstance(train_size, int) else round(train_size * recipe.full_size)
    epochs = recipe.epochs_for(images)
    if epochs == recipe.train.epochs:
        return None
    return StepBudget(name, images, recipe.full_size, recipe.train.epochs, epochs, recipe.max_epoch_scale)


def stretch_schedule(train: TrainConfig, epochs: int) -> TrainConfig:
    """``train`` for ``epochs`` epochs, its epoch-indexed parts (``lookahead_epoch``,
    ``whiten_bias_epochs``, ``milestones``) stretched by the same factor, so that the longer run
    keeps the shape of the schedule in steps."""
    factor = epochs / train.epochs

    def stretched(epoch: int | None) -> int | None:
        return None if epoch is None else round(epoch * factor)

    return replace(
        train,
        epochs=epochs,
        lookahead_epoch=stretched(train.lookahead_epoch),
        whiten_bias_epochs=stretched(train.whiten_bias_epochs),
        milestones=[round(m * factor) for m in train.milestones],
    )


#: name -> ``function(dataset) -> Recipe``
RECIPES: Registry[Callable[[str], Recipe]] = Registry("recipe")

#: airbench94's optimiser, schedule and tricks (see the module docstring), for batch 1024.
AIRBENCH_TRAIN = TrainConfig(
    epochs=10,
    batch_size=1024,
    # airbench94's loader drops every partial last batch; half a batch or more is kept here
    # (reconstructed: the measured training-time defense tables end their epochs in 67% batches)
    min_last_batch=0.5,
    lr=1.5,
    momentum=0.85,
    nesterov=True,
    weight_decay=0.0153 / 11.5,
    schedule="triangle",
    warmup=0.23,
    norm_lr_scale=64.0,
    label_smoothing=0.2,
    crop_padding=2,
    crop_mode="reflect",
    alternating_flip=True,
    lookahead_epoch=3,
    whiten_bias_epochs=3,
    tta=2,
)

#: Time series, every recipe: FCN (Wang et al. 2017), no augmentation. The reference trains FCN
#: with Adam for 2000 epochs at batch 16; a one-cycle SGD schedule of 100 epochs reaches its accuracy
#: on the sets of docs/time_series.md in seconds on a CPU.
SERIES_RECIPE = Recipe("fcn", {}, TrainConfig(epochs=100, batch_size=16, lr=0.01))
#: sklearn's 8x8 digits, every recipe but backdoorbench: the small CNN trains in seconds.
DIGITS_RECIPE = Recipe("small_cnn", {}, TrainConfig(epochs=20, batch_size=64, lr=0.05))


def _series_or_digits(dataset: str) -> Recipe | None:
    """The recipe ``fast`` and ``quick`` share for time series and sklearn's digits, else ``None``."""
    if dataset_modality(dataset) == "series":
        return SERIES_RECIPE
    return DIGITS_RECIPE if dataset == "digits" else None


@RECIPES.register("fast", "airbench94's recipe, epochs and width set for a 2-core CPU (the default)")
def fast(dataset: str) -> Recipe:
    shared = _series_or_digits(dataset)
    if shared is not None:
        return shared
    full_size = FULL_TRAIN_SIZES.get(dataset)
    if dataset == "mnist":
        # Width 24, 2 epochs, float32: at width 16 (3 epochs) and width 8 training was unstable, and
        # under bf16 autocast widths 8-16 diverged (CA 0.11); measured in docs/benchmarks.md.
        train = replace(AIRBENCH_TRAIN, epochs=2, flip=False, tta=0, amp=False)
        return Recipe("airbench", {"width": 24}, train, full_size)
    if dataset == "gtsrb":
        # No flips (signs are not mirror-symmetric), so no mirrored test-time views either.
        return Recipe("airbench", {"width": 32}, replace(AIRBENCH_TRAIN, epochs=4, flip=False, tta=0), full_size)
    return Recipe("airbench", {"width": 32}, replace(AIRBENCH_TRAIN, epochs=16), full_size, fallback=_fallback(dataset))


def _fallback(dataset: str) -> str | None:
    """``"cifar10"`` where ``fast`` or ``quick`` lends CIFAR-10's settings to a set it has none for."""
    return None if dataset == "cifar10" else "cifar10"


@RECIPES.register("quick", "minutes on a CPU: airbench width 32 one-cycle / small CNN (earlier defaults)")
def quick(dataset: str) -> Recipe:
    shared = _series_or_digits(dataset)
    if shared is not None:
        return shared
    # No step budget: quick is for smoke runs and tests, where a subset should stay quick.
    if dataset == "mnist":
        return Recipe("small_cnn", {}, TrainConfig(epochs=4, batch_size=128, lr=0.05))
    # airbench94's augmentation (translate 2, flip where it keeps the label) and label smoothing 0.2.
    epochs = 3 if dataset == "gtsrb" else 4
    return Recipe(
        "airbench",
        {"width": 32},
        TrainConfig(epochs=epochs, batch_size=256, lr=0.2, label_smoothing=0.2, crop_padding=2),
        fallback=None if dataset == "gtsrb" else _fallback(dataset),
    )


@RECIPES.register("backdoorbench", "BackdoorBench's protocol: PreAct-ResNet18, 100 epochs, SGD 0.01, cosine")
def backdoorbench(dataset: str) -> Recipe:
    if dataset_modality(dataset) == "series":
        raise ValueError(
            f"recipe 'backdoorbench' is for images (BackdoorBench has no time series); "
            f"{dataset} is a time-series set: use 'fast' or 'quick'"
        )
    # No step budget: BackdoorBench trains 100 epochs whatever the training set's size.
    return Recipe(
        "preact_resnet18",
        {},
        TrainConfig(
            epochs=100,
            batch_size=128,
            lr=0.01,
            momentum=0.9,
            nesterov=False,
            weight_decay=5e-4,
            schedule="cosine",
            crop_padding=4,
            data_init=False,
        ),
    )


DEFAULT_RECIPE = "fast"


def fallback_warning(name: str, dataset: str, subject: str = "model") -> str | None:
    """The warning for a model trained under recipe ``name`` on ``dataset`` where the recipe has no
    settings of its own for it and lent another set's (``Recipe.fallback``), else ``None``. It
    starts with ``subject`` (``model``, ``suspect model``), as the run's health warnings do."""
    recipe = RECIPES.get(name)(dataset)
    if recipe.fallback is None:
        return None
    train = recipe.train
    return (
        f"{subject}: recipe '{name}' has no settings for dataset '{dataset}': what the config leaves open "
        f"(model, schedule, augmentation) is {recipe.fallback}'s ({recipe.model}, {train.epochs} epochs, "
        f"batch {train.batch_size}, lr {train.lr:g}); check the clean accuracy, or set them "
        "(--model, --epochs, --batch-size, --lr, --set train.*)"
    )


def recipe_for(name: str, dataset: str) -> Recipe:
    """The recipe ``name`` for ``dataset`` (a fresh copy: callers may change its schedule)."""
    recipe = RECIPES.get(name)(dataset)
    return replace(recipe, model_options=dict(recipe.model_options), train=replace(recipe.train))

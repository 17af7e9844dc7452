"""Named training recipes: a model, its options and a training schedule for each dataset.

A recipe is what a run trains with when its config leaves the model and the schedule open
(``RunConfig.recipe``, ``backdoorlab run --recipe NAME``, ``recipe:`` in a grid). Three are
registered; docs/benchmarks.md has their measured accuracy, backdoor figures and times.

- ``fast`` (the default): airbench94 (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
  ``KellerJordan/cifar10-airbench``, ``airbench94.py``) for 32x32 colour images, with its training
  recipe as the official code has it: SGD with Nesterov momentum 0.85, batch 1024, learning rate
  11.5 and weight decay 0.0153 per 1024 examples (with the code's summed loss; here the same steps
  for the mean loss: lr 1.5, weight decay 1.33e-3), 64x the learning rate for BatchNorm biases
  (decay per step unchanged), the triangular schedule (0.2 -> 1 at 23% -> 0.07), label smoothing
  0.2, whitening first layer initialised from 5,000 training images with its bias frozen after
  3 epochs, Lookahead-style weight averaging from epoch 3, alternating flip, translation by 2 pixels (reflect padding),
  and test-time augmentation (mirror + one-pixel translations) in the final evaluation. The number
  of epochs and the width are chosen per dataset to meet the 2-core-CPU time budgets of
  docs/benchmarks.md. MNIST uses the same recipe on the same network with one input channel and no
  flips (digits are not mirror-symmetric); sklearn's 8x8 digits keep the small CNN; time series
  keep FCN (Wang et al. 2017).
- ``quick``: the previous defaults, minutes on a CPU at lower accuracy (airbench width 32 with a
  one-cycle schedule, 3-4 epochs, for CIFAR-10 and GTSRB; the small CNN for MNIST): for smoke runs,
  tests and CPU grids. docs tables made before the recipes existed used it.
- ``backdoorbench``: BackdoorBench's protocol (Wu et al., NeurIPS 2022 Datasets and Benchmarks;
  ``SCLBD/BackdoorBench``, ``config/attack/prototype/cifar10.yaml``): PreAct-ResNet18, 100 epochs,
  batch 128, SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine annealing, random crop with
  padding 4 and flips, no label smoothing, no test-time augmentation. Images only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from backdoorlab.data.sources import dataset_modality
from backdoorlab.registry import Registry
from backdoorlab.training.loop import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """A dataset's model (with options) and training schedule under one named recipe."""

    model: str
    model_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


#: name -> ``function(dataset) -> Recipe``
RECIPES: Registry[Callable[[str], Recipe]] = Registry("recipe")

#: airbench94's optimiser, schedule and tricks (see the module docstring), for batch 1024.
AIRBENCH_TRAIN = TrainConfig(
    epochs=10,
    batch_size=1024,
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
    if dataset == "mnist":
        # Width 24, 2 epochs, float32: at width 16 (3 epochs) and width 8 training was unstable, and
        # under bf16 autocast widths 8-16 diverged (CA 0.11); measured in docs/benchmarks.md.
        return Recipe("airbench", {"width": 24}, replace(AIRBENCH_TRAIN, epochs=2, flip=False, tta=0, amp=False))
    if dataset == "gtsrb":
        # No flips (signs are not mirror-symmetric), so no mirrored test-time views either.
        return Recipe("airbench", {"width": 32}, replace(AIRBENCH_TRAIN, epochs=4, flip=False, tta=0))
    return Recipe("airbench", {"width": 32}, replace(AIRBENCH_TRAIN, epochs=16))


@RECIPES.register("quick", "minutes on a CPU: airbench width 32 one-cycle / small CNN (earlier defaults)")
def quick(dataset: str) -> Recipe:
    shared = _series_or_digits(dataset)
    if shared is not None:
        return shared
    if dataset == "mnist":
        return Recipe("small_cnn", {}, TrainConfig(epochs=4, batch_size=128, lr=0.05))
    # airbench94's augmentation (translate 2, flip where it keeps the label) and label smoothing 0.2.
    epochs = 3 if dataset == "gtsrb" else 4
    return Recipe(
        "airbench",
        {"width": 32},
        TrainConfig(epochs=epochs, batch_size=256, lr=0.2, label_smoothing=0.2, crop_padding=2),
    )


@RECIPES.register("backdoorbench", "BackdoorBench's protocol: PreAct-ResNet18, 100 epochs, SGD 0.01, cosine")
def backdoorbench(dataset: str) -> Recipe:
    if dataset_modality(dataset) == "series":
        raise ValueError(
            f"recipe 'backdoorbench' is for images (BackdoorBench has no time series); "
            f"{dataset} is a time-series set: use 'fast' or 'quick'"
        )
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


def recipe_for(name: str, dataset: str) -> Recipe:
    """The recipe ``name`` for ``dataset`` (a fresh copy: callers may change its schedule)."""
    recipe = RECIPES.get(name)(dataset)
    return replace(recipe, model_options=dict(recipe.model_options), train=replace(recipe.train))

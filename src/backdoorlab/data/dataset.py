"""The dataset type: in-memory tensors, and the seeded ways to cut them.

Two modalities share one type. Images are uint8 ``(N, C, H, W)``; models take them as floats in
[0, 1]. Time series are float32 ``(N, C, L)`` in their own units. Labels are int64 ``(N,)``. Models
normalise inside (see ``backdoorlab.models``) with the training split's per-channel statistics, so
triggers and inversion methods work on raw pixels or raw series values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


class DataError(ValueError):
    """Bad data or a bad request about data (sizes, files, splits)."""


@dataclass(frozen=True)
class TensorDataset:
    """A labelled dataset held as tensors.

    Attributes:
        inputs: uint8 images ``(N, C, H, W)``, or float32 time series ``(N, C, L)``.
        labels: int64 class indices ``(N,)`` in ``0..len(classes)-1``.
        classes: class names, index = label.
        mean, std: per-channel normalisation statistics of the training split (images: in [0, 1]
            units; series: in the series' units).
        name: the source's name (``digits``, ``cifar10``...).
        hflip: whether a horizontal flip keeps the label (true for CIFAR-10; false for digits and
            traffic signs), used by the training loop's augmentation.
    """

    inputs: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    hflip: bool = False

    def __post_init__(self) -> None:
        image = self.inputs.dtype == torch.uint8 and self.inputs.dim() == 4
        series = self.inputs.dtype == torch.float32 and self.inputs.dim() == 3
        if not (image or series):
            raise DataError(
                f"{self.name}: inputs must be uint8 images (N, C, H, W) or float32 series "
                f"(N, C, L), got {self.inputs.dtype} {tuple(self.inputs.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.inputs),):
            raise DataError(
                f"{self.name}: labels must be int64 of shape ({len(self.inputs)},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.mean) != self.inputs.shape[1] or len(self.std) != self.inputs.shape[1]:
            raise DataError(f"{self.name}: mean/std need one value per channel")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> tuple[Tensor, Tensor]:
        """``(input, label)`` at ``index``: a map-style dataset, so a ``torch.utils.data.DataLoader``
        takes it as it is (uint8 images stay uint8; the toolkit's models scale them)."""
        return self.inputs[index], self.labels[index]

    @classmethod
    def from_arrays(
        cls,
        inputs: Any,
        labels: Any,
        *,
        classes: Sequence[str] | None = None,
        name: str = "custom",
        channels_last: bool | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hflip: bool = False,
    ) -> TensorDataset:
        """Your own data as a dataset: numpy arrays or tensors.

        Images: uint8 ``(N, H, W)`` (grey), ``(N, C, H, W)`` or ``(N, H, W, C)`` (``channels_last``
        ``None`` guesses from which axis has 1 or 3 entries), or floats in [0, 1] of 4 dimensions
        (rounded to uint8). Time series: numbers ``(N, L)`` or ``(N, C, L)`` that are not uint8 (so
        float grey images must come as ``(N, 1, H, W)``). Labels: integers ``0..K-1``. ``classes``
        default to ``"0".."K-1"``; ``mean`` and ``std`` (per channel; images in [0, 1] units) to
        those of ``inputs``, which should be a training split (give the test split the training
        split's). Every mistake is a :class:`DataError` naming what is wrong."""
        x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, Tensor) else inputs)
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or len(y) != len(x):
            raise DataError(f"{name}: labels must be {len(x)} integers (N,), got {y.dtype} {tuple(y.shape)}")
        y = y.long()
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{name}: labels must be class indices >= 0, got {int(y.min())}")
        image = x.dtype == torch.uint8 or x.dim() == 4
        if image:
            x = _as_uint8_images(x, name, channels_last)
        elif x.dim() in (2, 3) and x.dtype != torch.bool:
            x = (x[:, None] if x.dim() == 2 else x).float()
        else:
            raise DataError(
                f"{name}: inputs must be images (N, H, W), (N, C, H, W) or (N, H, W, C), or float series "
                f"(N, L) or (N, C, L); got {x.dtype} {tuple(x.shape)}"
            )
        count = int(y.max()) + 1 if len(y) else 0
        classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(count))
        if len(classes) < count:
            raise DataError(f"{name}: {len(classes)} class names for labels up to {count - 1}")
        values = x.float().div(255.0) if image else x
        dims = [0, 2, 3] if image else [0, 2]
        mean = tuple(mean) if mean is not None else tuple(values.mean(dims).tolist())
        std = tuple(std) if std is not None else tuple(values.std(dims).clamp_min(1e-6).tolist())
        return cls(x.contiguous(), y, classes, mean, std, name, hflip)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def modality(self) -> str:
        """``"image"`` (uint8 ``(N, C, H, W)``) or ``"series"`` (float32 ``(N, C, L)``)."""
        return "image" if self.inputs.dim() == 4 else "series"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(C, H, W)`` or ``(C, L)``."""
        return tuple(self.inputs.shape[1:])

    @property
    def in_channels(self) -> int:
        return int(self.inputs.shape[1])

    def subset(self, indices: Tensor) -> TensorDataset:
        """The samples at ``indices`` (a copy), with the same metadata."""
        return self.replace(inputs=self.inputs[indices], labels=self.labels[indices])

    def replace(self, **changes: object) -> TensorDataset:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _as_uint8_images(x: Tensor, name: str, channels_last: bool | None) -> Tensor:
    """Images as uint8 ``(N, C, H, W)``: grey ``(N, H, W)`` gains a channel, channels-last is
    moved, floats in [0, 1] are rounded to 8 bits."""
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise DataError(f"{name}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), got {tuple(x.shape)}")
    if channels_last is None:
        channels_last = x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3)
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x
    if not x.dtype.is_floating_point:
        raise DataError(f"{name}: images must be uint8 or floats in [0, 1], got {x.dtype}")
    if len(x) and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise DataError(
            f"{name}: float images must be in [0, 1], got values in [{float(x.min()):g}, {float(x.max()):g}] "
            "(pass uint8 pixels, or divide by 255)"
        )
    return x.float().mul(255.0).round().to(torch.uint8)


@dataclass(frozen=True)
class Splits:
    """A dataset's standard train and test splits."""

    train: TensorDataset
    test: TensorDataset


def resolve_count(size: float | int, total: int, what: str) -> int:
    """Turn a size into a count of ``total`` samples, refusing nonsense before any work.

    A float is a fraction in (0, 1] (``1.0`` is everything); an int is a count >= 1.
    ``what`` names the quantity in error messages ("poison rate", "trusted split size"...).
    """
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise DataError(f"{what} must be a fraction in (0, 1] or a count, got {size!r}")
    if isinstance(size, float):
        if not 0.0 < size <= 1.0:
            raise DataError(f"{what} must be a fraction in (0, 1] or a count >= 1, got {size}")
        count = round(size * total)
    else:
        if size < 1:
            raise DataError(f"{what} must be a fraction in (0, 1] or a count >= 1, got {size}")
        count = size
    if count < 1:
        raise DataError(f"{what} of {size} selects no sample out of {total}")
    if count > total:
        raise DataError(f"{what} of {size} asks for {count} samples but only {total} are available")
    return count


def seeded_permutation(n: int, seed: int) -> Tensor:
    """A permutation of ``range(n)`` that depends only on ``seed`` (CPU generator)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def subsample(data: TensorDataset, size: float | int, seed: int) -> TensorDataset:
    """A seeded random subset (fraction or count), for quick runs (``--train-size``)."""
    count = resolve_count(size, len(data), f"{data.name} subsample size")
    return data.subset(seeded_permutation(len(data), seed)[:count].sort().values)


def split_trusted(train: TensorDataset, size: float | int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Carve a trusted clean split off the (still clean) training set.

    Returns ``(rest, trusted)``. The trusted split is the only clean data a defense may get; the
    attack poisons ``rest`` only, so trusted samples never appear poisoned in training. A fraction
    too small for a tiny training set (1% of GunPoint's 50 series) takes one sample.
    """
    if isinstance(size, float) and 0.0 < size <= 1.0 and round(size * len(train)) == 0:
        size = 1
    count = resolve_count(size, len(train), "trusted split size")
    if count >= len(train):
        raise DataError(f"trusted split of {size} would leave no training data")
    order = seeded_permutation(len(train), seed)
    trusted = order[:count].sort().values
    rest = order[count:].sort().values
    return train.subset(rest), train.subset(trusted)

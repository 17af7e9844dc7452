"""Dataset sources by name: ``load_dataset("cifar10")`` -> train and test tensors.

- ``digits``: scikit-learn's bundled 8x8 digits, always available, fixed stratified split.
- ``mnist``, ``cifar10``, ``gtsrb``: parquet files in the Hugging Face layout under a data root
  (argument, or ``$BACKDOORLAB_DATA``); where absent, torchvision's download (needs internet).
- time series (``backdoorlab.data.series``): ``ucr:<Name>`` (UCR archive folders under the data
  root), sktime's bundled sets by name (``gunpoint``...) and ``sktime:<Name>``.
- images by path (``backdoorlab.data.paths``): ``parquet:<PATH>`` (Hugging Face parquet files) and
  ``folder:<PATH>`` (``PATH/{train,test}/<class>/<image>``); mean and std are the training split's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from backdoorlab.data.cache import cache_dir, cached
from backdoorlab.data.dataset import DataError, Splits, TensorDataset
from backdoorlab.data.parquet import read_image_parquet
from backdoorlab.data.paths import read_hf_dataset, read_image_folder, read_parquet_dataset, resolve_path
from backdoorlab.data.series import SKTIME_BUNDLED, load_sktime, load_ucr
from backdoorlab.registry import Registry, UnknownNameError

DATA_ENV = "BACKDOORLAB_DATA"

#: Loaders by name; each takes ``(root, download)`` and returns ``Splits``.
#: A set holds images unless registered with ``modality="series"``.
DATASETS: Registry[Callable[[Path | None, bool], Splits]] = Registry("dataset", modality="image")


@dataclass(frozen=True)
class Prefix:
    """An open-ended family of sets named ``<prefix>:<rest>``: ``loader(rest)`` gives the loader of
    one, ``modality`` the data they hold, ``usage`` how to write a name (``ucr:<Name>``)."""

    loader: Callable[[str], Callable[[Path | None, bool], Splits]]
    modality: str
    usage: str


def _by_path(prefix: str, read: Callable[[Path], tuple[Any, Any, tuple[str, ...]]]) -> Prefix:
    """``<prefix>:PATH``: images read from a path (``data.paths``), mean and std of its training
    split; a label is kept under a horizontal flip only where the data says so (never, here)."""

    def loader(rest: str) -> Callable[[Path | None, bool], Splits]:
        def load(root: Path | None, download: bool) -> Splits:
            train, test, classes = read(resolve_path(rest, root, prefix))
            return _make_splits(f"{prefix}:{rest}", train, test, classes, hflip=False)

        return load

    return Prefix(loader, "image", f"{prefix}:<PATH>")


#: Name prefixes for open-ended families of sets: time series ``ucr:<Name>``, ``sktime:<Name>``;
#: images by path ``parquet:<PATH>`` (Hugging Face parquet files), ``folder:<PATH>`` (an image folder),
#: ``hf:<NAME>`` (what the Hugging Face ``datasets`` library loads).
PREFIXES = {
    "ucr": Prefix(lambda name: lambda root, download: load_ucr(root, name), "series", "ucr:<Name>"),
    "sktime": Prefix(lambda name: lambda root, download: load_sktime(name), "series", "sktime:<Name>"),
    "parquet": _by_path("parquet", read_parquet_dataset),
    "folder": _by_path("folder", read_image_folder),
    "hf": Prefix(
        lambda name: lambda root, download: _make_splits(f"hf:{name}", *read_hf_dataset(name), hflip=False),
        "image",
        "hf:<NAME>",
    ),
}


class DataNotFoundError(DataError):
    """A dataset is neither on disk nor downloadable; the message says where files are expected."""


def dataset_loader(name: str) -> Callable[[Path | None, bool], Splits]:
    """The loader of a registered name or a prefixed one (``ucr:GunPoint``); an unknown name
    raises with the valid ones listed."""
    prefix, sep, rest = name.partition(":")
    if sep:
        if prefix.lower() not in PREFIXES or not rest:
            raise DataError(f"unknown dataset '{name}'; prefixed names are {_usages()}")
        return PREFIXES[prefix.lower()].loader(rest)
    try:
        return DATASETS.get(name)
    except UnknownNameError as err:
        raise UnknownNameError(f"{err}; or a prefixed name: {_usages()}") from None


def _usages() -> str:
    return ", ".join(p.usage for p in PREFIXES.values())


def dataset_facts(name: str) -> dict[str, Any]:
    """What is known of a dataset without loading it: ``classes`` (its number of classes) and
    ``shape`` (one input's shape) where registered with them, and ``modality``; ``{}`` for
    prefixed families."""
    return DATASETS.metadata(name) if name in DATASETS else {}


def dataset_modality(name: str) -> str:
    """``"series"`` or ``"image"``, from the name alone (no data is read): a registered set's
    ``modality``, a prefixed family's (``ucr:``: series, ``parquet:``: images); an unknown name is refused."""
    dataset_loader(name)  # refuses an unknown name with the valid ones listed
    prefix, sep, _ = name.partition(":")
    return PREFIXES[prefix.lower()].modality if sep else DATASETS.metadata(name)["modality"]


def load_dataset(name: str, root: str | Path | None = None, *, download: bool = True) -> Splits:
    """Load a dataset's train and test splits as tensors.

    Args:
        name: a registered name (``backdoorlab list`` shows them), ``ucr:<Name>``,
            ``sktime:<Name>``, or images by path: ``parquet:<PATH>`` (Hugging Face parquet
            files), ``folder:<PATH>`` (``PATH/{train,test}/<class>/<image>``), or ``hf:<NAME>``
            (what the Hugging Face ``datasets`` library loads); see :mod:`backdoorlab.data.paths`.
        root: folder that holds ``<name>/{train,test}.parquet`` (and ``ucr/<Name>/``; a relative
            ``PATH`` of ``parquet:``/``folder:`` not found from the current folder); default
            ``$BACKDOORLAB_DATA``.
        download: where the files are absent, try torchvision's download (needs internet).
    """
    loader = dataset_loader(name)
    return loader(resolve_data_root(root), download)


def resolve_data_root(root: str | Path | None) -> Path | None:
    """The data root: the argument, else ``$BACKDOORLAB_DATA``, else None."""
    if root is None:
        root = os.environ.get(DATA_ENV) or None
    return Path(root).expanduser() if root is not None else None


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (computed in chunks)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.numel() / channels
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def _make_splits(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    classes: tuple[str, ...],
    hflip: bool,
) -> Splits:
    mean, std = channel_stats(train[0])

    def build(images: Tensor, labels: Tensor) -> TensorDataset:
        return TensorDataset(images, labels, classes, mean, std, name, hflip)

    return Splits(train=build(*train), test=build(*test))


# --------------------------------------------------------------------------------------------
# digits


@DATASETS.register(
    "digits", "scikit-learn's 8x8 handwritten digits, bundled (1437 train / 360 test)", classes=10, shape=(1, 8, 8)
)
def load_digits(root: Path | None = None, download: bool = True) -> Splits:
    """sklearn's 1797 digits as 1x8x8 uint8 (values 0..16 scaled to 0..255); a fixed stratified
    80/20 split (``train_test_split(..., random_state=0)``) so every run sees the same test set."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=bunch.target, random_state=0)
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    classes = tuple(str(i) for i in range(10))
    return _make_splits(
        "digits",
        (images[train_idx], labels[train_idx]),
        (images[test_idx], labels[test_idx]),
        classes,
        hflip=False,
    )


# --------------------------------------------------------------------------------------------
# parquet datasets with a torchvision fallback


@dataclass(frozen=True)
class ParquetSource:
    """A dataset read from ``<root>/<name>/{train,test}.parquet``, or downloaded by torchvision."""

    name: str
    hflip: bool
    download_split: Callable[[Path, bool], tuple[np.ndarray, np.ndarray, tuple[str, ...]]]

    def __call__(self, root: Path | None, download: bool) -> Splits:
        files = [root / self.name / f"{split}.parquet" for split in ("train", "test")] if root else []
        if files and all(f.exists() for f in files):
            parts = [self._read_cached(f) for f in files]
        else:
            parts = self._download(root, files, download)
        (train_x, train_y, classes), (test_x, test_y, _) = parts
        return _make_splits(self.name, (train_x, train_y), (test_x, test_y), classes, self.hflip)

    def _read_cached(self, path: Path) -> tuple[Tensor, Tensor, tuple[str, ...]]:
        def build() -> dict[str, object]:
            images, labels, classes = read_image_parquet(path)
            return {"images": images, "labels": labels, "classes": list(classes)}

        entry = cached(path, f"{self.name}-{path.stem}", build)
        return entry["images"], entry["labels"], tuple(entry["classes"])  # type: ignore[arg-type]

    def _download(
        self, root: Path | None, files: list[Path], download: bool
    ) -> list[tuple[Tensor, Tensor, tuple[str, ...]]]:
        where = (
            f"expected {files[0]} and {files[1]}"
            if files
            else f"no data root is set (pass --data-root or set {DATA_ENV})"
        )
        hint = (
            f"Put the Hugging Face parquet files (columns image{{bytes,path}}, label) at "
            f"<root>/{self.name}/train.parquet and test.parquet and point --data-root or "
            f"{DATA_ENV} at <root>; or run once on a machine with internet so torchvision "
            f"can download {self.name}"
        )
        if not download:
            raise DataNotFoundError(f"dataset '{self.name}' not found: {where}. {hint}.")
        target = cache_dir() / "torchvision"
        try:
            parts = []
            for train in (True, False):
                images, labels, classes = self.download_split(target, train)
                images_t = torch.from_numpy(np.ascontiguousarray(images))
                images_t = images_t.unsqueeze(1) if images_t.dim() == 3 else images_t.permute(0, 3, 1, 2)
                labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
                parts.append((images_t.contiguous(), labels_t, classes))
            return parts
        except Exception as err:  # no network, a broken mirror...
            raise DataNotFoundError(
                f"dataset '{self.name}' not found: {where}, and torchvision's download into "
                f"{target} failed ({type(err).__name__}: {err}). {hint}."
            ) from err


def _download_cifar10(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(str(root), train=train, download=True)
    return ds.data, np.asarray(ds.targets), tuple(ds.classes)


def _download_mnist(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from torchvision.datasets import MNIST

    ds = MNIST(str(root), train=train, download=True)
    return ds.data.numpy(), ds.targets.numpy(), tuple(str(i) for i in range(10))


def _download_gtsrb(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """torchvision's GTSRB has images of 15 to 250 px; resize the whole image to 32x32, as the
    Hugging Face copy in the shared data was made."""
    from PIL import Image
    from torchvision.datasets import GTSRB

    ds = GTSRB(str(root), split="train" if train else "test", download=True)
    samples = ds._samples  # (path, label) pairs; torchvision keeps no public list
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR)) for p, _ in samples])
    return images, np.asarray([y for _, y in samples]), GTSRB_CLASSES


GTSRB_CLASSES = (
    "Speed limit (20km/h)",
    "Speed limit (30km/h)",
    "Speed limit (50km/h)",
    "Speed limit (60km/h)",
    "Speed limit (70km/h)",
    "Speed limit (80km/h)",
    "End of speed limit (80km/h)",
    "Speed limit (100km/h)",
    "Speed limit (120km/h)",
    "No passing",
    "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection",
    "Priority road",
    "Yield",
    "Stop",
    "No vehicles",
    "Vehicles over 3.5 metric tons prohibited",
    "No entry",
    "General caution",
    "Dangerous curve to the left",
    "Dangerous curve to the right",
    "Double curve",
    "Bumpy road",
    "Slippery road",
    "Road narrows on the right",
    "Road work",
    "Traffic signals",
    "Pedestrians",
    "Children crossing",
    "Bicycles crossing",
    "Beware of ice/snow",
    "Wild animals crossing",
    "End of all speed and passing limits",
    "Turn right ahead",
    "Turn left ahead",
    "Ahead only",
    "Go straight or right",
    "Go straight or left",
    "Keep right",
    "Keep left",
    "Roundabout mandatory",
    "End of no passing",
    "End of no passing by vehicles over 3.5 metric tons",
)

DATASETS.register(
    "mnist", "MNIST 28x28 grey (60k / 10k), parquet or torchvision download", classes=10, shape=(1, 28, 28)
)(ParquetSource("mnist", hflip=False, download_split=_download_mnist))
DATASETS.register(
    "cifar10", "CIFAR-10 32x32 RGB (50k / 10k), parquet or torchvision download", classes=10, shape=(3, 32, 32)
)(ParquetSource("cifar10", hflip=True, download_split=_download_cifar10))
DATASETS.register("gtsrb", "GTSRB traffic signs 32x32 RGB, 43 classes (39k / 12.6k)", classes=43, shape=(3, 32, 32))(
    ParquetSource("gtsrb", hflip=False, download_split=_download_gtsrb)
)


for _name, _archive_name in SKTIME_BUNDLED.items():
    DATASETS.register(
        _name, f"time series: UCR/UEA {_archive_name}, bundled with sktime (timeseries extra)", modality="series"
    )(lambda root, download, _n=_archive_name, _ours=_name: load_sktime(_n, _ours))

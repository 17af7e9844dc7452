"""Time-series sources: folders of the UCR archive's own format, and the sets bundled with sktime.

Series are float32 ``(N, channels, length)`` in their own units; labels are mapped to ``0..K-1``
in the sorted order of the original labels, whose names are kept as the class names. The
training split's per-channel mean and std go with the data, and every model normalises with them
inside (per-dataset normalisation; the UCR archive's series are mostly z-normalised one by one
already, which this leaves as it is).

- ``ucr:<Name>``: ``<root>/ucr/<Name>/<Name>_TRAIN.tsv`` and ``_TEST.tsv`` (or ``<root>/<Name>/``),
  one series per line, tab-separated, class label first (Dau et al., "The UCR Time Series
  Archive", 2019).
- ``gunpoint``, ``arrowhead``, ``italypowerdemand``, ``basicmotions``, ``osuleaf``, ``acsf1``:
  the UCR/UEA sets sktime ships inside its package (``pip install 'backdoorlab[timeseries]'``),
  offline; ``sktime:<Name>`` loads any UCR/UEA set by name through sktime, which downloads the
  ones it does not bundle (needs internet).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from backdoorlab.data.dataset import DataError, Splits, TensorDataset

#: sktime's bundled UCR/UEA sets of equal-length series: our name -> the archive's name.
SKTIME_BUNDLED = {
    "gunpoint": "GunPoint",
    "arrowhead": "ArrowHead",
    "italypowerdemand": "ItalyPowerDemand",
    "basicmotions": "BasicMotions",
    "osuleaf": "OSULeaf",
    "acsf1": "ACSF1",
}


def series_stats(series: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of float series ``(N, C, L)``, over samples and time."""
    flat = series.double().transpose(0, 1).reshape(series.shape[1], -1)
    mean = flat.mean(1)
    std = flat.std(1, unbiased=False).clamp_min(1e-8)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def _label_name(value: object) -> str:
    """``1.0`` -> ``"1"``; other labels as they are written."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _label_key(name: str) -> tuple[int, float, str]:
    """Sort numeric labels by value, the rest by name, numbers first."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def series_splits(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    where: str,
) -> Splits:
    """Build the splits from ``(series (N, C, L), labels)`` arrays: check shapes and values, map
    the labels to ``0..K-1`` and compute the training split's statistics. ``where`` names the
    source in error messages."""
    (train_x, train_y), (test_x, test_y) = train, test
    for split, x in (("train", train_x), ("test", test_x)):
        if x.ndim != 3 or len(x) == 0:
            raise DataError(f"{where}: the {split} split is not a non-empty (N, C, L) array, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError(
                f"{where}: the {split} split has missing or infinite values (variable-length series "
                "padded with NaN are not supported)"
            )
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{where}: train series are {train_x.shape[1:]} but test series {test_x.shape[1:]}")
    train_names = [_label_name(v) for v in train_y]
    test_names = [_label_name(v) for v in test_y]
    classes = tuple(sorted(set(train_names), key=_label_key))
    unseen = sorted(set(test_names) - set(classes), key=_label_key)
    if unseen:
        raise DataError(f"{where}: test labels {', '.join(unseen)} never occur in the training split")
    if len(classes) < 2:
        raise DataError(f"{where}: the training split has a single class ({classes[0]})")
    index = {c: i for i, c in enumerate(classes)}
    train_t = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    test_t = torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32))
    mean, std = series_stats(train_t)

    def build(x: Tensor, names: list[str]) -> TensorDataset:
        labels = torch.tensor([index[n] for n in names], dtype=torch.int64)
        return TensorDataset(x, labels, classes, mean, std, name)

    return Splits(train=build(train_t, train_names), test=build(test_t, test_names))


def read_ucr_tsv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One split file of the UCR archive: ``(series (N, 1, L) float64, labels (N,))``."""
    try:
        table = np.loadtxt(path, delimiter="\t", ndmin=2)
    except (ValueError, OSError) as err:
        raise DataError(f"cannot read UCR file {path}: {err}") from err
    if table.shape[1] < 2:
        raise DataError(f"UCR file {path}: each line needs a label and at least one value")
    return table[:, None, 1:], table[:, 0]


def ucr_folder(root: Path | None, name: str) -> Path:
    """The folder of UCR set ``name``: ``<root>/ucr/<name>`` or ``<root>/<name>``."""
    if root is None:
        raise DataError(
            f"ucr:{name} reads the UCR archive's files from a data folder; none is set (pass "
            "--data-root or set BACKDOORLAB_DATA to the folder that holds ucr/<Name>/)"
        )
    candidates = [root / "ucr" / name, root / name]
    for folder in candidates:
        if (folder / f"{name}_TRAIN.tsv").exists():
            return folder
    available = sorted(p.name for p in (root / "ucr").glob("*") if p.is_dir()) if (root / "ucr").is_dir() else []
    hint = f"; sets there: {', '.join(available)}" if available else ""
    raise DataError(
        f"UCR set '{name}' not found: expected {candidates[0]}/{name}_TRAIN.tsv and _TEST.tsv "
        f"(names are case-sensitive, as in the archive){hint}"
    )


def load_ucr(root: Path | None, name: str) -> Splits:
    """Load ``<root>/ucr/<name>/<name>_{TRAIN,TEST}.tsv``."""
    folder = ucr_folder(root, name)
    parts = [read_ucr_tsv(folder / f"{name}_{split}.tsv") for split in ("TRAIN", "TEST")]
    return series_splits(f"ucr:{name}", parts[0], parts[1], str(folder))


def load_sktime(name: str, our_name: str | None = None) -> Splits:
    """Load a UCR/UEA set through sktime (bundled ones offline; others are downloaded)."""
    try:
        from sktime.datasets import load_UCR_UEA_dataset
    except ImportError as err:
        raise DataError(
            f"dataset '{our_name or name}' comes from sktime, which is not installed: "
            "pip install 'backdoorlab[timeseries]'"
        ) from err
    parts = []
    for split in ("train", "test"):
        try:
            x, y = load_UCR_UEA_dataset(name, split=split, return_X_y=True, return_type="numpy3D")
        except Exception as err:  # not bundled and no network, unequal lengths, a bad name...
            raise DataError(
                f"sktime could not load UCR/UEA set '{name}' ({type(err).__name__}: {err}); "
                f"bundled offline: {', '.join(SKTIME_BUNDLED.values())}"
            ) from err
        parts.append((np.asarray(x, dtype=np.float64), np.asarray(y)))
    return series_splits(our_name or f"sktime:{name}", parts[0], parts[1], f"sktime's {name}")

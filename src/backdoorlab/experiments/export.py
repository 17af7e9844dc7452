"""Export a run's poisoned data as parquet files, and read an export back.

:func:`export_poisoned` does what a run does before training (:func:`~backdoorlab.experiments.run.prepare`:
load, carve the trusted split, fit the attack, poison) and writes into a folder, in the Hugging Face
``datasets`` layout (``image`` as PNG bytes, ``label`` a ``ClassLabel``):

- ``train.parquet``: the poisoned training set a victim trains on (the training split less the
  trusted split), labels as poisoned, with the columns ``poisoned`` (the mask) and ``original_label``
  (and ``cross``, WaNet's noise-mode samples, where the attack makes them);
- ``test.parquet``: the clean test set;
- ``triggered.parquet``: the triggered test samples the attack success rate is measured on,
  ``label`` their true class, ``target`` the attacker's;
- ``trusted.parquet``: the trusted clean split, the only clean data a defense would get.

Every file's schema metadata holds the run's resolved config as JSON (key ``backdoorlab``: ``config``,
``version``, ``file``). ``parquet:FOLDER`` reads ``train`` and ``test`` back as a dataset (the other
two are not split names); :func:`load_export` reads all four with the mask and the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backdoorlab import __version__
from backdoorlab.attacks.poisoning import PoisonedDataset, TriggeredTestSet
from backdoorlab.data.dataset import DataError, TensorDataset
from backdoorlab.data.paths import ParquetSplit, read_parquet_cached, write_image_parquet
from backdoorlab.data.sources import channel_stats
from backdoorlab.experiments.config import RunConfig
from backdoorlab.experiments.run import prepare

#: The files of an export, in the order they are written.
EXPORT_FILES = ("train", "test", "triggered", "trusted")


@dataclass(frozen=True)
class Export:
    """An export read back: the poisoned training set with its mask, the clean test set, the
    triggered test set, the trusted split, and the config (a dict, ``RunConfig.from_dict`` takes it)."""

    poisoned: PoisonedDataset
    test: TensorDataset
    triggered: TriggeredTestSet
    trusted: TensorDataset
    config: dict[str, Any]
    version: str


def export_poisoned(config: RunConfig, output: str | Path) -> dict[str, Path]:
    """Write ``config``'s poisoned training set, clean and triggered test sets and trusted split
    into the folder ``output`` (module docstring); return the files written by name."""
    prepared = prepare(config)
    resolved = prepared.config
    if prepared.train_set.modality != "image":
        raise DataError(f"export writes images; '{resolved.dataset}' holds time series")
    stored = resolved.to_dict()
    stored["attack_options"] = prepared.trigger.config()
    poisoned, triggered, classes = prepared.poisoned, prepared.triggered, prepared.train_set.classes
    extra = {"poisoned": poisoned.mask, "original_label": poisoned.original_labels}
    if poisoned.cross_mask is not None:
        extra["cross"] = poisoned.cross_mask
    contents = {
        "train": (poisoned.data.inputs, poisoned.data.labels, extra),
        "test": (prepared.test_set.inputs, prepared.test_set.labels, {}),
        "triggered": (triggered.inputs, triggered.true_labels, {"target": triggered.target_labels}),
        "trusted": (prepared.trusted.inputs, prepared.trusted.labels, {}),
    }
    folder = Path(output)
    written = {}
    for name in EXPORT_FILES:
        images, labels, columns = contents[name]
        metadata = {"config": stored, "version": __version__, "file": name}
        written[name] = write_image_parquet(folder / f"{name}.parquet", images, labels, classes, columns, metadata)
    return written


def load_export(folder: str | Path) -> Export:
    """Read an export of :func:`export_poisoned` back; the datasets' mean and std are those of the
    training file, as ``parquet:FOLDER`` computes them. An error names a missing or foreign file."""
    folder = Path(folder)
    parts: dict[str, ParquetSplit] = {}
    for name in EXPORT_FILES:
        path = folder / f"{name}.parquet"
        if not path.is_file():
            raise DataError(f"{path}: missing: an export holds {', '.join(f + '.parquet' for f in EXPORT_FILES)}")
        parts[name] = read_parquet_cached(path)
        if "config" not in parts[name].metadata:
            raise DataError(f"{path}: no backdoorlab config in its metadata: not written by export_poisoned")
    train = parts["train"]
    for column in ("poisoned", "original_label"):
        if column not in train.columns:
            raise DataError(f"{folder / 'train.parquet'}: no '{column}' column")
    classes = train.classes or tuple(str(i) for i in range(int(train.labels.max()) + 1))
    mean, std = channel_stats(train.images)
    config = train.metadata["config"]

    def dataset(part: ParquetSplit) -> TensorDataset:
        return TensorDataset(part.images, part.labels, classes, mean, std, str(config.get("dataset", folder)))

    triggered = parts["triggered"]
    cross = train.columns.get("cross")
    return Export(
        poisoned=PoisonedDataset(
            dataset(train),
            train.columns["poisoned"].bool(),
            train.columns["original_label"].long(),
            cross.bool() if cross is not None else None,
        ),
        test=dataset(parts["test"]),
        triggered=TriggeredTestSet(triggered.images, triggered.labels, triggered.columns["target"].to(torch.int64)),
        trusted=dataset(parts["trusted"]),
        config=config,
        version=str(train.metadata.get("version", "")),
    )

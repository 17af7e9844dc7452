"""Datasets as in-memory tensors, their sources, and the seeded splits a run needs."""

from backdoorlab.data.dataset import (
    DataError,
    Splits,
    TensorDataset,
    resolve_count,
    split_trusted,
    subsample,
)
from backdoorlab.data.sources import DATASETS, DataNotFoundError, load_dataset

__all__ = [
    "DATASETS",
    "DataError",
    "DataNotFoundError",
    "Splits",
    "TensorDataset",
    "load_dataset",
    "resolve_count",
    "split_trusted",
    "subsample",
]

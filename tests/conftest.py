"""Shared fixtures. Real data comes from ``$BACKDOORLAB_DATA`` or ``../shared/data`` beside the
checkout; tests that need it skip with the reason when neither exists."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from backdoorlab.data import Splits, load_dataset

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path | None:
    for candidate in (os.environ.get("BACKDOORLAB_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "cifar10" / "train.parquet").exists():
            return Path(candidate)
    return None


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKDOORLAB_PROGRESS", "0")


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("no data folder: set BACKDOORLAB_DATA or put shared/data beside the checkout")
    return root


@pytest.fixture(scope="session")
def digits() -> Splits:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def mnist_badnets_airbench(data_root: Path) -> tuple[Any, Any, dict[str, float]]:
    """One BadNets victim for the repairs' MNIST tests: 5,000 images, the fast recipe's airbench
    (width 24), BadNets at 10%, 5% trusted; returns the prepared run, the model and its metrics."""
    from backdoorlab.experiments import RunConfig
    from backdoorlab.experiments.run import evaluate, prepare, train_victim

    config = RunConfig(dataset="mnist", train_size=5_000, test_size=2_000, trusted_size=0.05, data_root=str(data_root))
    prepared = prepare(config)
    model, _ = train_victim(prepared)
    return prepared, model, evaluate(prepared, model)

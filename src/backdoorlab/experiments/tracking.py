"""Experiment trackers: each finished run (or sweep cell) logged to MLflow or TensorBoard.

A tracker gets a run's ``result.json`` document as it is stored (:meth:`RunResult.to_dict`): its
config flattened into parameters (``attack_options.ratio``), its metrics, its timings
(``time_train``...) and its per-epoch history (``loss``, ``accuracy``... at steps 1, 2, ...), and
its health warnings as a tag (MLflow) or text (TensorBoard). The store stays the record; a tracker
is a view of it in the tool a team already watches. ``create_tracker`` reads the command line's
``--track``:

- ``mlflow``: MLflow's own default store (``MLFLOW_TRACKING_URI``, else its default); ``mlflow:URI``
  any tracking URI (``mlflow:http://server:5000``; ``mlflow:sqlite:///runs/mlflow.db`` with the full
  ``mlflow`` package; a folder, ``mlflow:file:///abs/mlruns``, where ``MLFLOW_ALLOW_FILE_STORE=true``,
  as MLflow 3 asks); runs go to the experiment ``backdoorlab`` unless ``MLFLOW_EXPERIMENT_NAME`` says
  otherwise; a store MLflow cannot use is refused before any training;
- ``tensorboard:DIR``: one event folder per run under ``DIR`` (``tensorboard --logdir DIR``).

Both packages are optional (``pip install 'backdoorlab[tracking]'``); a missing one is named.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The ``--track`` kinds, for error messages.
KINDS = ("mlflow", "mlflow:URI", "tensorboard:DIR")
#: MLflow refuses parameter values longer than this.
PARAM_LIMIT = 6000


class Tracker:
    """Log finished runs somewhere: subclasses write one run per :meth:`log_result`."""

    def log_result(self, name: str, document: Mapping[str, Any]) -> None:
        raise NotImplementedError


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``config`` as flat ``name: text`` parameters: nested mappings joined by dots, ``None`` and
    empty mappings left out, every other value as JSON text (cut to :data:`PARAM_LIMIT`)."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            params.update(flat_params(value, f"{name}."))
        elif value is not None:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            params[name] = text[:PARAM_LIMIT]
    return params


def scalars(document: Mapping[str, Any]) -> dict[str, float]:
    """The document's metrics and its timings (as ``time_<phase>``), the finite numbers of them."""
    found = {**document.get("metrics", {}), **{f"time_{k}": v for k, v in document.get("timings", {}).items()}}
    return {k: float(v) for k, v in found.items() if _finite(v)}


def series(document: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """The document's per-epoch history as ``name: [(step, value), ...]`` (steps from 1)."""
    history = document.get("history", {})
    return {
        name: [(step, float(v)) for step, v in enumerate(values, 1) if _finite(v)]
        for name, values in history.items()
        if isinstance(values, list)
    }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MLflowTracker(Tracker):
    """One MLflow run per result, in ``experiment`` at ``uri`` (``None``: MLflow's default)."""

    def __init__(self, uri: str | None = None, experiment: str | None = None) -> None:
        try:
            import mlflow
        except ImportError:
            raise ImportError("--track mlflow needs the mlflow package: pip install 'backdoorlab[tracking]'") from None
        self._mlflow = mlflow
        try:  # reaches the store now, so that a store MLflow cannot use fails before any training
            if uri:
                mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "backdoorlab")
        except Exception as err:  # MlflowException and the store's own errors
            message = " ".join(str(err).split())
            raise ValueError(
                f"--track mlflow: MLflow cannot use the store {mlflow.get_tracking_uri()!r}: {message}"
            ) from None

    def log_result(self, name: str, document: Mapping[str, Any]) -> None:
        mlflow = self._mlflow
        tags = {"backdoorlab.version": str(document.get("version", ""))}
        if document.get("warnings"):
            tags["backdoorlab.warnings"] = "\n".join(document["warnings"])[:PARAM_LIMIT]
        with mlflow.start_run(run_name=name, tags=tags):
            mlflow.log_params(flat_params(document.get("config", {})))
            mlflow.log_metrics(scalars(document))
            for metric, points in series(document).items():
                for step, value in points:
                    mlflow.log_metric(metric, value, step=step)


class TensorBoardTracker(Tracker):
    """One event folder per result under ``logdir`` (named after the run, numbered if taken)."""

    def __init__(self, logdir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "--track tensorboard needs the tensorboard package: pip install 'backdoorlab[tracking]'"
            ) from None
        self._writer = SummaryWriter
        self.logdir = Path(logdir)

    def log_result(self, name: str, document: Mapping[str, Any]) -> None:
        folder = self.logdir / (re.sub(r"[^\w.-]+", "_", name).strip("_") or "run")
        base, k = folder, 1
        while folder.exists():
            k += 1
            folder = base.with_name(f"{base.name}-{k}")
        writer = self._writer(log_dir=str(folder))
        try:
            writer.add_text("config", "```\n" + json.dumps(document.get("config", {}), indent=2) + "\n```")
            for warning in document.get("warnings", []):
                writer.add_text("warnings", warning)
            for metric, value in scalars(document).items():
                writer.add_scalar(metric, value, 0)
            for metric, points in series(document).items():
                for step, value in points:
                    writer.add_scalar(f"history/{metric}", value, step)
        finally:
            writer.close()


def create_tracker(spec: str) -> Tracker:
    """The tracker ``--track SPEC`` names (:data:`KINDS`)."""
    kind, _, where = spec.partition(":")
    if kind == "mlflow":
        return MLflowTracker(where or None)
    if kind == "tensorboard":
        if not where:
            raise ValueError("--track tensorboard needs a folder: tensorboard:DIR")
        return TensorBoardTracker(where)
    raise ValueError(f"unknown tracker {spec!r}; valid: {', '.join(KINDS)}")


def run_name(config: Mapping[str, Any]) -> str:
    """A short name for a run: its attack (or ``clean``) on its dataset, with its defense, seed."""
    name = f"{config.get('attack') or 'clean'} on {config.get('dataset')}"
    if config.get("defense"):
        name += f" + {config['defense']}"
    return f"{name} (seed {config.get('seed', 0)})"

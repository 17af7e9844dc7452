"""Experiment trackers: ``--track mlflow:URI`` and ``--track tensorboard:DIR`` log each finished run
and sweep cell (config as parameters, metrics, timings, per-epoch history), read back here with
each tool's own reader."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from backdoorlab.cli import app
from backdoorlab.experiments.tracking import create_tracker, flat_params, run_name, scalars, series

runner = CliRunner()
#: A run of a few seconds: 300 digits, three epochs.
SMALL = ["--train-size", "300", "--test-size", "200", "--epochs", "3", "--threads", "1"]

DOCUMENT = {
    "config": {"dataset": "digits", "attack": "badnets", "defense": None, "attack_options": {"size": 3}, "seed": 2},
    "metrics": {"clean_accuracy": 0.9, "attack_success_rate": 1.0, "isolation_auroc": None},
    "timings": {"train": 1.5, "total": 2.0},
    "history": {"loss": [2.0, 1.0, float("nan")], "accuracy": [0.5, 0.8, 0.9]},
    "warnings": ["a warning"],
    "version": "0.1.0",
}


def test_a_result_document_becomes_parameters_scalars_and_series():
    params = flat_params(DOCUMENT["config"])
    assert params == {"dataset": "digits", "attack": "badnets", "attack_options.size": "3", "seed": "2"}
    assert scalars(DOCUMENT) == {
        "clean_accuracy": 0.9,
        "attack_success_rate": 1.0,
        "time_train": 1.5,
        "time_total": 2.0,
    }
    assert series(DOCUMENT) == {"loss": [(1, 2.0), (2, 1.0)], "accuracy": [(1, 0.5), (2, 0.8), (3, 0.9)]}
    assert run_name(DOCUMENT["config"]) == "badnets on digits (seed 2)"


def test_an_unknown_or_incomplete_tracker_is_refused_naming_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid: mlflow, mlflow:URI, tensorboard:DIR"):
        create_tracker("wandb")
    with pytest.raises(ValueError, match="tensorboard needs a folder"):
        create_tracker("tensorboard")
    result = runner.invoke(app, ["run", "--track", f"mlflow:sqlite:///{tmp_path}/none.db", *SMALL])
    assert result.exit_code != 0 and "MLflow cannot use the store" in result.output
    assert "CA" not in result.output, "refused before training"


def test_a_run_is_logged_to_a_local_mlflow_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it for a folder store
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--track", f"mlflow:{uri}", "--output", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "result.json").read_text())
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("backdoorlab")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "badnets on digits (seed 0)"
    assert logged.data.params["attack"] == "badnets" and logged.data.params["train.epochs"] == "3"
    assert logged.data.metrics["attack_success_rate"] == pytest.approx(stored["metrics"]["attack_success_rate"])
    assert logged.data.metrics["time_train"] == pytest.approx(stored["timings"]["train"])
    losses = client.get_metric_history(logged.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert [m.value for m in losses] == pytest.approx(stored["history"]["loss"])


def test_each_sweep_cell_is_logged_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: tracked\ndataset: digits\ntrain_size: 300\ntest_size: 200\nepochs: 2\nseed: [0, 1]\n")
    logdir = tmp_path / "tb"
    args = ["sweep", str(grid), "--output", str(tmp_path / "sweep"), "--executor", "inline", "--no-report"]
    args += ["--track", f"tensorboard:{logdir}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    folders = sorted(p.name for p in logdir.iterdir())
    assert folders == ["seed_0", "seed_1"]
    events = EventAccumulator(str(logdir / "seed_1")).Reload()
    assert {"clean_accuracy", "attack_success_rate", "history/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("history/loss")] == [1, 2]
    assert 0.0 <= events.Scalars("attack_success_rate")[0].value <= 1.0

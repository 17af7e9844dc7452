"""Sanity guards (issue 37, cases 1 and 9): a diverged, broken or destroyed model never reads as a result.

Divergence stops training with an error; a suspect with non-finite weights and a non-finite detector
score are refused; collapsed, chance-level and destructively repaired models carry warnings into
the table, result.json, the store and the report; no NaN is ever written as JSON. All on digits.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import sqlite3
import warnings

import pytest
import torch
from typer.testing import CliRunner

from backdoorlab.cli import _report, app
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses import create_detector
from backdoorlab.defenses.post_training import Detection
from backdoorlab.evaluation import (
    COLLAPSE_SHARE,
    MAX_REPAIR_CA_DROP,
    HealthWarning,
    evaluate_backdoor,
    health_warnings,
    repair_warnings,
)
from backdoorlab.experiments import RunConfig, RunResult, run, save_model
from backdoorlab.experiments.grid import expand
from backdoorlab.experiments.store import ResultStore
from backdoorlab.experiments.sweep import sweep
from backdoorlab.metrics import dumps_json, finite_json
from backdoorlab.report import export_rows, write_report
from backdoorlab.training.loop import FiniteLossGuard, NonFiniteError, TrainConfig, TrainingDivergedError, train

runner = CliRunner()
run_module = importlib.import_module("backdoorlab.experiments.run")  # the package's ``run`` is the function
DIVERGED = r"diverged: the training loss is nan at epoch 1/2, step \d+/\d+ \(learning rate 1e\+06"


@pytest.fixture(scope="module")
def suspect() -> tuple[torch.nn.Module, RunConfig]:
    """A healthy BadNets model on digits and its run config (the README's run, at 10 epochs)."""
    config = RunConfig(dataset="digits", epochs=10)
    result = run(config)
    return result.model, RunConfig.from_dict(result.config)


# --- case 1: divergence -------------------------------------------------------------------------


def test_a_diverging_run_stops_with_an_error_naming_the_epoch_and_the_learning_rate():
    assert issubclass(TrainingDivergedError, ValueError), "the CLI turns a ValueError into one error line"
    with pytest.raises(TrainingDivergedError, match=DIVERGED) as caught:
        run(RunConfig(dataset="digits", lr=1e6, epochs=2))
    assert "lower the learning rate" in str(caught.value)


def test_the_cli_reports_divergence_as_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--lr", "1e6", "--epochs", "2", "--output", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "error: training (badnets on digits) diverged" in text and "lower the learning rate" in text
    assert "1.0000" not in result.output and not (out / "result.json").exists(), "no table, no result"


def test_the_loop_names_the_first_non_finite_step_at_once_or_at_the_epoch_end():
    data = TensorDataset(torch.randn(40, 1, 3), torch.arange(40) % 2, ("a", "b"), (0.0,), (1.0,), "toy")
    steps = []

    def nan_at_epoch_2_step_3(logits, labels, _indices, epoch):
        steps.append(epoch)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        return loss * float("nan") if len(steps) == 5 + 3 else loss  # 5 steps per epoch

    config = TrainConfig(epochs=3, batch_size=8, progress=False, data_init=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    with pytest.raises(
        TrainingDivergedError, match=r"training \(toy\) diverged: the training loss is nan at epoch 2/3, step 3/5"
    ):
        train(model, data, config, loss_fn=nan_at_epoch_2_step_3, description="toy")
    assert len(steps) == 8, "training stopped at the bad step"
    # the CUDA path: recorded on the device, raised at the epoch's end with the first bad step
    guard = FiniteLossGuard("toy", config, 5, torch.device("cpu"), at_once=False)
    guard.batch(torch.tensor(1.0), 0, 0)
    guard.epoch_end(0)
    for step, value in enumerate([1.0, float("inf"), float("nan"), 1.0]):
        guard.batch(torch.tensor(value), 1, step)
    with pytest.raises(TrainingDivergedError, match=r"non-finite \(NaN or infinity\) at epoch 2/3, step 2/5"):
        guard.epoch_end(1)


def test_a_repair_that_diverges_stops_with_the_same_error(suspect):
    model, config = suspect
    repair = RunConfig.from_dict(
        {**config.to_dict(), "defense": "nad", "defense_options": {"lr": 1e6, "epochs": 1, "teacher_epochs": 1}}
    )
    with pytest.raises(TrainingDivergedError, match=r"training \(NAD (teacher|student)\) diverged"):
        run(repair, suspect=model)


# --- case 1: broken suspect models and detector scores -------------------------------------------


def test_a_suspect_with_nan_weights_is_refused_before_any_work(suspect, tmp_path, monkeypatch):
    model, config = suspect
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")
    file = save_model(tmp_path / "nan.safetensors", broken, config)

    def no_work(*_args, **_kwargs):
        raise AssertionError("the data was prepared for a broken suspect")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "prepare", no_work)
        with pytest.raises(
            NonFiniteError, match=r"suspect model has NaN or infinite values in 1 of its tensors \(fc.weight\)"
        ):
            run(RunConfig.from_dict({**config.to_dict(), "defense": "fine_tuning"}), suspect=broken)
    for command in (["repair", str(file)], ["detect", str(file)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "error: the suspect model has NaN" in " ".join(result.output.split()), result.output


def test_a_non_finite_detector_score_is_an_error_never_a_score(suspect, monkeypatch):
    model, config = suspect

    cti = type(create_detector("cti"))
    monkeypatch.setattr(cti, "detect", lambda *_args, **_kwargs: Detection(float("nan"), False))  # a diverged inversion
    with pytest.raises(NonFiniteError, match="detector 'cti' gave a non-finite score"):
        run(RunConfig.from_dict({**config.to_dict(), "detector": "cti"}), suspect=model)


# --- case 1: health checks ----------------------------------------------------------------------


def test_health_check_thresholds():
    labels = torch.arange(100) % 10
    assert health_warnings(labels, labels) == [], "a perfect model"
    collapsed = health_warnings(torch.zeros(100, dtype=torch.long), labels)
    assert len(collapsed) == 2 and "predicts class 0 for 100%" in collapsed[0] and "at chance level" in collapsed[1]
    mostly = labels.clone()
    mostly[: int(100 * (COLLAPSE_SHARE - 0.05))] = 4
    assert not any("collapsed" in w for w in health_warnings(mostly, labels)), "below the collapse share"
    one_class = torch.full((50,), 3)
    assert health_warnings(one_class, one_class) == [], "a test set of one class, all right"
    assert repair_warnings(0.99, 0.99 - MAX_REPAIR_CA_DROP + 0.01) == []
    (lost,) = repair_warnings(0.99, 0.60)
    assert lost.startswith("repaired model: the repair lost 0.3900 of clean accuracy (0.9900 -> 0.6000)")


def test_a_healthy_run_carries_no_warning(suspect):
    model, config = suspect
    result = run(config, suspect=model)
    assert result.metrics["clean_accuracy"] > 0.9 and result.metrics["attack_success_rate"] > 0.9
    assert result.warnings == [] and result.to_dict()["warnings"] == []


def test_a_collapsed_model_is_flagged_in_the_result_and_the_table(suspect, tmp_path, capsys):
    model, config = suspect
    collapsed = copy.deepcopy(model)
    with torch.no_grad():
        collapsed.fc.bias[3] = 1e4  # every input goes to class 3
    result = run(config, suspect=collapsed)
    assert len(result.warnings) == 2
    assert result.warnings[0].startswith("model: predicts class 3 for 100% of the clean test set")
    assert result.warnings[1].startswith("model: clean accuracy 0.1") and "at chance level" in result.warnings[1]
    stored = json.loads(result.write(tmp_path / "run").read_text())
    assert stored["warnings"] == result.warnings
    _report(result, None, None)
    out = " ".join(capsys.readouterr().out.split())
    assert "check" in out and "WARNING" in out and "warning: model: predicts class 3 for 100%" in out


def test_evaluate_backdoor_warns_a_library_user_where_run_records_the_warnings(suspect):
    """The library's evaluate_backdoor says what run() records: a collapsed, chance-level model,
    and (given the suspect's metrics) a repair that lost more than the tolerated clean accuracy."""
    model, config = suspect
    prepared = run_module.prepare(config)
    sets = (prepared.test_set, prepared.triggered)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy model: no warning
        healthy = evaluate_backdoor(model, *sets)
    collapsed = copy.deepcopy(model)
    with torch.no_grad():
        collapsed.fc.bias[3] = 1e4  # every input goes to class 3
    with pytest.warns(HealthWarning) as caught:
        evaluate_backdoor(collapsed, *sets, suspect=healthy)
    messages = [str(w.message) for w in caught]
    assert messages[0].startswith("repaired model: predicts class 3 for 100% of the clean test set"), messages
    assert "at chance level" in messages[1] and messages[2].startswith("repaired model: the repair lost"), messages


def test_a_destructive_repair_is_flagged(suspect):
    model, config = suspect
    # prune every channel the trusted split allows (all of them), then one epoch can't bring CA back
    options = {"max_accuracy_drop": 0.99, "epochs": 1}
    result = run(
        RunConfig.from_dict({**config.to_dict(), "defense": "fine_pruning", "defense_options": options}), suspect=model
    )
    m = result.metrics
    assert m["suspect_clean_accuracy"] - m["clean_accuracy"] > MAX_REPAIR_CA_DROP
    assert any(w.startswith("repaired model: the repair lost") for w in result.warnings), result.warnings
    assert not any(w.startswith("suspect model:") for w in result.warnings), "the suspect was healthy"


# --- cases 1 and 9: sweeps, the store and the report ----------------------------------------------


def test_a_diverged_sweep_cell_is_stored_failed_with_its_message(tmp_path):
    grid = expand({"name": "lr", "dataset": "digits", "epochs": 2, "lr": [0.05, 1e6]})
    summary = sweep(grid, tmp_path, executor="inline")
    assert (summary.done, summary.failed) == (1, 1)
    with ResultStore(tmp_path) as store:
        (failed,) = store.records(status="failed")
        (done,) = store.records(status="done")
    assert failed.config["lr"] == 1e6 and failed.metrics is None
    assert "TrainingDivergedError: training (badnets on digits) diverged" in failed.error.strip().splitlines()[-1]
    assert done.config["lr"] == 0.05
    page = write_report(tmp_path, gallery=False).read_text()
    assert "Failed cells" in page and "diverged: the training loss is nan" in page


def test_the_store_and_report_show_warnings_and_hold_no_nan(tmp_path):
    cells = expand({"name": "flags", "dataset": "digits", "seed": [0, 1]}).cells
    warning = "model: predicts class 0 for 100% of the clean test set (its true share: 10%): a collapsed model"
    results = [
        {"metrics": {"clean_accuracy": 0.99, "attack_success_rate": 0.99, "robust_accuracy": 0.01}, "warnings": []},
        {
            "metrics": {"clean_accuracy": 0.1, "attack_success_rate": 1.0, "robust_accuracy": float("nan")},
            "warnings": [warning],
            "history": {"loss": [float("nan"), float("inf")]},
        },
    ]
    with ResultStore(tmp_path) as store:
        store.add("flags", cells)
        for cell, result in zip(cells, results, strict=True):
            store.finish(cell.key, {**result, "timings": {"total": 1.0}, "details": {}})
        records = store.records()
    assert [r.warnings for r in records] == [[], [warning]]
    with sqlite3.connect(tmp_path / "results.sqlite") as db:  # json_extract fails on NaN: it must work
        rows = db.execute(
            "SELECT json_extract(metrics, '$.robust_accuracy'), json_extract(result, '$.history.loss[1]'), "
            "json_extract(result, '$.warnings[0]') FROM cells ORDER BY position"
        ).fetchall()
        assert rows == [(0.01, None, None), (None, None, warning)]
        assert not any("NaN" in text or "Infinity" in text for (text,) in db.execute("SELECT result FROM cells"))
    exported = export_rows(records)
    assert [(r["flagged"], r["warnings"]) for r in exported] == [(False, None), (True, warning)]
    page = write_report(tmp_path, gallery=False).read_text()
    assert '<tr class="warned">' in page and "<h3>Warnings</h3>" in page and "1 of 2 cells" in page
    assert "predicts class 0 for 100%" in page


def test_result_json_holds_no_nan(tmp_path):
    assert finite_json({"a": [1.0, float("nan"), (float("-inf"), 2)], "b": "nan"}) == {
        "a": [1.0, None, [None, 2]],
        "b": "nan",
    }
    assert dumps_json({"x": float("inf")}) == '{"x": null}'
    result = RunResult(
        config={},
        seed=0,
        version="0",
        timings={"total": math.inf},
        metrics={"detection_score": math.nan},
        history={"loss": [math.nan, 1.0]},
    )
    text = result.write(tmp_path).read_text()
    assert "NaN" not in text and "Infinity" not in text
    stored = json.loads(text)
    assert stored["metrics"] == {"detection_score": None} and stored["history"]["loss"] == [None, 1.0]
    assert stored["warnings"] == [] and stored["timings"]["total"] is None

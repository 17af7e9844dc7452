from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from backdoorlab.cli import app, parse_size
from backdoorlab.defenses import TRAINING_DEFENSES
from backdoorlab.experiments.store import ResultStore

runner = CliRunner()


@pytest.mark.slow
def test_run_writes_result_json(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--epochs", "10", "--seed", "1", "--data-seed", "3", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "CA" in result.output and "ASR" in result.output and "seed 1, data seed 3" in result.output
    stored = json.loads((out / "result.json").read_text())
    assert stored["seed"] == 1 and stored["config"]["data_seed"] == 3 and stored["config"]["epochs"] == 10
    assert stored["metrics"]["attack_success_rate"] > 0.5


@pytest.mark.slow
def test_run_with_a_defense_reports_its_isolation(tmp_path):
    out = tmp_path / "abl"
    args = ["run", "--defense", "abl", "-d", "isolation_ratio=0.05", "--epochs", "3", "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "against abl" in result.output and "precision" in result.output
    assert "details: isolated=" in result.output and "isolation_loss_max=" in result.output, "the defense's scalars"
    stored = json.loads((out / "result.json").read_text())
    assert stored["config"]["defense_options"]["isolation_ratio"] == 0.05
    assert stored["metrics"]["isolated"] == round(0.05 * stored["data"]["train"])
    assert 0.0 <= stored["metrics"]["isolation_precision"] <= 1.0 and "defense" in stored["timings"]


def test_bad_input_is_a_clear_error_with_exit_code_2():
    cases = [
        (
            ["run", "--dataset", "imagenet"],
            "cifar10, digits, gtsrb, gunpoint, italypowerdemand, mnist, osuleaf; or a prefixed name: ucr:<Name>, sktime:<Name>, parquet:<PATH>, folder:<PATH>",
        ),
        (["run", "--attack", "trojan"], "valid attacks: adaptive_blend, adaptive_patch, badnet_rand, badnet_stripes"),
        (["run", "--target", "11"], "outside the dataset's classes 0..9"),
        (["run", "--poison-rate", "1.5"], "poison_rate 1.5 is neither a fraction in (0, 1] nor a count"),
        (["run", "--trusted-size", "0"], "trusted_size must be a fraction in (0, 1] or a count >= 2"),
        (["run", "-a", "shape=star"], "valid: size, pattern, position, margin"),
        (["list", "poisons"], "valid: datasets, models, recipes, presets, attacks, defenses"),
        (
            ["run", "--defense", "strip"],
            f"training-time defenses: {', '.join(TRAINING_DEFENSES.names())}; repair defenses: anp, bnp, clp, ep,",
        ),
        (["run", "--detector", "strip"], "valid detectors: cti, neural_cleanse"),
        (["run", "--defense", "abl", "-d", "ratio=0.1"], "valid: gamma, isolation_ratio"),
        (["run", "--dataset", "mnist[x]"], "unknown dataset 'mnist[x]'"),  # printed as is, not read as markup
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


@pytest.mark.slow
def test_saved_model_is_repaired_and_scored_from_the_command_line(tmp_path):
    model_file = tmp_path / "suspect.safetensors"
    result = runner.invoke(app, ["run", "--epochs", "10", "--trusted-size", "0.1", "--save-model", str(model_file)])
    assert result.exit_code == 0, result.output

    out = tmp_path / "repair"
    args = ["repair", str(model_file), "--defense", "fine_tuning", "-d", "epochs=5", "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "suspect" in result.output and "repaired" in result.output
    stored = json.loads((out / "result.json").read_text())
    assert stored["config"]["defense"] == "fine_tuning" and stored["config"]["epochs"] == 10
    assert stored["metrics"]["suspect_attack_success_rate"] > 0.5, "the stored model is the backdoored one"
    assert "train" not in stored["timings"], "nothing was retrained"
    assert len(stored["details"]["persistence"]) == 6

    out = tmp_path / "detect"
    args = ["detect", str(model_file), "--detector", "neural_cleanse", "-x", "steps=5", "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "result.json").read_text())
    indices = stored["details"]["detection"]["anomaly_indices"]
    assert len(indices) == 10 and stored["metrics"]["detection_score"] == pytest.approx(max(indices), abs=1e-3)


def test_model_file_errors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a model")
    for path, message in [
        (tmp_path / "missing.safetensors", "does not exist"),
        (garbage, "is not a safetensors model file"),
    ]:
        result = runner.invoke(app, ["detect", str(path)])
        assert result.exit_code == 2 and message in " ".join(result.output.split())
        assert path.name in result.output.replace("\n", "")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the held-out share has")  # 14 held-out digits: Pivotal Tuning says so, rightly
def test_detectability_study_runs_from_the_command_line_and_resumes(tmp_path):
    out = tmp_path / "study"
    args = [
        "detectability",
        "--output",
        str(out),
        "--rates",
        "0.1",
        "--seeds",
        "0",
        "--clean-seeds",
        "1,2",
        "--epochs",
        "8",
    ]
    args += ["--trusted-size", "0.1", "--repair", "pivotal_tuning", "-d", "steps=40", "-d", "eval_every=10"]
    args += ["--detectors", "cti", "-x", "cti.steps=10"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "detectability.json").read_text())
    assert row["poison_rate"] == 0.1 and row["n"] == 1 and row["asr"] > 0.8 and row["detector"] == "cti"
    # One backdoored model against two clean ones: the AUROC is the share of clean scores below its
    # score (ties count half) and the exact one-sided p-value is (clean scores at or above it + 1) / 3.
    with ResultStore(out) as store:
        records = store.records()
    assert len(records) == 3 and all(r.status == "done" for r in records), "one repaired-and-scored cell per model"
    clean = [r.metrics["detection_score"] for r in records if r.config["poison_rate"] == 0]
    [backdoored] = [r for r in records if r.config["poison_rate"] == 0.1]
    suspect = backdoored.metrics["detection_score"]
    assert row["auroc"] == pytest.approx(sum((c < suspect) + 0.5 * (c == suspect) for c in clean) / 2)
    assert row["p"] == pytest.approx((sum(c >= suspect for c in clean) + 1) / 3)
    assert "| 10% | 1 |" in result.output and (out / "detectability.md").read_text().startswith("| poison rate |")
    assert backdoored.config["detector_options"]["steps"] == 10 and backdoored.config["data_seed"] == 0
    details = backdoored.result["details"]  # the repair's own: Pivotal Tuning's held-out curve and the step it kept
    assert details["held_out_size"] > 0 and details["chosen_step"] in [p["step"] for p in details["held_out_curve"]]
    assert details["detection"]["calibrated_with_the_runs_repair"], "CTI did not repair the suspect again"
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and json.loads((out / "detectability.json").read_text()) == [row], (
        "stored models reused"
    )
    for bad, message in [
        (["-x", "steps=10"], "names no detector: write DETECTOR.KEY=VALUE"),
        (["--rates", "0.1,x"], "--rates takes comma-separated floats"),
        (["--detectors", "strip"], "valid detectors: cti, neural_cleanse"),
        (
            ["--detectors", "cti", "-x", "neural_cleanse.steps=5"],
            "options for neural_cleanse, which --detectors (cti) does not run",
        ),
        (["--rates", ","], "needs at least one poison rate"),
    ]:
        result = runner.invoke(app, ["detectability", "--output", str(tmp_path / "bad"), *bad])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (bad, result.output)


def test_list_shows_every_registry():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for name in (
        "digits",
        "cifar10",
        "airbench",
        "preact_resnet18",
        "badnets",
        "blended",
        "abl",
        "pivotal_tuning",
        "cti",
    ):
        assert name in result.output


def test_show_trigger_writes_a_two_row_png(tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["show-trigger", "--count", "4", "--output", str(out), "-a", "size=3"])
    assert result.exit_code == 0, result.output
    # 8x8 digits enlarged 12x to 96 px, 4 columns and 2 rows with 2 px padding
    assert Image.open(out).size == (4 * 98 + 2, 2 * 98 + 2)


def test_parse_size():
    assert parse_size("0.1") == 0.1 and parse_size("500") == 500 and parse_size(None) is None


@pytest.mark.slow
def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "backdoorlab", "list", "attacks"], capture_output=True, text=True)
    assert proc.returncode == 0 and "badnets" in proc.stdout


@pytest.mark.slow
def test_the_command_line_logs_progress_lines_when_stderr_is_not_a_terminal():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("BACKDOORLAB_PROGRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "backdoorlab", "run", "--dataset", "digits", "--epochs", "2", "--train-size", "300"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\d\d:\d\d:\d\d badnets on digits: epoch 2/2 loss [\d.]+ acc [\d.]+ \(", proc.stderr, re.M), (
        proc.stderr
    )

"""Input detection at inference: an input detector calibrated on trusted clean data, shown the clean
and triggered test sets mixed (``evaluation.assess_input_detector``), and STRIP."""

from __future__ import annotations

import pytest
import torch

from backdoorlab.attacks.poisoning import TriggeredTestSet
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses import INPUT_DETECTORS, DefenseWarning, InputDetector
from backdoorlab.evaluation import assess_input_detector
from backdoorlab.experiments import RunConfig, run
from backdoorlab.registry import UnknownNameError


class MeanBrightness(InputDetector):
    """Scores an input by its mean value: the white patch of the test below raises it."""

    def fit(self, model, trusted, ctx):  # noqa: ANN001, ANN201
        self.fitted = len(trusted)

    def score(self, inputs):  # noqa: ANN001, ANN201
        return inputs.float().flatten(1).mean(1)


class Constant(torch.nn.Module):
    def forward(self, x):  # noqa: ANN001, ANN201
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 3).float()


def dataset(inputs: torch.Tensor) -> TensorDataset:
    labels = torch.zeros(len(inputs), dtype=torch.long)
    return TensorDataset(inputs, labels, ("a", "b", "c"), (0.5,), (0.25,), "toy")


def test_the_threshold_comes_from_calibration_data_and_flagged_inputs_are_rejected():
    generator = torch.Generator().manual_seed(0)
    clean = (torch.rand(200, 1, 4, 4, generator=generator) * 100).to(torch.uint8)
    stamped = clean[:100].clone()
    stamped[:, :, :2, :2] = 255
    triggered = TriggeredTestSet(stamped, torch.ones(100, dtype=torch.long), torch.zeros(100, dtype=torch.long))
    calibration = dataset((torch.rand(100, 1, 4, 4, generator=generator) * 100).to(torch.uint8))
    metrics = assess_input_detector(MeanBrightness(), Constant(), dataset(clean), triggered, calibration)
    assert metrics["input_auroc"] == 1.0 and metrics["input_tpr"] == 1.0
    assert metrics["input_fpr"] <= 0.12, "the 95th percentile of the calibration scores: about 5% of clean inputs"
    assert metrics["filtered_attack_success_rate"] == 0.0, "every triggered input is rejected"
    assert metrics["filtered_clean_accuracy"] == pytest.approx(1 - metrics["input_fpr"]), (
        "rejected clean inputs count as wrong"
    )
    with pytest.warns(DefenseWarning, match="threshold is set on 10 trusted clean inputs.*at least 40"):
        assess_input_detector(MeanBrightness(), Constant(), dataset(clean), triggered, dataset(clean[:10]))
    # the final evaluation's predictions, passed in, give the same metrics without predicting again
    made = torch.zeros(300, dtype=torch.long)  # what Constant predicts for the 200 clean and 100 triggered
    again = assess_input_detector(
        MeanBrightness(), Constant(), dataset(clean), triggered, calibration, predictions=made
    )
    assert {k: v for k, v in again.items() if "seconds" not in k} == {
        k: v for k, v in metrics.items() if "seconds" not in k
    }
    with pytest.raises(ValueError, match="299 predictions given for 300 test inputs"):
        assess_input_detector(
            MeanBrightness(), Constant(), dataset(clean), triggered, calibration, predictions=made[1:]
        )


def test_unknown_input_detectors_and_stray_options_are_refused_with_the_valid_names():
    with pytest.raises(UnknownNameError, match="unknown input detector 'strp'.*strip"):
        RunConfig(input_detector="strp").resolved()
    with pytest.raises(ValueError, match="input_detector_options .* given without an input_detector"):
        RunConfig(input_detector_options={"overlays": 5}).resolved()
    with pytest.raises(ValueError, match="unknown option.*overlay.*valid: overlays"):
        RunConfig(input_detector="strip", input_detector_options={"overlay": 5}).resolved()
    assert INPUT_DETECTORS.names() == ["beatrix", "cognitive_distillation", "sentinet", "strip", "teco"]


@pytest.mark.slow
def test_strip_flags_badnets_inputs_and_a_clean_models_inputs_stay_near_the_nominal_rate():
    """Digits, BadNets at 10%, a 30% trusted split (215 to superimpose, 216 to set the threshold on).
    Measured (1 thread): backdoored AUROC 0.997, TPR 0.981 at FPR 0.050, filtered ASR 0.019 at CA
    0.939; clean model: 8% of the stamped inputs flagged (nominal 5%), 4% of clean ones."""
    base = dict(dataset="digits", input_detector="strip", trusted_size=0.3, device="cpu")
    backdoored = run(RunConfig(**base)).metrics
    assert backdoored["attack_success_rate"] > 0.9
    assert backdoored["input_auroc"] >= 0.9 and backdoored["input_tpr"] >= 0.9, backdoored
    assert backdoored["filtered_attack_success_rate"] < 0.1
    assert backdoored["filtered_clean_accuracy"] > backdoored["clean_accuracy"] - 0.1
    clean = run(RunConfig(**base, poison_rate=0.0)).metrics
    assert clean["input_tpr"] <= 0.15 and clean["input_fpr"] <= 0.15, clean


@pytest.mark.slow
def test_strip_scores_series_by_superimposing_series():
    """GunPoint, ``ts_pattern`` at 10%; to fit CI, FCN for 40 epochs instead of 100 and 10 overlays
    instead of 100. Measured at 100 epochs and 20 overlays: AUROC 0.966; a clean model scores the
    stamped series as apart (AUROC 0.974, docs/detection.md): on this binary set STRIP's signal is
    the pattern, not the backdoor. The threshold rests on 8 series, and the run says so."""
    pytest.importorskip("sktime", reason="the timeseries extra (sktime) is not installed")
    config = RunConfig(
        dataset="gunpoint",
        attack="ts_pattern",
        input_detector="strip",
        input_detector_options={"overlays": 10},
        trusted_size=0.3,
        epochs=40,
        device="cpu",
    )
    with pytest.warns(DefenseWarning, match="threshold is set on 8 trusted clean inputs"):
        metrics = run(config).metrics
    assert metrics["attack_success_rate"] > 0.9 and metrics["input_auroc"] >= 0.9, metrics


@pytest.mark.slow
def test_detect_inputs_scores_a_saved_models_inputs_from_the_command_line(tmp_path):
    """``run --save-model`` then ``detect-inputs``: the same data, trusted split and trigger are rebuilt
    from the stored config, and the table gives the detector's figures."""
    from typer.testing import CliRunner

    from backdoorlab.cli import app

    runner = CliRunner()
    model = tmp_path / "digits.safetensors"
    saved = runner.invoke(app, ["run", "--trusted-size", "0.3", "--device", "cpu", "--save-model", str(model)])
    assert saved.exit_code == 0, saved.output
    scored = runner.invoke(app, ["detect-inputs", str(model), "-y", "overlays=20", "--output", str(tmp_path / "out")])
    assert scored.exit_code == 0, scored.output
    assert "AUROC" in scored.output
    result = (tmp_path / "out" / "result.json").read_text()
    assert '"input_detector": "strip"' in result and '"overlays": 20' in result
    refused = runner.invoke(app, ["detect-inputs", str(model), "--input-detector", "strp"])
    assert refused.exit_code != 0 and "strip" in refused.output


def test_the_report_tables_show_the_input_detection_metrics():
    from backdoorlab.experiments.store import Record
    from backdoorlab.report.tables import summarize

    metrics = {
        "clean_accuracy": 0.99,
        "attack_success_rate": 1.0,
        "input_auroc": 0.97,
        "filtered_attack_success_rate": 0.02,
    }
    cell = {"key": "k", "grid": "g", "position": 0, "label": "strip", "seed": 0, "status": "done", "attempts": 1}
    none = dict.fromkeys(("error", "model_path", "started", "finished", "result"))
    record = Record(**cell, config={"input_detector": "strip"}, version="0", metrics=metrics, timings={}, **none)
    summary = summarize("g", [record])
    titles = dict(summary.metrics)
    assert titles["input_auroc"] == "input AUROC" and titles["filtered_attack_success_rate"] == "filtered ASR"
    assert summary.rows[0]["input_auroc"] == (0.97, 0.0)

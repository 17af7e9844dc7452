"""The robustness-detectability study: its summary and plot from stored per-model results, and
one small real study on digits."""

from __future__ import annotations

import pytest

from backdoorlab.experiments import RunConfig
from backdoorlab.experiments.detectability import detectability_study, plot, summarize


def stored(asr_before: float, asr_after: float, cti: float) -> dict:
    return {
        "metrics": {"suspect_attack_success_rate": asr_before, "repaired_attack_success_rate": asr_after, "repaired_clean_accuracy": 0.9},
        "scores": {"cti": cti},
    }  # fmt: skip


def test_summary_gives_mean_asr_and_auroc_per_rate(tmp_path):
    results = {
        0.0: [stored(0.01, 0.01, 0.1), stored(0.02, 0.01, 0.3)],
        0.01: [stored(0.5, 0.1, 0.2), stored(0.7, 0.3, 0.25)],  # scores between the clean ones: AUROC 0.5
        0.1: [stored(1.0, 0.9, 0.8), stored(1.0, 0.7, 0.9)],  # above every clean one: AUROC 1
    }
    rows = summarize(results)
    assert [r["poison_rate"] for r in rows] == [0.01, 0.1]
    assert rows[0]["asr_before"] == pytest.approx(0.6) and rows[1]["asr_after"] == pytest.approx(0.8)
    assert rows[0]["auroc_cti"] == pytest.approx(0.5) and rows[1]["auroc_cti"] == 1.0
    path = plot(rows, tmp_path / "study.png")
    assert path.stat().st_size > 1000


@pytest.mark.slow
def test_a_small_study_runs_end_to_end_and_resumes(tmp_path):
    base = RunConfig(dataset="digits", epochs=8, trusted_size=0.1)
    options = {"repair": "fine_tuning", "repair_options": {"epochs": 3}, "detectors": ("cti",)}
    results = detectability_study(base, [0.1], seeds=[0], clean_seeds=[1], output=tmp_path, **options)
    backdoored, clean = results[0.1][0], results[0.0][0]
    assert backdoored["metrics"]["suspect_attack_success_rate"] > 0.8 > clean["metrics"]["suspect_attack_success_rate"]
    assert set(backdoored["scores"]) == {"cti"} and backdoored["config"]["poison_rate"] == 0.1
    again = detectability_study(base, [0.1], seeds=[0], clean_seeds=[1], output=tmp_path, **options)
    assert again == results, "stored results are reused"
    with pytest.raises(Exception, match="valid detectors"):
        detectability_study(base, [0.1], [0], [1], tmp_path / "x", detectors=("strip",))

"""The robustness-detectability study: its summary and plot from stored per-model results, and
one small real study on digits."""

from __future__ import annotations

from dataclasses import replace

import pytest

from backdoorlab.experiments import RunConfig, detectability
from backdoorlab.experiments.detectability import detectability_study, summarize
from backdoorlab.report.plots import detectability_plot


def stored(asr_before: float, asr_after: float, cti: float) -> dict:
    return {
        "metrics": {
            "suspect_attack_success_rate": asr_before,
            "repaired_attack_success_rate": asr_after,
            "repaired_clean_accuracy": 0.9,
        },
        "scores": {"cti": cti},
    }


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
    # two against two, perfectly separated: 1 of the C(4, 2) = 6 equally likely orderings
    assert rows[1]["p_cti"] == pytest.approx(1 / 6) and rows[0]["p_cti"] > 0.5
    path = detectability_plot(rows, tmp_path / "study.png")
    assert path.stat().st_size > 1000


@pytest.mark.slow
def test_a_small_study_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    base = RunConfig(dataset="digits", epochs=8, trusted_size=0.1)
    options = {"repair": "fine_tuning", "repair_options": {"epochs": 3}, "detectors": ("cti",)}
    results = detectability_study(base, [0.1], seeds=[0], clean_seeds=[1], output=tmp_path, **options)
    backdoored, clean = results[0.1][0], results[0.0][0]
    assert backdoored["metrics"]["suspect_attack_success_rate"] > 0.8 > clean["metrics"]["suspect_attack_success_rate"]
    assert set(backdoored["scores"]) == {"cti"} and backdoored["config"]["poison_rate"] == 0.1
    class_scores = backdoored["detector_details"]["cti"]["class_scores"]
    assert len(class_scores) == 10 and max(class_scores) == pytest.approx(backdoored["scores"]["cti"], abs=1e-4)
    again = detectability_study(base, [0.1], seeds=[0], clean_seeds=[1], output=tmp_path, **options)
    assert again == results, "stored results are reused"
    # a detector asked for later scores the stored models: nothing is trained again
    monkeypatch.setattr(detectability, "train_victim", lambda prepared: pytest.fail("trained again"))
    nc = {"neural_cleanse": {"steps": 20}}
    more = detectability_study(
        base, [0.1], [0], [1], tmp_path, **{**options, "detectors": ("cti", "neural_cleanse"), "detector_options": nc}
    )
    assert more[0.1][0]["scores"]["cti"] == backdoored["scores"]["cti"] and "neural_cleanse" in more[0.1][0]["scores"]
    assert set(more[0.1][0]["detector_details"]) == {"cti", "neural_cleanse"}
    assert set(summarize(more)[0]) >= {"auroc_cti", "auroc_neural_cleanse"}
    with pytest.raises(ValueError, match="another config"):
        detectability_study(replace(base, epochs=9), [0.1], [0], [1], tmp_path, **options)
    with pytest.raises(ValueError, match="repaired with fine_tuning"):
        detectability_study(base, [0.1], [0], [1], tmp_path, **{**options, "repair_options": {"epochs": 4}})
    with pytest.raises(Exception, match="valid detectors"):
        detectability_study(base, [0.1], [0], [1], tmp_path / "x", detectors=("strip",))
    with pytest.raises(ValueError, match="unknown option.*batchsize.*valid: steps"):
        detectability_study(
            base, [0.1], [0], [1], tmp_path / "y", detectors=("cti",), detector_options={"cti": {"batchsize": 32}}
        )
    assert not (tmp_path / "y").exists(), "bad options fail before any training"
    with pytest.raises(ValueError, match="its own repair"):
        detectability_study(
            base, [0.1], [0], [1], tmp_path / "z", detectors=("cti",), detector_options={"cti": {"repair": "nad"}}
        )


@pytest.mark.slow
@pytest.mark.heavy
def test_cti_separates_backdoored_from_clean_models_on_mnist(data_root, tmp_path):
    """The study's population, trimmed to fit CI: 3 clean models and 3 with BadNets at 10% (other
    seeds; perfect separation of 3 from 3 has p = 1/20), MNIST 6k, 5% trusted, all on one training subset and trusted split (the study's
    ``data_seed=0``), so the two groups differ in poison and training seed alone. CTI is calibrated
    with fine-tuning (Pivotal Tuning leaves the backdoor in small_cnn, docs/defenses.md) and inverts
    with batch 32 instead of 128 to fit CI. Measured (2026-12-06, one thread): clean 0.66-0.74,
    backdoored 0.95-0.98 over 4 + 4 (a fifth model each: 0.76 and 0.98); at 10k images the margin
    was 0.03. About 2.5 minutes on 2 cores."""
    base = RunConfig(
        dataset="mnist", recipe="quick", train_size=6_000, test_size=2_000, trusted_size=0.05, data_root=str(data_root)
    )
    results = detectability_study(
        base,
        [0.1],
        seeds=range(3),
        clean_seeds=range(100, 103),
        output=tmp_path,
        repair="fine_tuning",
        detectors=("cti",),
        detector_options={"cti": {"batch_size": 32}},
    )
    (row,) = summarize(results)
    scores = {rate: [round(m["scores"]["cti"], 3) for m in models] for rate, models in results.items()}
    assert row["asr_before"] >= 0.9, f"the backdoor must take: {row}"
    assert row["auroc_cti"] >= 0.9, f"CTI scores by poison rate: {scores}"

"""The robustness-detectability study as a grid: its cells, its rows and table from the results
store, a detector that scores the suspect in a run that repairs it (CTI calibrated with that very
repair), and one small real study on digits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from backdoorlab.defenses.fine_tuning import FineTuning
from backdoorlab.experiments import RunConfig, run
from backdoorlab.experiments.detectability import detectability_grid, detectability_study
from backdoorlab.experiments.grid import Cell, cell_key, suspect_key
from backdoorlab.experiments.store import ResultStore
from backdoorlab.report.tables import detectability, detectability_table

BASE = RunConfig(dataset="digits", epochs=8, trusted_size=0.1)
FT = {"repair": "fine_tuning", "repair_options": {"epochs": 3}}


def test_the_grid_has_a_repair_cell_with_cti_and_a_cell_per_other_detector():
    grid = detectability_grid(BASE, [0.05, 0.1], seeds=[0, 1], clean_seeds=[7], **FT)
    assert len(grid.cells) == (2 * 2 + 1) * 2, "a repaired-and-CTI cell and a Neural Cleanse cell per model"
    assert grid.name == "detectability (fine_tuning: epochs=3)", "studies of other repairs report apart"
    assert detectability_grid(BASE, [0.1], [0], [1]).name == "detectability"
    repaired = [c.config for c in grid.cells if c.config.defense == "fine_tuning"]
    assert {c.detector for c in repaired} == {"cti"}
    cti = repaired[0].detector_options
    assert (cti["repair"], cti["repair_options"]) == ("fine_tuning", {"epochs": 3}), "CTI calibrates with the repair"
    scored = [c.config for c in grid.cells if c.config.defense is None]
    assert {c.detector for c in scored} == {"neural_cleanse"}
    assert {c.config.data_seed for c in grid.cells} == {0}, "every model on one training subset and trusted split"
    assert sorted({(c.config.poison_rate, c.config.seed) for c in grid.cells}) == [
        (0.0, 7),
        (0.05, 0),
        (0.05, 1),
        (0.1, 0),
        (0.1, 1),
    ]
    # each model's two cells share one suspect: the sweep trains it once
    pairs = {}
    for cell in grid.cells:
        pairs.setdefault((cell.config.poison_rate, cell.config.seed), set()).add(suspect_key(cell.config))
    assert all(len(keys) == 1 for keys in pairs.values())
    # under a preset, CTI's calibration is the cell's repair with the preset's options, so it is reused
    [preset_cell] = detectability_grid(
        replace(BASE, preset="backdoorbench"), [0.1], [0], [1], detectors=["cti"], **FT
    ).cells[:1]
    assert preset_cell.config.detector_options["repair_options"] == preset_cell.config.defense_options
    assert preset_cell.config.defense_options["weight_decay"] == 5e-4, "BackdoorBench's fine-tuning options"
    only_nc = detectability_grid(BASE, [0.1], [0], [7], detectors=["neural_cleanse"], **FT)
    assert [(c.config.defense, c.config.detector) for c in only_nc.cells] == [
        ("fine_tuning", None),
        (None, "neural_cleanse"),
    ] * 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"detectors": ["strip"]}, "valid detectors"),
        ({"detectors": ["cti"], "detector_options": {"cti": {"batchsize": 32}}}, "unknown option.*batchsize"),
        ({"detectors": ["cti"], "detector_options": {"cti": {"repair": "nad"}}}, "its own repair"),
        ({"detectors": ["cti"], "detector_options": {"neural_cleanse": {"steps": 5}}}, "options for neural_cleanse"),
        ({"repair": "abl"}, "'abl' is a training defense, not a repair"),
        ({"rates": []}, "at least one poison rate"),
    ],
)
def test_a_bad_study_is_refused_before_any_cell(options, message):
    rates = options.pop("rates", [0.1])
    with pytest.raises(Exception, match=message):
        detectability_grid(BASE, rates, [0], [1], **options)


def _store_with(tmp_path: Path, cells: list[tuple[RunConfig, dict]]) -> list:
    with ResultStore(tmp_path) as store:
        made = [
            Cell(config.resolved(), cell_key(config.resolved()), f"cell {i}") for i, (config, _) in enumerate(cells)
        ]
        store.add("study", made)
        for cell, (_, metrics) in zip(made, cells, strict=True):
            store.finish(cell.key, {"metrics": metrics, "timings": {"total": 1.0}})
        return store.records()


def test_rows_and_table_count_each_suspect_once_and_take_scores_from_repair_cells(tmp_path):
    """CTI's score sits in the repair cell (it scores the suspect there), Neural Cleanse's in its
    own; the ASR before comes from both cells of a model and counts once."""
    cells = []
    for rate, seed, asr, after, cti, nc in [
        (0.0, 100, 0.01, 0.01, 0.1, 1.0),
        (0.0, 101, 0.02, 0.01, 0.3, 2.0),
        (0.1, 0, 1.0, 0.9, 0.8, 1.5),
        (0.1, 1, 0.8, 0.7, 0.9, 3.0),
    ]:
        model = replace(BASE, poison_rate=rate, seed=seed)
        repaired = {"suspect_attack_success_rate": asr, "attack_success_rate": after, "clean_accuracy": 0.9}
        cells.append((replace(model, defense="fine_tuning", detector="cti"), {**repaired, "detection_score": cti}))
        cells.append((replace(model, detector="neural_cleanse"), {"attack_success_rate": asr, "detection_score": nc}))
    rows = detectability(_store_with(tmp_path, cells))
    by = {r["detector"]: r for r in rows}
    assert set(by) == {"cti", "neural_cleanse"}
    assert by["cti"]["auroc"] == 1.0 and by["cti"]["p"] == pytest.approx(1 / 6), "2 above 2: 1 of C(4, 2) orders"
    assert by["neural_cleanse"]["auroc"] == pytest.approx(0.75)  # 1.5 beats one clean score of two
    for row in rows:
        assert row["asr"] == pytest.approx(0.9) and row["asr_repaired"] == pytest.approx(0.8)
        assert row["ca_repaired"] == pytest.approx(0.9) and (row["n"], row["n_clean"]) == (2, 2)
    table = detectability_table(rows).splitlines()
    assert table[0] == (
        "| poison rate | models | ASR before | ASR after | CA after | AUROC cti (p) | AUROC neural_cleanse (p) | warnings |"
    )
    assert table[2] == "| 10% | 2 | 0.900 | 0.800 | 0.900 | 1.00 (0.17) | 0.75 (0.33) |  |"
    pytest.importorskip("matplotlib")
    from backdoorlab.report.plots import detectability_plot

    assert detectability_plot(rows, tmp_path / "study.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_detector_in_a_repair_run_scores_the_suspect_and_cti_reuses_the_repair(monkeypatch):
    """Neural Cleanse in a run that fine-tunes gives the score it gives the suspect alone; CTI
    calibrated with the run's own repair does not repair a second time."""
    config = RunConfig(dataset="digits", epochs=4, trusted_size=0.1)
    nc = {"steps": 10}
    alone = run(replace(config, detector="neural_cleanse", detector_options=nc))
    repaired = run(
        replace(
            config, defense="fine_tuning", detector="neural_cleanse", detector_options=nc, defense_options={"epochs": 2}
        )
    )
    assert repaired.metrics["detection_score"] == pytest.approx(alone.metrics["detection_score"])
    assert repaired.metrics["suspect_attack_success_rate"] == pytest.approx(alone.metrics["attack_success_rate"])
    calls = []
    original = FineTuning.repair
    monkeypatch.setattr(FineTuning, "repair", lambda self, *a: calls.append(1) or original(self, *a))
    cti = {"steps": 5, "repair": "fine_tuning", "repair_options": {"epochs": 2}}
    result = run(
        replace(config, defense="fine_tuning", defense_options={"epochs": 2}, detector="cti", detector_options=cti)
    )
    assert len(calls) == 1 and result.details["detection"]["calibrated_with_the_runs_repair"]
    other = run(
        replace(config, defense="fine_tuning", defense_options={"epochs": 1}, detector="cti", detector_options=cti)
    )
    assert len(calls) == 3 and "calibrated_with_the_runs_repair" not in other.details["detection"], (
        "another repair's output is not CTI's calibration"
    )


@pytest.mark.slow
def test_a_small_study_runs_into_a_store_and_resumes(tmp_path):
    options = {**FT, "detectors": ("cti",), "detector_options": {"cti": {"steps": 10}}}
    summary, records = detectability_study(BASE, [0.1], [0], [1], tmp_path, executor="inline", **options)
    assert (summary.done, summary.failed) == (2, 0)
    [row] = detectability(records)
    assert row["asr"] > 0.8 and row["repair"] == "fine_tuning" and (row["n"], row["n_clean"]) == (1, 1)
    backdoored = next(r for r in records if r.config["poison_rate"] == 0.1)
    assert backdoored.result["details"]["detection"]["calibrated_with_the_runs_repair"]
    class_scores = backdoored.result["details"]["detection"]["class_scores"]
    assert len(class_scores) == 10 and max(class_scores) == pytest.approx(
        backdoored.metrics["detection_score"], abs=1e-4
    )
    again, _ = detectability_study(BASE, [0.1], [0], [1], tmp_path, executor="inline", **options)
    assert (again.done, again.skipped) == (0, 2), "finished cells are kept"
    # a detector added later scores the stored suspects: nothing is trained again
    nc = {
        **options,
        "detectors": ("cti", "neural_cleanse"),
        "detector_options": {"cti": {"steps": 10}, "neural_cleanse": {"steps": 10}},
    }
    more, records = detectability_study(BASE, [0.1], [0], [1], tmp_path, executor="inline", **nc)
    assert (more.done, more.skipped) == (2, 2)
    added = [r for r in records if r.config["detector"] == "neural_cleanse"]
    assert all(r.result["details"]["suspect"]["reused"] for r in added), "the suspects were read from the store"
    assert {r["detector"] for r in detectability(records)} == {"cti", "neural_cleanse"}
    other = detectability_grid(replace(BASE, epochs=9), [0.1], [0], [1], **options)
    assert {c.key for c in other.cells}.isdisjoint(r.key for r in records), (
        "another config is other cells, never a reuse"
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
    _, records = detectability_study(
        base,
        [0.1],
        seeds=range(3),
        clean_seeds=range(100, 103),
        output=tmp_path,
        executor="inline",
        repair="fine_tuning",
        detectors=("cti",),
        detector_options={"cti": {"batch_size": 32}},
    )
    (row,) = detectability(records)
    scores = [(r.config["poison_rate"], round(r.metrics["detection_score"], 3)) for r in records]
    assert row["asr"] >= 0.9, f"the backdoor must take: {row}"
    assert row["auroc"] >= 0.9, f"CTI scores by poison rate: {scores}"

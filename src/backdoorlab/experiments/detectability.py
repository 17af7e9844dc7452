"""The robustness-detectability study of "Pick your Poison" (Lukas & Kerschbaum 2023), as a grid.

For one attack and a range of poison rates, each backdoored model (several seeds per rate) and each
clean model (poison rate 0, other seeds; by default all on one training subset and trusted split) is

- **repaired** with Pivotal Tuning (or another repair): its ASR before and after is the attack's
  robustness at that rate;
- **scored** by detectors on the suspect model (CTI, calibrated with that same repair, and Neural
  Cleanse): the ROC AUC of the backdoored models' scores at a rate against the clean models'
  scores is the attack's detectability at that rate.

:func:`detectability_grid` writes this as grid cells: per model, one cell that repairs it and scores
it with CTI (which calibrates with the cell's own repair instead of repeating it), and one cell per
other detector. :func:`detectability_study` sweeps them into a results store, where they resume,
report and export like any grid's; the sweep trains each model once for its cells
(``OUTPUT/suspects/``). The rows, the table and the plot come from the store
(:func:`backdoorlab.report.tables.detectability`, ``detectability_table``,
:func:`backdoorlab.report.plots.detectability_plot`). ``backdoorlab detectability`` runs it from the
command line; ``examples/detectability.yaml`` is the same study as a grid file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from backdoorlab.defenses import create_detector, defense_kind
from backdoorlab.experiments.config import RunConfig
from backdoorlab.experiments.grid import Cell, Grid, cell_key
from backdoorlab.experiments.store import Record, ResultStore
from backdoorlab.experiments.sweep import SweepSummary, sweep

#: The study's grid name in its store (:func:`study_name`).
STUDY_GRID = "detectability"


def study_name(repair: str, repair_options: dict[str, Any] | None = None) -> str:
    """The study's grid name in its store: ``detectability``, then the repair where it is not
    Pivotal Tuning at its defaults (``detectability (pivotal_tuning: steps=600)``), so that studies
    of other repairs written into one store report and summarise apart."""
    if repair == "pivotal_tuning" and not repair_options:
        return STUDY_GRID
    options = ", ".join(f"{k}={v}" for k, v in (repair_options or {}).items())
    return f"{STUDY_GRID} ({repair}{': ' + options if options else ''})"


def detectability_grid(
    base: RunConfig,
    rates: Sequence[float],
    seeds: Sequence[int],
    clean_seeds: Sequence[int],
    *,
    data_seed: int | None = 0,
    repair: str = "pivotal_tuning",
    repair_options: dict[str, Any] | None = None,
    detectors: Sequence[str] = ("cti", "neural_cleanse"),
    detector_options: dict[str, dict[str, Any]] | None = None,
    name: str | None = None,
) -> Grid:
    """The study's cells: for every rate x seed, and for ``clean_seeds`` at rate 0, a cell that
    repairs the model with ``repair`` and, where ``detectors`` has CTI, scores the suspect with CTI
    calibrated by that repair; then one cell per other detector. ``detector_options``: options by
    detector name (``{"cti": {"batch_size": 32}}``); ``name``: the grid's (default
    :func:`study_name`). Every cell is resolved (names, options,
    sizes checked) before anything trains.

    ``data_seed`` (it replaces ``base.data_seed``) draws one training subset and trusted split for
    every model, so clean and backdoored models differ in training seed and poison alone, as the
    paper's clean models do. ``None`` gives each model the split of its own seed; then a detector's
    clean baseline moves with the split (docs/notes/2026-11-23-detectability-study.md: CTI scored
    clean models 0.51-0.89 on four splits) and an AUROC measures the splits as much as the poison."""
    if not (rates and seeds and clean_seeds):
        raise ValueError("a detectability study needs at least one poison rate, one seed and one clean seed")
    if not detectors:
        raise ValueError("a detectability study needs at least one detector")
    options = {d: dict((detector_options or {}).get(d, {})) for d in detectors}
    unused = sorted(set(detector_options or {}) - set(detectors))
    if unused:
        raise ValueError(
            f"options for {', '.join(unused)}, which the study's detectors ({', '.join(detectors)}) do not run"
        )
    if {"repair", "repair_options"} & set(options.get("cti", {})):
        raise ValueError(
            "the study calibrates CTI with its own repair: pass repair= and repair_options= to the study, "
            "not in detector_options"
        )
    for detector in detectors:
        create_detector(detector, **options[detector])  # a bad name or option, before any cell is built
    if defense_kind(repair) != "repair":
        raise ValueError(f"'{repair}' is a {defense_kind(repair)} defense, not a repair")
    repair_options = dict(repair_options or {})
    # CTI calibrates with the repair cells' repair as they resolve it (a preset's options included,
    # the same for every rate and seed), so that it takes the cell's repair instead of repeating it
    repaired_options = replace(base, defense=repair, defense_options=repair_options).resolved().defense_options
    cti = {**options.get("cti", {}), "repair": repair, "repair_options": repaired_options}
    cells: list[Cell] = []
    for rate, rate_seeds in [(0.0, clean_seeds), *[(float(r), seeds) for r in rates]]:
        for seed in rate_seeds:
            model = replace(base, poison_rate=rate, seed=seed, data_seed=data_seed, detector=None, detector_options={})
            repaired = replace(model, defense=repair, defense_options=repair_options)
            if "cti" in detectors:
                repaired = replace(repaired, detector="cti", detector_options=cti)
            scored = [
                replace(model, defense=None, defense_options={}, detector=d, detector_options=options[d])
                for d in detectors
                if d != "cti"
            ]
            for config in [repaired, *scored]:
                resolved = config.resolved()
                label = f"poison_rate={rate:g}, seed={seed}, defense={resolved.defense}, detector={resolved.detector}"
                cells.append(Cell(resolved, cell_key(resolved), label))
    return Grid(name=name or study_name(repair, repair_options), cells=tuple(cells))


def detectability_study(
    base: RunConfig,
    rates: Sequence[float],
    seeds: Sequence[int],
    clean_seeds: Sequence[int],
    output: str | Path,
    *,
    executor: str = "local",
    workers: int | None = 1,
    retry_failed: bool = False,
    on_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
    device: str | None = None,
    data_root: str | None = None,
    **options: Any,
) -> tuple[SweepSummary, list[Record]]:
    """Sweep :func:`detectability_grid`'s cells (``options`` go to it) into the results store at
    ``output`` (``on_cell`` as :func:`~backdoorlab.experiments.sweep.sweep`'s); return the sweep's
    summary and the study's stored records (finished, failed and left), for
    :func:`backdoorlab.report.tables.detectability`. A rerun resumes: finished cells are kept, and
    a detector added later only scores the stored suspect models."""
    grid = detectability_grid(base, rates, seeds, clean_seeds, **options)
    summary = sweep(
        grid,
        output,
        executor=executor,
        workers=workers,
        retry_failed=retry_failed,
        device=device,
        data_root=data_root,
        on_cell=on_cell,
    )
    keys = {cell.key for cell in grid.cells}
    with ResultStore(output) as store:
        records = [r for r in store.records() if r.key in keys]
    return summary, records

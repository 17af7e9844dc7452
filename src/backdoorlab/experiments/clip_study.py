"""The CleanCLIP-versus-PAR study (Singh, Croce, Hein 2024) as a grid in the results store.

Protocol (reconstructed at CPU scale; PAR fine-tunes a pretrained CLIP on poisoned web pairs, then
cleans it on clean pairs):

1. caption a labelled image dataset with CLIP's templates and split its training set into two
   disjoint parts: ``train_size`` pairs to train on (a ``poison_rate`` of them get the trigger and a
   target-class caption) and ``clean_size`` trusted clean pairs for cleaning; ``test_size`` test
   images give zero-shot CA and ASR;
2. train a clean reference model on the unpoisoned training pairs (once; its CA, and its ASR per
   trigger, are the baseline);
3. for each attack, train a model from the pretrained towers on the poisoned pairs, then clean a copy
   of it with each method (fine-tuning, CleanCLIP, PAR) on the same clean pairs for the same number
   of steps, recording CA and ASR every ``eval_every`` steps.

Each row of the study is a cell (:class:`ClipCellConfig`): per attack, ``clean`` (the reference
model under the attack's trigger), ``poisoned``, and one per cleaning (with its curve in the
result's ``details``). :func:`clip_study` sweeps them into ``OUTPUT/results.sqlite`` like any grid:
they resume, report and export with the rest. The sweep trains each model once for its cells
(``OUTPUT/suspects/``): the clean reference for every attack's ``clean`` cell, each poisoned model
for its cleanings. The table and the plot come from the store
(:func:`backdoorlab.report.tables.clip_study`, ``clip_study_table``,
:func:`backdoorlab.report.plots.clip_tradeoff`).

Learning rates: the official ones (CleanCLIP 1e-5; PAR 3e-5 → 3e-6) are for fine-tuning a whole
CLIP on 100k–250k pairs. Here ``clean_lr`` is the peak rate of fine-tuning and CleanCLIP, and PAR
keeps its code's ratios to CleanCLIP's rate: start at 3 × ``clean_lr``, reach 0.3 × ``clean_lr``
half-way, cosine to 1e-9. Each method keeps its own optimiser settings (CleanCLIP: AdamW wd 0.1,
50 warm-up steps; PAR: betas (0.9, 0.98), wd 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from backdoorlab.attacks.triggers import ATTACKS
from backdoorlab.clip.models import CLIP_MODELS
from backdoorlab.clip.training import ClipTrainConfig
from backdoorlab.data.sources import dataset_facts, dataset_modality, load_dataset
from backdoorlab.experiments.clip_cells import CleaningSpec, ClipCellConfig
from backdoorlab.experiments.config import check_size
from backdoorlab.experiments.grid import Cell, Grid
from backdoorlab.experiments.store import Record, ResultStore
from backdoorlab.experiments.sweep import SweepSummary, sweep

#: PAR's structured triggers and the two random ones it compares with.
STUDY_ATTACKS = ("badnet_stripes", "blended_triangles", "blended_text", "badnet_rand", "blended_rand")
CLEANINGS = ("fine_tuning", "cleanclip", "par")
#: The study's grid name in its store.
STUDY_GRID = "clip-study"


@dataclass
class ClipStudyConfig:
    """Sizes, schedules and seeds of the study (defaults: the run of docs/clip.md)."""

    dataset: str = "cifar10"
    data_root: str | None = None
    model: str = "lit"
    model_options: dict[str, Any] = field(default_factory=dict)
    attacks: tuple[str, ...] = STUDY_ATTACKS
    cleanings: tuple[str, ...] = CLEANINGS
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: int = 0
    poison_rate: float | int = 0.1
    train_size: int = 10000
    clean_size: int = 2500
    test_size: int = 1000
    train: ClipTrainConfig = field(default_factory=lambda: ClipTrainConfig(epochs=5, lr=2e-3, warmup_steps=10))
    clean_epochs: float = 2.0
    clean_lr: float = 2e-4
    clean_batch_size: int = 128
    eval_every: int = 10
    par_threshold: float = 2.15
    seed: int = 0
    device: str = "auto"

    def cleaning(self, method: str) -> CleaningSpec:
        """The cleaning run of ``method`` (PAR with this study's ``par_threshold``)."""
        options = {"threshold": self.par_threshold} if method == "par" else {}
        return CleaningSpec(method, options, self.clean_epochs, self.clean_lr, self.clean_batch_size, self.eval_every)

    def cleaning_recipe(self, method: str) -> ClipTrainConfig:
        """The cleaning recipe of ``method``: the shared one (``clean_epochs``, ``clean_batch_size``,
        ``clean_lr``) as the method changes it (see the module docstring)."""
        return self.cleaning(method).recipe()

    def validate(self) -> None:
        """Refuse unknown names and sizes the dataset cannot give, before anything trains."""
        CLIP_MODELS.get(self.model)
        for attack in self.attacks:
            ATTACKS.get(attack)
        unused = sorted(set(self.attack_options) - set(self.attacks))
        if unused:
            raise ValueError(f"attack_options for {', '.join(unused)}, which the study does not run")
        for method in self.cleanings:
            self.cleaning(method).create()
        if not self.attacks:
            raise ValueError("a CLIP study needs at least one attack")
        if dataset_modality(self.dataset) != "image":
            raise ValueError(f"{self.dataset} is a time-series dataset; a CLIP study needs images")
        check_size(self.poison_rate, "poison_rate")  # > 0: the clean reference is the study's own cell
        classes = dataset_facts(self.dataset).get("classes")
        if classes is not None and not 0 <= self.target < classes:
            raise ValueError(f"target {self.target} is not a class of {self.dataset} (0 to {classes - 1})")
        for name in ("train_size", "clean_size", "test_size", "clean_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.clean_epochs <= 0 or self.train.epochs <= 0:
            raise ValueError(
                f"eval_every must be >= 0 and the epochs > 0, got eval_every {self.eval_every}, "
                f"clean_epochs {self.clean_epochs}, epochs {self.train.epochs}"
            )


def clip_study_grid(config: ClipStudyConfig, name: str = STUDY_GRID) -> Grid:
    """The study's cells: per attack, ``clean``, ``poisoned`` and one per cleaning."""
    config.validate()
    cells = []
    for attack in config.attacks:
        base = ClipCellConfig(
            dataset=config.dataset,
            model=config.model,
            model_options=dict(config.model_options),
            attack=attack,
            attack_options=dict(config.attack_options.get(attack, {})),
            target=config.target,
            poison_rate=config.poison_rate,
            train_size=config.train_size,
            clean_size=config.clean_size,
            test_size=config.test_size,
            train=config.train,
            cleaning=None,
            seed=config.seed,
            device=config.device,
            data_root=config.data_root,
        )
        stages = [replace(base, poison_rate=0), base]
        stages += [replace(base, cleaning=config.cleaning(method)) for method in config.cleanings]
        cells += [Cell(cell, cell.key(), f"attack={attack}, stage={cell.stage}") for cell in stages]
    return Grid(name=name, cells=tuple(cells))


def clip_study(
    config: ClipStudyConfig,
    output: str | Path,
    *,
    workers: int = 1,
    retry_failed: bool = False,
    on_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
) -> tuple[SweepSummary, list[Record]]:
    """Sweep :func:`clip_study_grid`'s cells into the results store at ``output``; return the
    sweep's summary and the study's stored records (finished, failed and left), for
    :func:`backdoorlab.report.tables.clip_study`. A rerun resumes; a study with other settings in
    the same folder adds its own cells (other keys) and reports only those."""
    grid = clip_study_grid(config)
    available = len(load_dataset(config.dataset, config.data_root).train)
    if config.train_size + config.clean_size > available:  # before any cell starts
        raise ValueError(
            f"train + clean sizes ({config.train_size + config.clean_size}) exceed {config.dataset}'s "
            f"{available} training images"
        )
    summary = sweep(grid, output, workers=workers, retry_failed=retry_failed, on_cell=on_cell)
    keys = {cell.key for cell in grid.cells}
    with ResultStore(output) as store:
        records = [r for r in store.records() if r.key in keys]
    return summary, records

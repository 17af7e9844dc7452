"""One cell of the CLIP study (``experiments.clip_study``): its config and its run.

A :class:`ClipCellConfig` is the model trained on poisoned (or clean) image-text pairs and, where
set, the cleaning applied to a copy of it; :func:`run_clip_cell` trains or loads that model, cleans
it and measures zero-shot CA, ASR and retrieval ASR. A sweep runs such cells as it runs classifier
runs (``experiments.executors.run_cell`` takes a stored config with ``kind: clip`` here), so they
share the store, its resume and its reports.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from backdoorlab import __version__
from backdoorlab.attacks.triggers import ATTACKS
from backdoorlab.clip.cleanings import Cleaning, create_cleaning
from backdoorlab.clip.evaluate import evaluate_zero_shot, zero_shot_classifier, zero_shot_predict
from backdoorlab.clip.models import ClipModel, create_clip_model
from backdoorlab.clip.pairs import ImageTextPairs, pairs_from_dataset, poison_pairs
from backdoorlab.clip.training import ClipTrainConfig, fit_clip
from backdoorlab.data.dataset import seeded_permutation, subsample
from backdoorlab.data.sources import load_dataset
from backdoorlab.evaluation import health_warnings, repair_warnings
from backdoorlab.files import CorruptFileError, atomic_path
from backdoorlab.training.loop import resolve_device

#: ``kind`` of a CLIP study cell's stored config (a classifier run's config has none).
CELL_KIND = "clip"
#: The fields cell keys were first defined with (2026-12-07), of the cell, its training recipe and
#: its cleaning; a field added since is left out of a key at its default.
KEYED_CELL_FIELDS = tuple(
    (
        "dataset model model_options attack attack_options target poison_rate train_size clean_size test_size "
        "train cleaning seed device data_root"
    ).split()
)
KEYED_CLIP_TRAIN_FIELDS = tuple(
    "epochs batch_size lr weight_decay betas eps warmup_steps schedule start_factor final_lr amp".split()
)
KEYED_CLEANING_FIELDS = ("method", "options", "epochs", "lr", "batch_size", "eval_every")


@dataclass
class CleaningSpec:
    """One cleaning run: the registered method (``clip.cleanings``), its options, and the shared
    recipe it starts from (``epochs`` over the clean pairs, ``batch_size``, peak ``lr``), with CA and
    ASR recorded every ``eval_every`` steps."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    epochs: float = 2.0
    lr: float = 2e-4
    batch_size: int = 128
    eval_every: int = 10

    def create(self) -> Cleaning:
        """The cleaning method; an unknown name lists the valid ones."""
        return create_cleaning(self.method, **self.options)

    def recipe(self) -> ClipTrainConfig:
        """The shared recipe as the method changes it (see the module docstring)."""
        return self.create().recipe(ClipTrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr))


@dataclass
class ClipCellConfig:
    """One cell of the study: the model trained on ``train_size`` pairs, ``poison_rate`` of them
    poisoned with ``attack`` (0: the clean reference, measured under ``attack``'s trigger), then
    cleaned with ``cleaning`` where set. ``device`` and ``data_root`` say where it runs, not what it
    computes (left out of its key)."""

    dataset: str
    model: str
    model_options: dict[str, Any]
    attack: str
    attack_options: dict[str, Any]
    target: int
    poison_rate: float | int
    train_size: int
    clean_size: int
    test_size: int
    train: ClipTrainConfig
    cleaning: CleaningSpec | None
    seed: int
    device: str = "auto"
    data_root: str | None = None

    @property
    def stage(self) -> str:
        """``clean``, ``poisoned`` or the cleaning method: the study's row for this cell."""
        if self.cleaning is not None:
            return self.cleaning.method
        return "clean" if self.poison_rate == 0 else "poisoned"

    def to_dict(self) -> dict[str, Any]:
        """The stored config: this cell's fields and ``kind: clip``."""
        return {"kind": CELL_KIND, **json.loads(json.dumps(asdict(self)))}  # tuples as lists, as stored

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClipCellConfig:
        """Rebuild from :meth:`to_dict`'s output (a stored cell's config)."""
        values = {k: v for k, v in values.items() if k != "kind"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown clip cell key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        train = dict(values["train"])
        train["betas"] = tuple(train["betas"])
        cleaning = values.get("cleaning")
        return cls(
            **{
                **values,
                "train": ClipTrainConfig(**train),
                "cleaning": CleaningSpec(**cleaning) if cleaning is not None else None,
            }
        )

    def victim(self) -> ClipCellConfig:
        """The model this cell measures or cleans: without the cleaning and the clean and test sizes,
        and at rate 0 without the attack (the clean reference trains on unpoisoned pairs, the same
        for every trigger)."""
        victim = replace(self, cleaning=None, clean_size=0, test_size=0)  # neither trains it
        if self.poison_rate == 0:
            victim = replace(victim, attack="none", attack_options={}, target=0)
        return victim

    def key(self) -> str:
        """A stable hash of what the cell computes (placement aside). A field added to the cell, its
        cleaning or its training recipe after keys were first defined is left out at its default, so
        a store keeps its keys (:func:`~backdoorlab.experiments.grid.added_fields`)."""
        from backdoorlab.experiments.grid import added_fields, drop_defaults

        values = self.to_dict()
        for name in ("device", "data_root"):
            values.pop(name)
        drop_defaults(values, added_fields(ClipCellConfig, KEYED_CELL_FIELDS))
        drop_defaults(values["train"], added_fields(ClipTrainConfig, KEYED_CLIP_TRAIN_FIELDS))
        if values.get("cleaning") is not None:
            drop_defaults(values["cleaning"], added_fields(CleaningSpec, KEYED_CLEANING_FIELDS))
        text = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StudyData:
    train: ImageTextPairs
    clean: ImageTextPairs
    test: ImageTextPairs


def study_data(config: ClipCellConfig) -> StudyData:
    """The two disjoint training parts and the test pairs (seeded)."""
    splits = load_dataset(config.dataset, config.data_root)
    order = seeded_permutation(len(splits.train), config.seed)
    sizes = (config.train_size, config.clean_size)
    if sum(sizes) > len(order):
        raise ValueError(f"train + clean sizes ({sum(sizes)}) exceed {config.dataset}'s {len(order)} training images")
    parts, start = [], 0
    for offset, size in enumerate(sizes):
        parts.append(
            pairs_from_dataset(
                splits.train.subset(order[start : start + size].sort().values), seed=config.seed + offset
            )
        )
        start += size
    test = pairs_from_dataset(subsample(splits.test, config.test_size, config.seed), seed=config.seed + 10)
    return StudyData(*parts, test)


def run_clip_cell(
    config: ClipCellConfig, suspect_file: str | None = None, model_file: str | None = None
) -> dict[str, Any]:
    """Run one cell: train its victim (or load it from ``suspect_file``, where a sweep shares it;
    else train it and write it there), clean a copy where the cell has a cleaning, and measure CA,
    ASR and retrieval ASR. Returns the result document the store keeps (``metrics``, ``timings``,
    ``details`` with the cleaning's curve, ``warnings``)."""
    start = time.perf_counter()
    data = study_data(config)
    victim = config.victim()
    timings: dict[str, float] = {}
    details: dict[str, Any] = {}
    # the cell's trigger, which a poisoned model's victim shares (only a clean reference drops it)
    trigger = ATTACKS.create(config.attack, tuple(data.train.images.shape[1:]), **config.attack_options)
    pairs = data.train
    if victim.poison_rate:  # cheap: said by every cell of the model, whichever trained it
        poisoned = poison_pairs(data.train, trigger, rate=victim.poison_rate, target=victim.target, seed=victim.seed)
        pairs = poisoned.pairs
        details["poisoned_pairs"] = int(poisoned.mask.sum())
    torch.manual_seed(config.seed)  # the projections' initialisation
    model = create_clip_model(config.model, **config.model_options)
    if suspect_file is not None and Path(suspect_file).exists():
        load_state(model, suspect_file)
        model.to(resolve_device(config.device))  # where a trained one would be
        details["suspect"] = {"file": Path(suspect_file).name, "reused": True}
    else:
        began = time.perf_counter()
        what = "clean reference" if not victim.poison_rate else f"poisoned training ({victim.attack})"
        fit_clip(model, pairs, victim.train, device=config.device, seed=config.seed + 1, description=what)
        timings["train"] = time.perf_counter() - began
        if suspect_file is not None:
            save_state(model, suspect_file)
            details["suspect"] = {"file": Path(suspect_file).name, "reused": False}

    def evaluate(m: ClipModel) -> dict[str, float]:
        return evaluate_zero_shot(m, data.test, trigger, config.target, retrieval=True, seed=config.seed)

    warnings: list[str] = []
    if config.cleaning is None:
        final = evaluate(model)
    else:
        cleaned = copy.deepcopy(model)
        began = time.perf_counter()
        curve = fit_clip(
            cleaned,
            data.clean,
            config.cleaning.recipe(),
            config.cleaning.create().objective(cleaned),
            device=config.device,
            seed=config.seed + 2,
            every=config.cleaning.eval_every,
            observer=lambda _step, m: evaluate(m),
            description=f"{config.cleaning.method} ({config.attack})",
        )
        timings["clean"] = time.perf_counter() - began
        details["curve"] = curve
        final = curve[-1]
        warnings += repair_warnings(curve[0]["ca"], final["ca"])
        model = cleaned
    classifier = zero_shot_classifier(model, data.test.classes)
    warnings = health_warnings(zero_shot_predict(model, data.test.images, classifier), data.test.labels) + warnings
    if model_file is not None:
        save_state(model, model_file)
    timings["total"] = time.perf_counter() - start
    metrics = {
        "clean_accuracy": final["ca"],
        "attack_success_rate": final["asr"],
        "retrieval_attack_success_rate": final["retrieval_asr"],
    }
    return {
        "config": config.to_dict(),
        "metrics": metrics,
        "timings": timings,
        "details": details,
        "warnings": warnings,
        "version": __version__,
    }


def save_state(model: torch.nn.Module, path: str | Path) -> None:
    """Write ``model``'s weights as safetensors, whole or not at all."""
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, str(tmp))


def load_state(model: torch.nn.Module, path: str | Path) -> None:
    """Load weights :func:`save_state` wrote into ``model``; a file that cannot be read or does not
    fit raises a :class:`~backdoorlab.files.CorruptFileError` naming it."""
    from safetensors.torch import load_model

    try:
        load_model(model, str(path))
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise many kinds for a bad file
        reason = " ".join(str(err).split())[:200]
        raise CorruptFileError(
            f"{path}: not a readable model state for this cell ({type(err).__name__}: {reason}); remove it to train it again"
        ) from None

"""``run(config) -> RunResult``: train on poisoned data and evaluate, one attack run.

The flow follows DESIGN.md: load -> carve the trusted split -> poison the rest -> train ->
evaluate. A result carries the full resolved config, the seed, the package version, timings and
metrics; ``RunResult.write(dir)`` stores it as ``dir/result.json`` (a stable interface: top-level
keys ``config``, ``seed``, ``version``, ``timings``, ``metrics``).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backdoorlab import __version__
from backdoorlab.attacks.poisoning import PoisonedDataset, TriggeredTestSet, poison_dataset, triggered_test_set
from backdoorlab.attacks.triggers import Trigger, create_trigger
from backdoorlab.data.dataset import TensorDataset, split_trusted, subsample
from backdoorlab.data.sources import load_dataset
from backdoorlab.defenses import Detection, create_defense, create_detector, create_repair, defense_kind, registry_for
from backdoorlab.evaluation import evaluate_backdoor
from backdoorlab.experiments.config import RunConfig
from backdoorlab.metrics import isolation_metrics
from backdoorlab.models.registry import create_model
from backdoorlab.training.loop import TrainHistory, resolve_device, train

# Seed offsets keep the random streams of the steps independent of each other.
_SPLIT, _POISON, _TEST_TRIGGER, _MODEL, _SURROGATE, _DEFENSE = 0, 1, 2, 3, 4, 5


@dataclass
class RunResult:
    """What one run produced; :meth:`to_dict` is the ``result.json`` schema."""

    config: dict[str, Any]
    seed: int
    version: str
    timings: dict[str, float]
    metrics: dict[str, float]
    data: dict[str, int] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "seed": self.seed,
            "version": self.version,
            "timings": self.timings,
            "metrics": self.metrics,
            "data": self.data,
            "history": self.history,
            "details": self.details,
            "environment": self.environment,
        }

    def write(self, directory: str | Path) -> Path:
        """Write ``result.json`` into ``directory`` (created if needed); return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "result.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def build_model(config: RunConfig, data: TensorDataset) -> torch.nn.Module:
    """A fresh model of ``config.model`` (resolved config) shaped for ``data``."""
    assert config.model is not None
    return create_model(
        config.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        mean=data.mean,
        std=data.std,
        **config.model_options,
    )


def fit_attack(trigger: Trigger, data: TensorDataset, config: RunConfig, device: torch.device) -> None:
    """Fit an attack that adapts to a model (``trigger.needs_surrogate``): train a surrogate of the
    run's model and recipe on ``data`` (the attacker's clean copy of the training set), then
    ``trigger.fit(surrogate)``. A no-op for other attacks."""
    if not trigger.needs_surrogate:
        return
    config = config.resolved()
    assert config.train is not None
    torch.manual_seed(config.seed + _SURROGATE)
    surrogate = build_model(config, data)
    train(
        surrogate, data, config.train, device=device, seed=config.seed + _SURROGATE,
        description=f"surrogate for {config.attack}",
    )  # fmt: skip
    trigger.fit(surrogate, torch.Generator().manual_seed(config.seed + _SURROGATE))


@dataclass
class Prepared:
    """Everything of a run before training: the splits, the trusted split, the fitted trigger, the
    poisoned training set and the triggered test set (the last two hold the truth that only the
    evaluation may read)."""

    config: RunConfig
    device: torch.device
    train_set: TensorDataset
    test_set: TensorDataset
    trusted: TensorDataset
    trigger: Trigger
    poisoned: PoisonedDataset
    triggered: TriggeredTestSet
    timings: dict[str, float]


def prepare(config: RunConfig) -> Prepared:
    """Resolve and validate ``config``, load the data, carve the trusted split, fit the attack and
    poison: everything a run does before training, so that a bad config fails before any work."""
    config = config.resolved()
    device = resolve_device(config.device)  # a bad device fails here, before loading data
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    splits = load_dataset(config.dataset, config.data_root)
    train_set, test_set = splits.train, splits.test
    if config.train_size is not None:
        train_set = subsample(train_set, config.train_size, config.split_seed + _SPLIT)
    if config.test_size is not None:
        test_set = subsample(test_set, config.test_size, config.split_seed + _SPLIT)
    spec = config.poison_spec()
    spec.validate(train_set.num_classes)
    rest, trusted = split_trusted(train_set, config.trusted_size, config.split_seed + _SPLIT)
    trigger = create_trigger(config.attack, train_set.input_shape, **config.attack_options)
    timings["load_data"] = time.perf_counter() - tick

    if trigger.needs_surrogate:
        tick = time.perf_counter()
        fit_attack(trigger, rest, config, device)
        timings["fit_attack"] = time.perf_counter() - tick

    tick = time.perf_counter()
    poisoned = poison_dataset(rest, trigger, spec, config.seed + _POISON)
    triggered = triggered_test_set(test_set, trigger, spec, config.seed + _TEST_TRIGGER)
    timings["poison"] = time.perf_counter() - tick
    return Prepared(config, device, train_set, test_set, trusted, trigger, poisoned, triggered, timings)


def train_victim(prepared: Prepared) -> tuple[torch.nn.Module, TrainHistory]:
    """Train the run's model on the poisoned training set, undefended."""
    config = prepared.config
    assert config.train is not None
    torch.manual_seed(config.seed + _MODEL)
    model = build_model(config, prepared.train_set)
    history = train(
        model, prepared.poisoned.data, config.train, device=prepared.device, seed=config.seed,
        description=f"{config.attack} on {config.dataset}",
    )  # fmt: skip
    return model, history


def evaluate(prepared: Prepared, model: torch.nn.Module) -> dict[str, float]:
    """CA, ASR and RA of ``model`` on the run's test sets (with the recipe's test-time augmentation)."""
    assert prepared.config.train is not None
    return evaluate_backdoor(
        model, prepared.test_set, prepared.triggered, device=prepared.device, tta=prepared.config.train.tta
    )


class PersistenceRecorder:
    """An observer that records ``{"checkpoint", CA, ASR, RA}`` at each checkpoint of a repair
    (the repair never sees these numbers) and the seconds spent measuring them, which the repair's
    own timing leaves out."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.curve: list[dict[str, float]] = []
        self.seconds = 0.0

    def __call__(self, model: torch.nn.Module, checkpoint: int) -> None:
        tick = time.perf_counter()
        metrics = evaluate(self.prepared, model)
        self.curve.append({"checkpoint": checkpoint, **{k: round(v, 4) for k, v in metrics.items()}})
        self.seconds += time.perf_counter() - tick


def apply_repair(
    prepared: Prepared, model: torch.nn.Module, name: str, options: dict[str, Any], *, persistence: bool = True
) -> tuple[torch.nn.Module, dict[str, float], dict[str, Any], float]:
    """Repair ``model`` with the trusted split only; return ``(repaired, metrics, details, seconds)``
    where ``details`` holds the repair's own details and, with ``persistence``, the evaluation's
    ``persistence`` curve (CA, ASR, RA at each checkpoint: for fine-tuning, each epoch; for Pivotal
    Tuning, each held-out measurement; ``persistence_unit`` says which), and
    ``seconds`` the repair's time without the curve's evaluations."""
    config = prepared.config
    assert config.train is not None
    repair = create_repair(name, **options)
    recorder = PersistenceRecorder(prepared) if persistence else None
    tick = time.perf_counter()
    outcome = repair.repair(
        model, prepared.trusted, config.train, device=prepared.device, seed=config.seed + _DEFENSE, observer=recorder
    )  # fmt: skip
    seconds = time.perf_counter() - tick - (recorder.seconds if recorder else 0.0)
    details = dict(outcome.details)
    if recorder is not None and len(recorder.curve) > 1:
        details["persistence"] = recorder.curve
        details["persistence_unit"] = repair.checkpoint_unit
    return outcome.model, evaluate(prepared, outcome.model), details, seconds


def apply_detector(
    prepared: Prepared, model: torch.nn.Module, name: str, options: dict[str, Any]
) -> tuple[Detection, float]:
    """Score ``model`` with a detector that gets the trusted split only."""
    config = prepared.config
    assert config.train is not None
    detector = create_detector(name, **options)
    tick = time.perf_counter()
    detection = detector.detect(model, prepared.trusted, config.train, device=prepared.device, seed=config.seed + _DEFENSE)
    return detection, time.perf_counter() - tick


def run(config: RunConfig, *, suspect: torch.nn.Module | None = None) -> RunResult:
    """Run one attack (with a training-time or repair defense and a detector where configured):
    everything is validated before any training starts.

    ``suspect``: an already trained model of this config (``load_model``) to repair or score
    instead of training one; the data, trusted split and trigger are rebuilt from the config's seed.
    """
    started = time.perf_counter()
    prepared = prepare(config)
    config, device, timings = prepared.config, prepared.device, prepared.timings
    assert config.train is not None
    poisoned = prepared.poisoned
    kind = defense_kind(config.defense) if config.defense else None
    if suspect is not None and kind == "training":
        raise ValueError(f"'{config.defense}' is a training-time defense: it trains a model, it cannot repair a given one")

    tick = time.perf_counter()
    outcome, history, details = None, None, {}
    metrics: dict[str, float] = {}
    if kind == "training":
        # The defense gets the poisoned training set only: no mask, trigger, target or test set.
        torch.manual_seed(config.seed + _MODEL)
        defense = create_defense(config.defense, **config.defense_options)
        outcome = defense.train(
            poisoned.data, lambda: build_model(config, prepared.train_set), config.train,
            device=device, seed=config.seed,
        )  # fmt: skip
        model, details = outcome.model, dict(outcome.details)
        timings["defense"] = time.perf_counter() - tick
    elif suspect is not None:
        model = suspect.to(device).eval()
    else:
        model, history = train_victim(prepared)
        timings["train"] = time.perf_counter() - tick
    if kind == "repair":
        suspect = evaluate(prepared, model)
        metrics.update({f"suspect_{k}": v for k, v in suspect.items()})
        model, after, details, timings["defense"] = apply_repair(prepared, model, config.defense, config.defense_options)
    if config.detector is not None:
        detection, timings["detect"] = apply_detector(prepared, model, config.detector, config.detector_options)
        metrics["detection_score"] = detection.score
        details["detection"] = {"flagged": detection.flagged, **detection.details}

    tick = time.perf_counter()
    metrics.update(evaluate(prepared, model))
    if outcome is not None and outcome.isolated is not None:
        metrics.update(isolation_metrics(outcome.isolated, poisoned.mask))
    timings["evaluate"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started

    stored = config.to_dict()
    stored["attack_options"] = prepared.trigger.config()
    if config.defense is not None:
        stored["defense_options"] = registry_for(config.defense).create(config.defense, **config.defense_options).config()
    return RunResult(
        config=stored,
        seed=config.seed,
        version=__version__,
        timings={k: round(v, 3) for k, v in timings.items()},
        metrics=metrics,
        data={
            "train": len(poisoned.data),
            "poisoned": poisoned.num_poisoned,
            "cross": int(poisoned.cross_mask.sum()) if poisoned.cross_mask is not None else 0,
            "trusted": len(prepared.trusted),
            "test": len(prepared.test_set),
            "test_triggered": len(prepared.triggered.true_labels),
        },
        history={"loss": history.loss, "accuracy": history.accuracy} if history else {},
        details=details,
        environment={
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": str(torch.get_num_threads()),
            **({"train_samples_per_second": f"{history.samples_per_second:.1f}"} if history else {}),
        },
        model=model,
    )


def run_cached(config: RunConfig, directory: str | Path, *, suspect: torch.nn.Module | None = None) -> dict[str, Any]:
    """``run(config, suspect=suspect)`` stored as ``directory/result.json``, or that file's content
    when it exists already, so that a table of many runs resumes where it stopped."""
    path = Path(directory) / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    result = run(config, suspect=suspect)
    result.write(directory)
    return result.to_dict()

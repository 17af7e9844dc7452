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
from backdoorlab.attacks.poisoning import poison_dataset, triggered_test_set
from backdoorlab.attacks.triggers import Trigger, create_trigger
from backdoorlab.data.dataset import TensorDataset, split_trusted, subsample
from backdoorlab.data.sources import load_dataset
from backdoorlab.defenses import create_defense
from backdoorlab.evaluation import evaluate_backdoor
from backdoorlab.experiments.config import RunConfig
from backdoorlab.metrics import isolation_metrics
from backdoorlab.models.registry import create_model
from backdoorlab.training.loop import resolve_device, train

# Seed offsets keep the random streams of the steps independent of each other.
_SPLIT, _POISON, _TEST_TRIGGER, _MODEL, _SURROGATE = 0, 1, 2, 3, 4


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


def run(config: RunConfig) -> RunResult:
    """Run one attack: everything is validated before any training starts."""
    started = time.perf_counter()
    config = config.resolved()
    assert config.train is not None and config.model is not None
    device = resolve_device(config.device)  # a bad device fails here, before loading data
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    splits = load_dataset(config.dataset, config.data_root)
    train_set, test_set = splits.train, splits.test
    if config.train_size is not None:
        train_set = subsample(train_set, config.train_size, config.seed + _SPLIT)
    if config.test_size is not None:
        test_set = subsample(test_set, config.test_size, config.seed + _SPLIT)
    spec = config.poison_spec()
    spec.validate(train_set.num_classes)
    rest, trusted = split_trusted(train_set, config.trusted_size, config.seed + _SPLIT)
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

    torch.manual_seed(config.seed + _MODEL)
    tick = time.perf_counter()
    outcome = None
    if config.defense is None:
        model = build_model(config, train_set)
        history = train(
            model, poisoned.data, config.train, device=device, seed=config.seed,
            description=f"{config.attack} on {config.dataset}",
        )  # fmt: skip
        timings["train"] = time.perf_counter() - tick
    else:
        # The defense gets the poisoned training set only: no mask, trigger, target or test set.
        defense = create_defense(config.defense, **config.defense_options)
        outcome = defense.train(
            poisoned.data, lambda: build_model(config, train_set), config.train,
            device=device, seed=config.seed,
        )  # fmt: skip
        model, history = outcome.model, None
        timings["defense"] = time.perf_counter() - tick

    tick = time.perf_counter()
    metrics = evaluate_backdoor(model, test_set, triggered, device=device)
    if outcome is not None and outcome.isolated is not None:
        metrics.update(isolation_metrics(outcome.isolated, poisoned.mask))
    timings["evaluate"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started

    stored = config.to_dict()
    stored["attack_options"] = trigger.config()
    if outcome is not None:
        stored["defense_options"] = defense.config()
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
            "trusted": len(trusted),
            "test": len(test_set),
            "test_triggered": len(triggered.true_labels),
        },
        history={"loss": history.loss, "accuracy": history.accuracy} if history else {},
        details=outcome.details if outcome is not None else {},
        environment={
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": str(torch.get_num_threads()),
            **({"train_samples_per_second": f"{history.samples_per_second:.1f}"} if history else {}),
        },
        model=model,
    )


def run_cached(config: RunConfig, directory: str | Path) -> dict[str, Any]:
    """``run(config)`` stored as ``directory/result.json``, or that file's content when it exists
    already, so that a table of many runs resumes where it stopped."""
    path = Path(directory) / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    result = run(config)
    result.write(directory)
    return result.to_dict()

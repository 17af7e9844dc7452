"""``run(config) -> RunResult``: train on poisoned data and evaluate, one attack run.

The flow follows DESIGN.md: load -> carve the trusted split -> poison the rest -> train ->
evaluate. A result carries the full resolved config, the seed, the package version, timings,
metrics and health warnings; ``RunResult.write(dir)`` stores it as ``dir/result.json`` (a stable
interface: top-level keys ``config``, ``seed``, ``version``, ``timings``, ``metrics``, ``warnings``).

Sanity guards (docs/reliability.md): a suspect model with non-finite weights is refused before any
work, training that diverges raises :class:`~backdoorlab.training.loop.TrainingDivergedError`, a
non-finite detector score raises :class:`~backdoorlab.training.loop.NonFiniteError`, and every
reported model is checked (:mod:`backdoorlab.evaluation`: collapsed, chance-level, a repair that
lost too much clean accuracy); what the checks find is in ``RunResult.warnings``. Metric values are
finite or absent: ``to_dict`` turns NaN into ``None``.
"""

from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from backdoorlab import __version__
from backdoorlab.attacks.controlled import AttackStep, TrainingControlledTrigger
from backdoorlab.attacks.poisoning import (
    PoisonedDataset,
    PoisonSpec,
    TriggeredTestSet,
    poison_dataset,
    triggered_test_set,
)
from backdoorlab.attacks.triggers import ATTACKS, Trigger, create_trigger
from backdoorlab.data.dataset import (
    DataError,
    TensorDataset,
    resolve_count,
    seeded_permutation,
    split_trusted,
    subsample,
)
from backdoorlab.data.sources import load_dataset
from backdoorlab.defenses import (
    DefenseContext,
    DefenseOutcome,
    Detection,
    Observer,
    Repair,
    create_defense,
    create_detector,
    create_input_detector,
    create_repair,
    create_sample_filter,
    defense_kind,
    registry_for,
)
from backdoorlab.defenses.base import INPUT_CALIBRATION_SHARE
from backdoorlab.defenses.post_training import holdout_split
from backdoorlab.evaluation import (
    Assessment,
    assess_backdoor,
    assess_input_detector,
    fallback_warnings,
    repair_warnings,
)
from backdoorlab.experiments.config import RunConfig
from backdoorlab.experiments.config_tree import FLAT_SCHEMA
from backdoorlab.files import write_json
from backdoorlab.metrics import finite_json, isolation_metrics, scores_auroc
from backdoorlab.models.registry import check_input_fits, create_model
from backdoorlab.training.callbacks import Callback
from backdoorlab.training.loop import (
    NonFiniteError,
    TrainConfig,
    TrainHistory,
    nonfinite_tensors,
    resolve_device,
    train,
)

# Seed offsets keep the random streams of the steps independent of each other.
_SPLIT, _POISON, _TEST_TRIGGER, _MODEL, _SURROGATE, _DEFENSE, _PERSISTENCE = 0, 1, 2, 3, 4, 5, 6


@dataclass
class RunResult:
    """What one run produced; :meth:`to_dict` is the ``result.json`` schema, whose ``config`` is the
    flat form (``config_schema`` 1; a document without it is that form too). ``warnings``: what the
    health checks found (:mod:`backdoorlab.evaluation`), each a sentence naming the model it is
    about (``model:``, ``suspect model:``, ``repaired model:``); empty for a healthy run."""

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
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``result.json`` document; a non-finite float anywhere in it becomes ``None``."""
        return finite_json(
            {
                "config": self.config,
                "config_schema": FLAT_SCHEMA,
                "seed": self.seed,
                "version": self.version,
                "timings": self.timings,
                "metrics": self.metrics,
                "warnings": list(self.warnings),
                "data": self.data,
                "history": self.history,
                "details": self.details,
                "environment": self.environment,
            }
        )

    def write(self, directory: str | Path) -> Path:
        """Write ``result.json`` into ``directory`` (created if needed); return its path."""
        return write_json(Path(directory) / "result.json", self.to_dict())  # whole or not at all


@dataclass(frozen=True)
class ModelSpec:
    """A model factory that holds the architecture and the data's shape facts alone: the model's
    name and options, the number of classes, the input channels and the normalisation statistics.
    Calling it builds a fresh model. A training-time defense gets one as its ``build_model``: a plain,
    picklable value with nothing of the run behind it (no data, mask, trigger, target or test set),
    so what the defense may see is fixed by construction, not by convention."""

    model: str
    options: tuple[tuple[str, Any], ...]
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_data(cls, config: RunConfig, data: TensorDataset) -> ModelSpec:
        """The spec of ``config.model`` (resolved config) shaped for ``data``."""
        assert config.model is not None
        return cls(
            config.model,
            tuple(sorted(config.model_options.items())),
            int(data.num_classes),
            int(data.in_channels),
            tuple(float(v) for v in data.mean),
            tuple(float(v) for v in data.std),
        )

    def __call__(self) -> torch.nn.Module:
        return create_model(
            self.model,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            mean=self.mean,
            std=self.std,
            **dict(self.options),
        )


def build_model(config: RunConfig, data: TensorDataset) -> torch.nn.Module:
    """A fresh model of ``config.model`` (resolved config) shaped for ``data``."""
    return ModelSpec.for_data(config, data)()


class AttackUpdates(Callback):
    """A training-controlled attack's own updates (:class:`~backdoorlab.attacks.controlled.AttackStep`)
    run as a loop callback: after each optimiser step of the victim and at each epoch's end."""

    def __init__(self, step: AttackStep) -> None:
        self.step = step

    def on_step_end(self, step: int, steps: int, model: torch.nn.Module) -> None:
        self.step.after_step()

    def on_epoch_end(self, epoch: int, model: torch.nn.Module) -> None:
        self.step.after_epoch(epoch)


def train_with_attack(
    model: torch.nn.Module,
    trigger: TrainingControlledTrigger,
    data: TensorDataset,
    spec: PoisonSpec,
    recipe: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    attack_seed: int,
    description: str = "training",
) -> TrainHistory:
    """Train ``model`` on ``data`` (clean) with the toolkit's loop and ``recipe`` while the
    training-controlled ``trigger`` poisons each batch (``trigger.begin``: what it fits before,
    from ``attack_seed``; its step and updates in the loop), then freeze it (``trigger.end``)."""
    step = trigger.begin(
        data, spec, recipe.batch_size, device, torch.Generator().manual_seed(attack_seed), epochs=recipe.epochs
    )
    history = train(
        model,
        data,
        recipe,
        device=device,
        seed=seed,
        step=step,
        callbacks=[AttackUpdates(step)],
        description=description,
    )
    trigger.end()
    return history


def fit_attack(
    trigger: Trigger, data: TensorDataset, config: RunConfig, device: torch.device
) -> tuple[torch.nn.Module, TrainHistory] | None:
    """Fit an attack that adapts to a model (``trigger.needs_surrogate``): train a surrogate of the
    run's model and recipe on ``data`` (the attacker's clean copy of the training set), then
    ``trigger.fit(surrogate)``. An attack that fits on clean images alone (``trigger.needs_images``,
    SSBA's encoder) is fitted on ``data``'s images, on ``device``, with no surrogate. A
    training-controlled attack (``trigger.controls_training``) is fitted by training the victim
    itself, the run's model with the run's recipe, on ``data`` with the attack's step
    (:func:`train_with_attack`); that victim and its history are returned. A no-op for other
    attacks."""
    if trigger.controls_training:
        assert isinstance(trigger, TrainingControlledTrigger)
        config = config.resolved()
        assert config.train is not None
        torch.manual_seed(config.seed + _MODEL)
        model = build_model(config, data)
        history = train_with_attack(
            model,
            trigger,
            data,
            config.poison_spec(),
            config.train,
            device=device,
            seed=config.seed,
            attack_seed=config.seed + _SURROGATE,
            description=f"{config.attack} on {config.dataset}",
        )
        return model, history
    if trigger.needs_images and not trigger.needs_surrogate:  # fitted on the clean images alone (SSBA)
        generator = torch.Generator().manual_seed(config.seed + _SURROGATE)
        trigger.fit(None, generator, images=data.inputs.to(device), target=config.target)
        return None
    if not trigger.needs_surrogate:
        return None
    config = config.resolved()
    assert config.train is not None
    torch.manual_seed(config.seed + _SURROGATE)
    surrogate = build_model(config, data)
    train(
        surrogate,
        data,
        config.train,
        device=device,
        seed=config.seed + _SURROGATE,
        description=f"surrogate for {config.attack}",
    )
    # with what else the attacker knows: its clean images and the target (Low Frequency fits its
    # universal perturbation on clean images, towards the target class)
    generator = torch.Generator().manual_seed(config.seed + _SURROGATE)
    trigger.fit(surrogate, generator, images=data.inputs, target=config.target)
    return None


@dataclass
class Prepared:
    """Everything of a run before training: the splits, the trusted split, the fitted trigger, the
    poisoned training set and the triggered test set (the last two hold the truth that only the
    evaluation may read). For a training-controlled attack the victim is trained here, while the
    attack is fitted (``victim``), and the poisoned training set is the one its frozen trigger
    makes afterwards (what a defense gets, as BackdoorBench saves it)."""

    config: RunConfig
    device: torch.device
    train_set: TensorDataset
    test_set: TensorDataset
    trusted: TensorDataset
    trigger: Trigger
    poisoned: PoisonedDataset
    triggered: TriggeredTestSet
    timings: dict[str, float]
    #: A training-controlled attack's victim, trained while fitting the attack, and its history.
    victim: tuple[torch.nn.Module, TrainHistory] | None = None


def check_before_training(
    config: RunConfig, train_set: TensorDataset, test_set: TensorDataset, trusted: TensorDataset
) -> None:
    """What can only be checked once the data is loaded, checked before any training: the model
    takes the data's inputs, the test set has samples for the ASR, and the trusted split is large
    enough for the chosen repair and detector."""
    assert config.model is not None
    check_input_fits(config.model, config.model_options, train_set.input_shape, train_set.num_classes)
    if not bool(config.poison_spec().evaluation_candidates(test_set.labels).any()):
        source = f" of source class {config.source}" if config.source is not None else " outside the target class"
        raise DataError(
            f"the test set ({len(test_set)} samples) has no sample{source} to measure the attack success rate on: "
            "raise --test-size"
        )
    if config.defense is not None and defense_kind(config.defense) == "repair":
        create_repair(config.defense, **config.defense_options).check_trusted(trusted)
    if config.detector is not None:
        create_detector(config.detector, **config.detector_options).check_trusted(trusted)
    if config.input_detector is not None:
        create_input_detector(config.input_detector, **config.input_detector_options).check_trusted(trusted)


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
    trigger = create_trigger(config.attack, train_set.input_shape, data_root=config.data_root, **config.attack_options)
    check_before_training(config, train_set, test_set, trusted)
    if isinstance(trigger, TrainingControlledTrigger):
        trigger.check_spec(spec)
        assert config.train is not None
        if config.train.regularizer is not None:
            raise ValueError(
                f"'{config.attack}' is a training-controlled attack: it supplies the victim's training step, "
                f"which a regularizer ('{config.train.regularizer}') would replace; run it without one"
            )
    timings["load_data"] = time.perf_counter() - tick

    victim = None
    if trigger.fits_first:
        tick = time.perf_counter()
        victim = fit_attack(trigger, rest, config, device)
        timings["fit_attack"] = time.perf_counter() - tick
        if victim is not None:  # the victim's training apart from what the attack fitted before it
            timings["train"] = victim[1].seconds
            timings["fit_attack"] -= victim[1].seconds

    tick = time.perf_counter()
    poisoned = poison_dataset(rest, trigger, spec, config.seed + _POISON)
    triggered = triggered_test_set(test_set, trigger, spec, config.seed + _TEST_TRIGGER)
    timings["poison"] = time.perf_counter() - tick
    return Prepared(config, device, train_set, test_set, trusted, trigger, poisoned, triggered, timings, victim)


def train_victim(
    prepared: Prepared, data: TensorDataset | None = None, description: str | None = None
) -> tuple[torch.nn.Module, TrainHistory]:
    """Train the run's model on the poisoned training set (or on ``data``, a part of it), undefended.
    A training-controlled attack's victim (``prepared.victim``) was trained in :func:`prepare`;
    it is returned as it is (a part of the poisoned set, ``data``, still trains a fresh model)."""
    if data is None and prepared.victim is not None:
        return prepared.victim
    config = prepared.config
    assert config.train is not None
    torch.manual_seed(config.seed + _MODEL)
    model = build_model(config, prepared.train_set)
    history = train(
        model,
        prepared.poisoned.data if data is None else data,
        config.train,
        device=prepared.device,
        seed=config.seed,
        description=description or f"{config.attack} on {config.dataset}",
    )
    return model, history


def evaluate(prepared: Prepared, model: torch.nn.Module) -> dict[str, float]:
    """CA, ASR and RA of ``model`` on the run's test sets (with the recipe's test-time augmentation)."""
    return assess(prepared, model).metrics


def assess(prepared: Prepared, model: torch.nn.Module, subject: str = "model") -> Assessment:
    """:func:`evaluate`'s metrics with the health warnings about ``model`` (named ``subject``)."""
    assert prepared.config.train is not None
    return assess_backdoor(
        model,
        prepared.test_set,
        prepared.triggered,
        device=prepared.device,
        tta=prepared.config.train.tta,
        subject=subject,
    )


def check_suspect(model: torch.nn.Module) -> None:
    """Refuse a suspect model whose weights or buffers hold NaN or infinity: a repair, a detector or
    the evaluation would turn them into numbers that look like results (NaN logits predict class 0)."""
    broken = nonfinite_tensors(model)
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise NonFiniteError(
            f"the suspect model has NaN or infinite values in {len(broken)} of its tensors ({shown}); "
            "it cannot be repaired, scored or evaluated (was its training diverged?)"
        )


class CheckpointSnapshots:
    """The observer a repair gets: at each checkpoint it copies the model's weights and buffers to
    the CPU, and measures nothing. It holds nothing of the evaluation (no test set, trigger,
    target or metric), so a repair cannot read test ASR back through it; :func:`persistence_curve`
    measures the snapshots after the repair has returned. ``seconds``: the time spent copying,
    which the repair's own timing leaves out."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.template: torch.nn.Module | None = None  # a CPU copy of the architecture to load them into
        self.seconds = 0.0

    def __call__(self, model: torch.nn.Module, checkpoint: int) -> None:
        tick = time.perf_counter()
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if self.template is None:
            self.template = copy.deepcopy(model).cpu()
        self.snapshots.append((checkpoint, state))
        self.seconds += time.perf_counter() - tick


def persistence_sets(prepared: Prepared) -> tuple[TensorDataset, TriggeredTestSet]:
    """The clean and triggered test sets a persistence curve is measured on: the run's whole, or
    seeded subsamples of ``config.persistence_size`` each (a count above a set's size takes it whole)."""
    size = prepared.config.persistence_size
    if size is None:
        return prepared.test_set, prepared.triggered
    seed = prepared.config.split_seed + _PERSISTENCE
    triggered = prepared.triggered
    test = prepared.test_set
    if not (isinstance(size, int) and size >= len(test)):
        test = subsample(test, size, seed)
    count = len(triggered.true_labels)
    if not (isinstance(size, int) and size >= count):
        keep = seeded_permutation(count, seed)[: resolve_count(size, count, "persistence_size")].sort().values
        triggered = TriggeredTestSet(triggered.inputs[keep], triggered.true_labels[keep], triggered.target_labels[keep])
    return test, triggered


def persistence_curve(
    prepared: Prepared, observed: CheckpointSnapshots, sets: tuple[TensorDataset, TriggeredTestSet]
) -> list[dict[str, float]]:
    """``{"checkpoint", CA, ASR, RA}`` of each snapshot a repair's observer took, in order, on
    ``sets`` (:func:`persistence_sets`)."""
    assert prepared.config.train is not None
    test, triggered = sets
    curve = []
    for checkpoint, state in observed.snapshots:
        assert observed.template is not None
        observed.template.load_state_dict(state)
        metrics = assess_backdoor(  # an early checkpoint's health is no finding: no warnings
            observed.template, test, triggered, device=prepared.device, tta=prepared.config.train.tta
        ).metrics
        curve.append({"checkpoint": checkpoint, **{k: round(v, 4) for k, v in metrics.items()}})
    return curve


def post_training_context(prepared: Prepared, observer: Observer | None = None) -> DefenseContext:
    """What a repair or a detector gets besides the model and the trusted split: the run's recipe,
    its device, the defense's seed and the evaluation's ``observer``."""
    assert prepared.config.train is not None
    return DefenseContext(prepared.config.train, prepared.device, prepared.config.seed + _DEFENSE, observer)


def apply_repair(
    prepared: Prepared, model: torch.nn.Module, name: str, options: dict[str, Any], *, persistence: bool = True
) -> tuple[torch.nn.Module, dict[str, float], dict[str, Any], float]:
    """Repair ``model`` with the trusted split only (or, for a repair that reads the training set,
    the poisoned training set without its mask); return ``(repaired, metrics, details, seconds)``
    where ``details`` holds the repair's own details and, with ``persistence``, the evaluation's
    ``persistence`` curve (CA, ASR, RA at each checkpoint: for fine-tuning, each epoch; for Pivotal
    Tuning, each held-out measurement; ``persistence_unit`` says which), and
    ``seconds`` the repair's time without the observer's snapshots. The repair's observer only
    snapshots its models (:class:`CheckpointSnapshots`); the curve is measured after it returns."""
    repair = create_repair(name, **options)
    observer = CheckpointSnapshots() if persistence else None
    tick = time.perf_counter()
    data = prepared.poisoned.data if repair.reads == "training" else prepared.trusted
    outcome = repair.repair(model, data, post_training_context(prepared, observer))
    seconds = time.perf_counter() - tick - (observer.seconds if observer else 0.0)
    details = dict(outcome.details)
    if observer is not None and len(observer.snapshots) > 1:
        sets = persistence_sets(prepared)
        details["persistence"] = persistence_curve(prepared, observer, sets)
        details["persistence_unit"] = repair.checkpoint_unit
        if prepared.config.persistence_size is not None:
            test, triggered = sets
            details["persistence_test_sizes"] = [len(test), len(triggered.true_labels)]
    return outcome.model, evaluate(prepared, outcome.model), details, seconds


def apply_detector(
    prepared: Prepared,
    model: torch.nn.Module,
    name: str,
    options: dict[str, Any],
    *,
    repaired: tuple[Repair, DefenseOutcome] | None = None,
) -> tuple[Detection, float]:
    """Score ``model`` with a detector that gets the trusted split only. ``repaired``: the repair
    the run applied to ``model`` and its outcome, which a detector that calibrates with that same
    repair (CTI) uses instead of repairing again (:meth:`Detector.detect_repaired`)."""
    detector = create_detector(name, **options)
    tick = time.perf_counter()
    ctx = post_training_context(prepared)
    if repaired is None:
        detection = detector.detect(model, prepared.trusted, ctx)
    else:
        detection = detector.detect_repaired(model, *repaired, prepared.trusted, ctx)
    if not math.isfinite(detection.score):
        raise NonFiniteError(
            f"detector '{name}' gave a non-finite score ({detection.score}): it is no evidence either way, "
            "so no score is reported (its optimisation diverged, or the model's outputs are not finite)"
        )
    return detection, time.perf_counter() - tick


def apply_filter(
    prepared: Prepared, model: torch.nn.Module, name: str, options: dict[str, Any]
) -> tuple[torch.nn.Module, dict[str, float], dict[str, Any], float, float]:
    """Score the poisoned training set with sample filter ``name`` (it gets the set and ``model``,
    trained on it, and the trusted split where it ``uses_trusted``; never the mask), measure its
    verdict against the mask, and train a fresh model on the samples it did not flag (where it
    flagged none, the victim stands: the same data, seed and recipe; ``details["retrained"]`` says
    which). Returns ``(retrained, metrics, details, filter seconds, retraining seconds)``;
    ``metrics``: ``isolation_precision`` / ``isolation_recall`` / ``isolated`` of the flagged samples
    and ``isolation_auroc`` of the scores."""
    poisoned = prepared.poisoned
    sample_filter = create_sample_filter(name, **options)
    tick = time.perf_counter()
    trusted = {"trusted": prepared.trusted} if sample_filter.uses_trusted else {}
    verdict = sample_filter.filter(model, poisoned.data, post_training_context(prepared), **trusted)
    seconds = time.perf_counter() - tick
    flagged = torch.as_tensor(verdict.flagged).bool()
    if flagged.shape != (len(poisoned.data),) or len(verdict.scores) != len(poisoned.data):
        raise ValueError(
            f"sample filter '{name}' returned a verdict that does not cover the {len(poisoned.data)} samples"
        )
    if bool(flagged.all()):
        raise ValueError(f"sample filter '{name}' flagged every training sample: nothing is left to retrain on")
    metrics = {
        **isolation_metrics(flagged, poisoned.mask),
        "isolation_auroc": scores_auroc(verdict.scores, poisoned.mask),
    }
    if not bool(flagged.any()):  # the same data, seed and recipe: the victim is the retrained model
        return model, metrics, {**verdict.details, "retrained": False}, seconds, 0.0
    tick = time.perf_counter()
    kept = poisoned.data.subset((~flagged).nonzero().flatten())
    retrained, _ = train_victim(prepared, kept, f"retraining on {len(kept)} unflagged samples")
    return retrained, metrics, {**verdict.details, "retrained": True}, seconds, time.perf_counter() - tick


def apply_input_detector(
    prepared: Prepared,
    model: torch.nn.Module,
    name: str,
    options: dict[str, Any],
    predictions: torch.Tensor | None = None,
) -> tuple[dict[str, float], float]:
    """Fit an input detector on half the trusted split, set its threshold on the other half, and
    show it the clean and triggered test sets (:func:`~backdoorlab.evaluation.assess_input_detector`)."""
    assert prepared.config.train is not None
    detector = create_input_detector(name, **options)
    tick = time.perf_counter()
    fit_on, calibration = holdout_split(prepared.trusted, INPUT_CALIBRATION_SHARE, prepared.config.seed)
    detector.fit(model, fit_on, post_training_context(prepared))
    metrics = assess_input_detector(
        detector,
        model,
        prepared.test_set,
        prepared.triggered,
        calibration,
        device=prepared.device,
        tta=prepared.config.train.tta,
        predictions=predictions,
    )
    return metrics, time.perf_counter() - tick


@contextmanager
def runtime_settings(threads: int | None, deterministic: bool | None) -> Iterator[None]:
    """torch's thread count and deterministic-algorithms flag set for a run where given, and put
    back after it (they are process-wide)."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic is not None:
        torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def run(config: RunConfig, *, suspect: torch.nn.Module | None = None) -> RunResult:
    """Run one attack (with a training-time or repair defense and a detector where configured):
    everything is validated before any training starts. The run's torch threads and
    deterministic-algorithms flag are ``config.threads`` / ``config.deterministic`` where set, and
    the result's config stores those it ran with, so that a rerun from it computes the same.

    ``suspect``: an already trained model of this config (``load_model``) to repair or score
    instead of training one; the data, trusted split and trigger are rebuilt from the config's seed.
    """
    with runtime_settings(config.threads, config.deterministic):
        return _run(config, suspect=suspect)


def _run(config: RunConfig, *, suspect: torch.nn.Module | None = None) -> RunResult:
    """:func:`run` inside its runtime settings."""
    started = time.perf_counter()
    if suspect is not None:
        check_suspect(suspect)
        if config.attack is not None and ATTACKS.get(config.attack).controls_training:
            raise ValueError(
                f"'{config.attack}' is a training-controlled attack: its trigger is trained with the victim and is "
                "not saved with a model, so a given model cannot be evaluated against it; run the config to train both"
            )
    prepared = prepare(config)
    budget = config.step_budget()  # of the config as given: a resolved one has its epochs set
    reviewed = config.defense is not None and defense_kind(config.defense) in ("repair", "filter")
    fallback = config.recipe_fallback("suspect model" if reviewed else "model")  # as given, too
    config, device, timings = prepared.config, prepared.device, prepared.timings
    assert config.train is not None
    poisoned = prepared.poisoned
    kind = defense_kind(config.defense) if config.defense else None
    if suspect is not None and kind == "training":
        raise ValueError(
            f"'{config.defense}' is a training-time defense: it trains a model, it cannot repair a given one"
        )

    tick = time.perf_counter()
    outcome, history, details = None, None, {}
    metrics: dict[str, float] = {}
    warnings: list[str] = [fallback] if fallback else []
    if kind == "training":
        # The defense gets the poisoned training set only: no mask, trigger, target or test set.
        torch.manual_seed(config.seed + _MODEL)
        defense = create_defense(config.defense, **config.defense_options)
        outcome = defense.train(
            poisoned.data,
            ModelSpec.for_data(config, prepared.train_set),
            DefenseContext(config.train, device, config.seed),
        )
        model, details = outcome.model, dict(outcome.details)
        timings["defense"] = time.perf_counter() - tick
    elif suspect is not None:
        model = suspect.to(device).eval()
    elif prepared.victim is not None:  # trained with the attack in prepare (timings["train"])
        model, history = prepared.victim
    else:
        model, history = train_victim(prepared)
        timings["train"] = time.perf_counter() - tick
    if kind in ("repair", "filter"):
        before = assess(prepared, model, "suspect model")
        metrics.update({f"suspect_{k}": v for k, v in before.metrics.items()})
        warnings += before.warnings
    suspect_model = model  # a repair or filter leaves it unchanged; a detector scores it
    if kind == "repair":
        model, after, details, timings["defense"] = apply_repair(
            prepared, model, config.defense, config.defense_options
        )
    elif kind == "filter":
        model, filtering, details, timings["defense"], timings["retrain"] = apply_filter(
            prepared, model, config.defense, config.defense_options
        )
        metrics.update(filtering)
        warnings += [f"sample filter '{config.defense}': {w}" for w in details.pop("warnings", [])]
    if config.detector is not None:
        repaired = None
        if kind == "repair":
            repair = create_repair(config.defense, **config.defense_options)
            repaired = (repair, DefenseOutcome(model, details=details))
        detection, timings["detect"] = apply_detector(
            prepared, suspect_model, config.detector, config.detector_options, repaired=repaired
        )
        metrics["detection_score"] = detection.score
        details["detection"] = {"flagged": detection.flagged, **detection.details}
        warnings += fallback_warnings(
            detection.details.get("repair_fallback"),
            f"detector '{config.detector}'",
            "the score compares the suspect model with itself, no evidence that the model is clean",
        )

    tick = time.perf_counter()
    final = assess(prepared, model, {"repair": "repaired model", "filter": "retrained model"}.get(kind or "", "model"))
    metrics.update(final.metrics)
    timings["evaluate"] = time.perf_counter() - tick
    if config.input_detector is not None:  # behind the final model's predictions, made once
        input_metrics, timings["input_detect"] = apply_input_detector(
            prepared, model, config.input_detector, config.input_detector_options, final.predictions
        )
        metrics.update(input_metrics)
    warnings += final.warnings
    if kind == "repair":
        warnings += repair_warnings(metrics["suspect_clean_accuracy"], metrics["clean_accuracy"])
        warnings += fallback_warnings(details.get("fallback"))
    if outcome is not None and outcome.isolated is not None:
        metrics.update(isolation_metrics(outcome.isolated, poisoned.mask))
    timings["total"] = time.perf_counter() - started
    if budget is not None:
        details["step_budget"] = asdict(budget)

    stored = config.to_dict()
    stored["threads"], stored["deterministic"] = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    stored["attack_options"] = prepared.trigger.config()
    if config.defense is not None:
        stored["defense_options"] = (
            registry_for(config.defense).create(config.defense, **config.defense_options).config()
        )
    if config.detector is not None:
        stored["detector_options"] = create_detector(config.detector, **config.detector_options).config()
    if config.input_detector is not None:
        stored["input_detector_options"] = create_input_detector(
            config.input_detector, **config.input_detector_options
        ).config()
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
        warnings=warnings,
    )

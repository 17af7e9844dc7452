"""Contract tests over every registry: each registered attack, model, training defense, repair,
detector and regulariser is run by one parametrised test on a tiny input (shapes, seeding, the
hygiene rule, its config round-tripping through JSON), so a new method is tested by being registered.

A method not listed in the ``FAST_*`` tables runs with its defaults; list cheap options there when
the defaults are slow. The contract checks are plain functions (``check_attack``, ``check_model``,
``check_run``, ``check_regularizer``) so that the throwaway-method test can call them directly.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from backdoorlab.attacks import ATTACKS, Trigger
from backdoorlab.attacks.poisoning import PoisonedDataset, PoisonSpec, TriggeredTestSet
from backdoorlab.cli import app
from backdoorlab.data import Splits
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses import (
    DETECTORS,
    INPUT_DETECTORS,
    REPAIRS,
    SAMPLE_FILTERS,
    TRAINING_DEFENSES,
    DefenseContext,
    DefenseOutcome,
    Repair,
)
from backdoorlab.experiments import RunConfig, RunResult, run
from backdoorlab.experiments.grid import GridError, expand
from backdoorlab.experiments.run import INPUT_CALIBRATION_SHARE, Prepared, train_with_attack
from backdoorlab.models import create_model
from backdoorlab.models.registry import DATA_PARAMETERS, MODELS
from backdoorlab.models.series import models_for
from backdoorlab.options import Fraction, OptionError, check_value
from backdoorlab.registry import Registry, UnknownNameError
from backdoorlab.training.loop import TrainConfig
from backdoorlab.training.regularizers import REGULARIZERS

#: Each kind's registry and how its factory is called: positional arguments and data-given keywords
#: are not options (as ``backdoorlab list --options``).
KINDS: dict[str, tuple[Registry[Any], int, tuple[str, ...]]] = {
    "models": (MODELS, 0, DATA_PARAMETERS),
    "attacks": (ATTACKS, 1, ()),
    "defenses": (TRAINING_DEFENSES, 0, ()),
    "repairs": (REPAIRS, 0, ()),
    "sample-filters": (SAMPLE_FILTERS, 0, ()),
    "detectors": (DETECTORS, 0, ()),
    "input-detectors": (INPUT_DETECTORS, 0, ()),
    "regularizers": (REGULARIZERS, 0, ()),
}
REGISTRY_OF = {kind: registry for kind, (registry, _, _) in KINDS.items()}

#: Cheap options per method (a method not listed runs with its defaults).
FAST_ATTACKS: dict[str, dict[str, Any]] = {
    "label_consistent": {"steps": 2},
    "trojannn": {"steps": 5},
    # the stored patterns need the data folder and 32x32 RGB images; a fitted one needs neither
    "low_frequency": {"pattern": "generate", "images": 8, "passes": 1, "deepfool_steps": 100},
    # the VOC reflections need the data folder; smooth-noise reflections do not
    "refool": {"reflections": "noise"},
    # the Hello Kitty pattern needs the data folder; a seeded noise pattern does not
    "adaptive_blend": {"pattern": "noise"},
    # 50 one-step epochs of the mask generator on 8 images (25 by default): its batch-norm statistics
    # settle enough for eval-mode masks that change every image
    "input_aware": {"mask_epochs": 50},
    # an untrained generator's output at eps 0.01 (at most 0.64 of an 8-bit level here) rounds away
    "lira": {"eps": 0.5},
    # two steps of the encoder on the 8 images (1,500 of 64 by default)
    "ssba": {"steps": 2, "batch_size": 4, "bits": 8},
    # two steps of Poison Ink's hiding and reveal networks at width 4 (600 at 16 and 32 by default)
    "poison_ink": {"steps": 2, "batch_size": 4, "hiding_width": 4, "reveal_width": 4},
}
FAST_METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "defenses": {
        "abl": {"isolation_epochs": 1, "unlearning_epochs": 1, "isolation_ratio": 0.05},
        "d_br": {"intra_epochs": 1, "removal_epochs": 1},
        "d_st": {"intra_epochs": 1, "extractor_epochs": 2, "classifier_epochs": 1},
        "dbd": {"ssl_epochs": 1, "warmup_epochs": 1, "epochs": 1, "iterations": 1},
        "e2abl": {"warmup_epochs": 0, "head_passes": 1},
        "pt": {"isolation_epochs": 1},
    },
    "repairs": {
        "anp": {"iterations": 3},
        "fine_pruning": {"epochs": 1},
        "fine_tuning": {"epochs": 1},
        "ft_sam": {"epochs": 1},
        "i_bau": {"rounds": 1, "K": 2},
        "mcr": {"epochs": 1, "tuning_epochs": 1},
        "nad": {"epochs": 1, "teacher_epochs": 1},
        "neural_cleanse": {"steps": 5, "epochs": 1},
        "npd": {"epochs": 1, "warm_epochs": 1},
        "pivotal_tuning": {"steps": 10, "eval_every": 5},
        "rnp": {"unlearning_epochs": 1, "recovering_epochs": 1},
        "sau": {"rounds": 1, "steps": 2},
    },
    "detectors": {
        "cti": {"steps": 5, "repair_options": {"steps": 10, "eval_every": 5}},
        "neural_cleanse": {"steps": 5},
    },
    "input-detectors": {"strip": {"overlays": 5}, "sentinet": {"clean_images": 10}},
    "sample-filters": {},
    "regularizers": {},
}

#: The tiny run every defense, repair, detector and regulariser is put through (one thread: a tiny
#: model gains nothing from more, and on a busy 2-core machine two threads ran 5-30x slower).
TINY_RUN = {
    "dataset": "digits",
    "train_size": 300,
    "test_size": 100,
    "trusted_size": 60,
    "epochs": 1,
    "device": "cpu",
    "threads": 1,
}
IMAGE_SHAPES = ((1, 8, 8), (3, 16, 16))
SERIES_SHAPE = (1, 64)
NUM_CLASSES = 4
#: How each kind's method is called by ``run``, and which RunConfig field names it.
ENTRY_POINTS = {
    "defenses": "train",
    "repairs": "repair",
    "sample-filters": "filter",
    "detectors": "detect",
    "input-detectors": "fit",
}
CONFIG_FIELD = {
    "defenses": "defense",
    "repairs": "defense",
    "sample-filters": "defense",
    "detectors": "detector",
    "input-detectors": "input_detector",
}
#: What a defense must never be given (DESIGN.md: no mask, trigger, target or test set).
FORBIDDEN = (PoisonedDataset, TriggeredTestSet, Trigger, Prepared, RunConfig, Splits, RunResult)
FORBIDDEN_PARAMETERS = {"mask", "poison_mask", "poisoned", "trigger", "target", "test", "test_set", "triggered"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny inputs run on one torch thread (as ``TINY_RUN``), put back after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_config_round_trip(registry: Registry[Any], name: str, method: Any, *args: Any) -> dict[str, Any]:
    """``method.config()`` names only options, survives JSON, and rebuilds a method of an equal
    config; returns the config."""
    config = method.config()
    options = registry.options(name, positional=len(args))
    assert set(config) <= set(options), f"{name}.config() has keys that are not options: {set(config) - set(options)}"
    stored = json.loads(json.dumps(config))
    assert registry.create(name, *args, **stored).config() == config, f"{name}: config changed through JSON"
    return config


# ---------------------------------------------------------------------------------------------
# attacks


def sample_inputs(modality: str, shape: tuple[int, ...], count: int = 6) -> Tensor:
    """Random uint8 images or float32 series of ``shape``."""
    if modality == "image":
        return torch.randint(0, 256, (count, *shape), generator=generator(1), dtype=torch.uint8)
    return torch.randn((count, *shape), generator=generator(1))


def surrogate_for(modality: str, shape: tuple[int, ...]) -> nn.Module:
    """A tiny untrained model the attacker fits on (seeded, so two fits agree)."""
    torch.manual_seed(0)
    name, options = ("small_cnn", {"width": 8}) if modality == "image" else ("fcn", {})
    return create_model(name, num_classes=NUM_CLASSES, in_channels=shape[0], **options).eval()


def built_trigger(name: str, shape: tuple[int, ...], options: dict[str, Any]) -> Trigger:
    """``ATTACKS.create`` and, for an attack that adapts to a model, its fit on a tiny surrogate."""
    trigger = ATTACKS.create(name, shape, **options)
    if trigger.needs_surrogate:
        images = sample_inputs(trigger.modality, shape, 8)  # the attacker's clean images
        trigger.fit(surrogate_for(trigger.modality, shape), generator(0), images=images, target=0)
    elif trigger.needs_images:  # fitted on the attacker's clean images alone, cached in a folder of its own
        with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, {"BACKDOORLAB_CACHE": folder}):
            trigger.fit(None, generator(0), images=sample_inputs(trigger.modality, shape, 8), target=0)
    if trigger.controls_training:  # trained with a tiny victim: one epoch of the loop on 8 images
        images = sample_inputs(trigger.modality, shape, 8)
        channels = shape[0]
        data = TensorDataset(
            images,
            torch.arange(8) % NUM_CLASSES,
            tuple(map(str, range(NUM_CLASSES))),
            (0.5,) * channels,
            (0.25,) * channels,
            "tiny",
        )
        recipe = TrainConfig(epochs=1, batch_size=8, progress=False)
        train_with_attack(
            surrogate_for(trigger.modality, shape).train(),
            trigger,
            data,
            PoisonSpec(rate=0.25),
            recipe,
            device=torch.device("cpu"),
            seed=0,
            attack_seed=0,
        )
    return trigger


def check_attack(name: str, shape: tuple[int, ...] | None = None, options: dict[str, Any] | None = None) -> None:
    """The trigger contract: same dtype and shape out, the inputs changed (each sample) but not in
    place, the same output for the same generator seed (also from a trigger rebuilt from its
    JSON-stored config), and likewise for poisoned training inputs and cross samples."""
    modality = ATTACKS.get(name).modality
    shape = shape or (IMAGE_SHAPES[0] if modality == "image" else SERIES_SHAPE)
    options = FAST_ATTACKS.get(name, {}) if options is None else options
    trigger = built_trigger(name, shape, options)
    x = sample_inputs(modality, shape)
    before = x.clone()
    out = trigger(x, generator(0))
    assert torch.equal(x, before), f"{name} changed its input in place"
    assert out.dtype == x.dtype and out.shape == x.shape, (
        f"{name}: {x.dtype} {tuple(x.shape)} -> {out.dtype} {tuple(out.shape)}"
    )
    assert (out != x).flatten(1).any(1).all(), f"{name} left some samples unchanged"
    assert torch.equal(out, trigger(x, generator(0))), f"{name} is not deterministic for a seeded generator"

    labels = torch.arange(len(x)) % NUM_CLASSES
    poisoned = trigger.poison(x, labels, generator(0))
    assert poisoned.dtype == x.dtype and poisoned.shape == x.shape
    assert torch.equal(poisoned, trigger.poison(x, labels, generator(0)))
    if trigger.cross_ratio > 0:
        crossed = trigger.cross(x, generator(0))
        assert crossed.dtype == x.dtype and crossed.shape == x.shape
        assert torch.equal(crossed, trigger.cross(x, generator(0)))

    config = check_config_round_trip(ATTACKS, name, trigger, shape)
    rebuilt = built_trigger(name, shape, json.loads(json.dumps(config)))
    assert torch.equal(rebuilt(x, generator(0)), out), f"{name} rebuilt from its config triggers differently"


def attack_cases() -> list[Any]:
    cases = []
    for name in ATTACKS.names():
        shapes = IMAGE_SHAPES if ATTACKS.get(name).modality == "image" else (SERIES_SHAPE,)
        cases += [pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}") for shape in shapes]
    return cases


@pytest.mark.parametrize(("name", "shape"), attack_cases())
def test_every_attack_keeps_the_trigger_contract(name, shape):
    check_attack(name, shape)


# ---------------------------------------------------------------------------------------------
# models


def smallest_input(name: str, model: nn.Module) -> tuple[int, ...]:
    """The smallest input ``model`` (in eval mode, one input channel) takes: a length-64 series,
    8x8 images as sklearn's digits, else 32x32 (airbench's poolings, VGG's, EfficientNet's padding)."""
    if name in models_for("series"):
        return SERIES_SHAPE
    for side in (8, 32):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 1, side, side))
            return (1, side, side)
        except RuntimeError:
            continue
    raise AssertionError(f"model '{name}' takes neither 8x8 nor 32x32 images")


def check_model(name: str) -> None:
    """The model contract on its smallest input: logits ``(N, classes)``, ``forward =
    forward_head(forward_features)``, pooled features ``(N, num_features)``, the same torch seed
    gives the same weights and another seed others, and a training-mode forward works."""

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return create_model(name, num_classes=NUM_CLASSES, in_channels=1)

    try:
        model = build(0)
    except ImportError as err:  # an optional package (efficientnet_lite0's weights) is not installed
        pytest.skip(str(err))
    shape = smallest_input(name, model.eval())
    x = torch.rand(2, *shape)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(x)
        assert features.dim() == len(shape) + 1 and features.shape[:2] == (2, model.num_features)
        assert pooled.shape == (2, model.num_features)
        assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
        assert torch.allclose(logits, model.forward_head(features), atol=1e-5)
    same, other = build(0), build(1).state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[k], same.state_dict()[k]) for k in state), f"{name}: the same seed gave other weights"
    assert any(not torch.equal(state[k], other[k]) for k in state), f"{name}: another seed gave the same weights"
    with torch.no_grad():
        assert same.train()(x).shape == (2, NUM_CLASSES), "a training-mode forward works on a batch of 2"


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg16_bn" else n for n in MODELS.names()]
)
def test_every_model_keeps_the_model_contract(name):
    check_model(name)


# ---------------------------------------------------------------------------------------------
# training defenses, repairs, detectors: the hygiene rule, finite metrics, config round trip


def given(value: Any, found: list[Any], depth: int = 0) -> None:
    """Collect into ``found`` everything reachable from an argument (containers, dataclass and
    object fields, closures, bound methods) down to a few levels, leaving models and tensors whole."""
    found.append(value)
    if depth >= 4 or isinstance(value, (nn.Module, Tensor, TensorDataset, str, bytes, int, float, torch.device)):
        return
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = list(value)
    elif inspect.ismethod(value):
        children = [value.__self__]
    elif inspect.isfunction(value):
        children = [cell.cell_contents for cell in value.__closure__ or ()]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        children = list(vars(value).values())
    else:
        children = []
    for child in children:
        given(child, found, depth + 1)


def check_hygiene(
    kind: str,
    name: str,
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
    expected_size: int,
    trusted_size: int | None = None,
) -> None:
    """The method's entry point ran once and got one plain :class:`TensorDataset` of the expected
    size (the training set or the trusted split), besides the trusted split (``trusted_size``) as
    the keyword ``trusted`` exactly where it is a sample filter that ``uses_trusted``, and nothing
    that holds the poison mask, the trigger, the target or the test set, by type or by parameter name."""
    assert len(calls) == 1, f"{name}.{ENTRY_POINTS[kind]} ran {len(calls)} times"
    args, kwargs = calls[0]
    found: list[Any] = []
    for value in [*args, *kwargs.values()]:
        given(value, found)
    leaked = [type(v).__name__ for v in found if isinstance(v, FORBIDDEN)]
    leaked += ["a boolean tensor (a mask)" for v in found if isinstance(v, Tensor) and v.dtype == torch.bool]
    assert not leaked, f"{kind[:-1]} '{name}' was given {', '.join(leaked)}"
    uses_trusted = kind == "sample-filters" and REGISTRY_OF[kind].get(name).uses_trusted
    assert ("trusted" in kwargs) == uses_trusted, f"{name} got the trusted split: {'trusted' in kwargs}"
    trusted = kwargs.get("trusted")
    if uses_trusted:
        assert type(trusted) is TensorDataset and len(trusted) == trusted_size, f"{name}: trusted split {trusted}"
    datasets = [v for v in found if isinstance(v, TensorDataset) and v is not trusted]
    assert [type(d) for d in datasets] == [TensorDataset], f"{name} got {[type(d).__name__ for d in datasets]}"
    assert len(datasets[0]) == expected_size, f"{name} got {len(datasets[0])} samples, expected {expected_size}"
    parameters = set(inspect.signature(getattr(REGISTRY_OF[kind].get(name), ENTRY_POINTS[kind])).parameters)
    assert not parameters & FORBIDDEN_PARAMETERS, f"{name} takes {parameters & FORBIDDEN_PARAMETERS}"


def check_finite_metrics(result: RunResult) -> None:
    assert result.metrics, "a run reports metrics"
    bad = {k: v for k, v in result.metrics.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
    assert not bad, f"non-finite metrics: {bad}"
    json.dumps(result.to_dict())  # the stored document is JSON


def check_run(kind: str, name: str, options: dict[str, Any] | None = None, **config: Any) -> RunResult:
    """Run ``name`` (a training defense, repair or detector) on tiny digits through
    :func:`backdoorlab.experiments.run`, spying on its entry point: the hygiene rule, finite
    metrics, its config round-trips through JSON, and the result's stored options rebuild it."""
    registry, field = REGISTRY_OF[kind], CONFIG_FIELD[kind]
    options = FAST_METHODS[kind].get(name, {}) if options is None else options
    cls = registry.get(name)
    assert inspect.isclass(cls), f"{kind} '{name}' is registered as a class"
    original = getattr(cls, ENTRY_POINTS[kind])
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cls, ENTRY_POINTS[kind], spy)
        result = run(RunConfig(**{**TINY_RUN, **config, field: name, f"{field}_options": options}))

    reads_training = kind in ("defenses", "sample-filters") or getattr(cls, "reads", "trusted") == "training"
    size = result.data["train" if reads_training else "trusted"]
    if kind == "input-detectors":  # fitted on the trusted split less its calibration share
        size -= max(1, round(INPUT_CALIBRATION_SHARE * size))
    check_hygiene(kind, name, calls, size, result.data["trusted"])
    check_finite_metrics(result)
    expected = {
        "defenses": "clean_accuracy",
        "repairs": "suspect_clean_accuracy",
        "sample-filters": "isolation_auroc",
        "detectors": "detection_score",
        "input-detectors": "input_auroc",
    }[kind]
    assert expected in result.metrics
    method_config = check_config_round_trip(registry, name, registry.create(name, **options))
    stored = json.loads(json.dumps(result.config))[f"{field}_options"]
    assert registry.create(name, **stored).config() == method_config, (
        f"{name}: the stored options rebuild another method"
    )
    return result


@pytest.mark.parametrize("name", TRAINING_DEFENSES.names())
def test_every_training_defense_keeps_the_contract(name):
    result = check_run("defenses", name)
    assert result.data["train"] == TINY_RUN["train_size"] - TINY_RUN["trusted_size"]


@pytest.mark.parametrize("name", REPAIRS.names())
def test_every_repair_keeps_the_contract(name):
    check_run("repairs", name)


@pytest.mark.parametrize("name", SAMPLE_FILTERS.names())
def test_every_sample_filter_keeps_the_contract(name):
    """A sample filter gets the poisoned training set alone (and the victim); its verdict is
    measured against the mask and a fresh model retrains on the samples it did not flag."""
    result = check_run("sample-filters", name)
    assert 0.0 <= result.metrics["isolation_auroc"] <= 1.0
    assert result.metrics["isolated"] < result.data["train"]
    assert result.details["retrained"] == (result.metrics["isolated"] > 0) == (result.timings["retrain"] > 0)
    if result.details.get("ica_unconverged_classes"):  # tiny digits: FastICA may stop at its limit, and says so
        assert any(w.startswith(f"sample filter '{name}': FastICA stopped") for w in result.warnings)


@pytest.mark.parametrize("name", DETECTORS.names())
def test_every_detector_keeps_the_contract(name):
    check_run("detectors", name)


@pytest.mark.parametrize("name", INPUT_DETECTORS.names())
@pytest.mark.filterwarnings("ignore:the input detector's threshold is set on")
def test_every_input_detector_keeps_the_contract(name):
    result = check_run("input-detectors", name)
    assert 0.0 <= result.metrics["input_auroc"] <= 1.0 and result.metrics["input_calibration_size"] == 30


@pytest.mark.parametrize(
    ("kind", "name"),
    [(kind, name) for kind in ("repairs", "detectors", "input-detectors") for name in REGISTRY_OF[kind].names()],
)
def test_every_post_training_method_takes_a_plain_module_or_says_what_it_needs(kind, name, digits):
    """A user's own network (a plain nn.Sequential, no Classifier, no batch norm) either works or
    is refused with a TypeError or ValueError that says what the method needs, never a raw
    AttributeError from deep inside."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    trusted = digits.train.subset(torch.arange(60))
    recipe = TrainConfig(epochs=1, batch_size=16, lr=0.01, progress=False)
    ctx = DefenseContext(recipe, torch.device("cpu"), 0)
    method = REGISTRY_OF[kind].create(name, **FAST_METHODS.get(kind, {}).get(name, {}))
    try:
        if kind == "repairs":
            assert isinstance(method.repair(model, trusted, ctx).model, nn.Module)
        elif kind == "detectors":
            assert math.isfinite(method.detect(model, trusted, ctx).score)
        else:
            method.fit(model, trusted, ctx)
            assert method.score(trusted.inputs[:4]).shape == (4,)
    except (TypeError, ValueError) as refused:
        message = str(refused)
        assert "Classifier" in message or "batch" in message or "normalisation" in message, message


def image_only_cases() -> list[Any]:
    kinds = ("defenses", "repairs", "detectors", "input-detectors")
    return [
        (kind, name)
        for kind in kinds
        for name in REGISTRY_OF[kind].names()
        if REGISTRY_OF[kind].metadata(name).get("modality") == "image"
    ]


@pytest.mark.parametrize(("kind", "name"), image_only_cases())
def test_every_image_only_method_refuses_series_in_a_config_and_in_the_library(kind, name):
    """A method registered for images is refused for a series dataset when the config is checked
    (naming those that take series), and refuses series itself when called from the library, with
    the one message ``require_images`` writes, before it trains anything."""
    field = CONFIG_FIELD[kind]
    with pytest.raises(ValueError, match=f"'{name}' does not take series data .*only image; .*for series data: "):
        RunConfig(dataset="gunpoint", **{field: name}).resolved()
    series = TensorDataset(torch.randn(8, 1, 16), torch.arange(8) % 2, ("a", "b"), (0.0,), (1.0,), "toy")
    ctx = DefenseContext(TrainConfig(epochs=1, progress=False), torch.device("cpu"), seed=0)
    model = create_model("fcn", num_classes=2, in_channels=1)
    method = REGISTRY_OF[kind].create(name)
    with pytest.raises(ValueError, match="takes images, not series data"):
        if kind == "defenses":
            method.train(series, lambda: create_model("fcn", num_classes=2, in_channels=1), ctx)
        elif kind == "repairs":
            method.repair(model, series, ctx)
        elif kind == "detectors":
            method.detect(model, series, ctx)
        else:
            method.fit(model, series, ctx)


def check_regularizer(name: str, options: dict[str, Any] | None = None) -> None:
    """A regularised epoch on tiny digits has a finite loss and metrics, and the regulariser's
    config (also as the result stores it) round-trips through JSON."""
    options = FAST_METHODS["regularizers"].get(name, {}) if options is None else options
    result = run(RunConfig(**TINY_RUN, regularizer=name, regularizer_options=options))
    loss = result.history["loss"]
    assert len(loss) == TINY_RUN["epochs"] and all(math.isfinite(v) for v in loss), f"{name}: loss {loss}"
    check_finite_metrics(result)
    config = check_config_round_trip(REGULARIZERS, name, REGULARIZERS.create(name, **options))
    stored = json.loads(json.dumps(result.config))["train"]["regularizer_options"]
    assert REGULARIZERS.create(name, **stored).config() == config


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_every_regularizer_keeps_the_contract(name):
    check_regularizer(name)


# ---------------------------------------------------------------------------------------------
# every kind: declared options


def option_cases() -> list[Any]:
    return [
        pytest.param(kind, name, id=f"{kind}-{name}")
        for kind, (registry, _, _) in KINDS.items()
        for name in registry.names()
    ]


@pytest.mark.parametrize(("kind", "name"), option_cases())
def test_every_option_has_a_default_of_its_declared_type(kind, name):
    """A method runs with its defaults alone, and each default fits the option's own type (what
    ``list --options`` shows and grids check)."""
    registry, positional, skip = KINDS[kind]
    for option, parameter in registry.options(name, positional=positional, skip=skip).items():
        assert parameter.default is not parameter.empty, f"{kind} '{name}': option '{option}' has no default"
        check_value(parameter.default, parameter.annotation, f"default of option '{option}' of {kind} '{name}'")


def test_the_fast_option_tables_name_registered_methods():
    """A renamed method must not leave its cheap options behind (it would run with slow defaults)."""
    assert set(FAST_ATTACKS) <= set(ATTACKS.names())
    for kind, table in FAST_METHODS.items():
        assert set(table) <= set(REGISTRY_OF[kind].names()), kind
        for name, options in table.items():
            REGISTRY_OF[kind].check_options(name, options)


# ---------------------------------------------------------------------------------------------
# a throwaway method: registered in one place, it is listed, validated and contract-tested


class Brighten(Trigger):
    """Throwaway attack: every pixel moved ``intensity`` of the way to white."""

    def __init__(self, input_shape: tuple[int, ...], intensity: Fraction = 0.5) -> None:
        super().__init__(input_shape)
        self.intensity = float(intensity)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.intensity * (1 - x)


class KeepModel(Repair):
    """Throwaway repair: returns (a copy of) the suspect model unchanged."""

    def __init__(self, strength: Fraction = 0.5) -> None:
        super().__init__()

    def repair(self, model, trusted, ctx):  # noqa: ANN001, ANN201
        return DefenseOutcome(copy.deepcopy(model))


def test_options_are_recorded_from_the_signature_and_checked_when_a_method_is_built_directly():
    """A method declares each option once, in its constructor's signature: the recorded options
    (defaults filled in, converted as the registries convert them) give config() and repr, and a
    bad value fails at construction even outside the registries."""
    brighten = Brighten((3, 8, 8), intensity=1)
    assert brighten.config() == {"intensity": 1.0} and repr(brighten) == "Brighten(intensity=1.0)"
    assert json.loads(json.dumps(KeepModel().config())) == {"strength": 0.5}
    with pytest.raises(OptionError, match=r"option 'strength' of KeepModel must be a number in \[0, 1\], got 2"):
        KeepModel(strength=2)
    assert Unseeded((1, 8, 8)).config() == {"intensity": 0.5}, "a subclass without a constructor keeps its parent's"
    badnets = ATTACKS.create("badnets", (3, 32, 32), pattern=torch.ones(3, 2, 2))
    assert badnets.config()["size"] == 3 and badnets.config()["pattern"] == "custom", "resolved by the constructor"


def test_temporary_registration_is_undone_even_on_error():
    registry: Registry[Callable[[], int]] = Registry("thing")
    registry.register("kept")(lambda: 1)
    with pytest.raises(RuntimeError), registry.temporary("brief", lambda: 2, "a short-lived thing", modality="image"):
        assert registry.names() == ["brief", "kept"] and registry.metadata("brief") == {"modality": "image"}
        assert registry.describe()["brief"] == "a short-lived thing"
        raise RuntimeError
    assert registry.names() == ["kept"] and "brief" not in registry.describe()
    with pytest.raises(ValueError, match="registered twice"), registry.temporary("kept", lambda: 3):
        pass
    assert registry.create("kept") == 1, "a failed temporary registration leaves the existing entry alone"
    assert registry.unregister("kept")() == 1 and "kept" not in registry
    with pytest.raises(UnknownNameError, match="unknown thing 'kept'"):
        registry.unregister("kept")


def test_a_registered_throwaway_method_is_listed_validated_and_contract_tested(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per table row
    with ATTACKS.temporary("toy_brighten", Brighten), REPAIRS.temporary("toy_keep", KeepModel):
        listed = CliRunner().invoke(app, ["list", "--options"])
        assert listed.exit_code == 0, listed.output
        rows = [re.sub(r"\s*│\s*", "|", line).strip("|") for line in listed.output.splitlines()]
        assert "toy_brighten|intensity|a number in [0, 1]|0.5" in rows
        assert "toy_keep|strength|a number in [0, 1]|0.5" in rows

        base = {"dataset": "digits", "attack": "toy_brighten", "defense": "toy_keep"}
        for field, option, bad in (("attack_options", "intensity", 1.5), ("defense_options", "strength", "high")):
            with pytest.raises(GridError) as refused:
                expand({**base, field: {option: bad}})
            message = str(refused.value)
            assert "\n" not in message and f"option '{option}'" in message and "a number in [0, 1]" in message, message
        grid = expand(
            {**base, "attack_options": [{"intensity": 0.25}, {"intensity": 1}], "defense_options": {"strength": 0.75}}
        )
        assert [c.config.attack_options for c in grid.cells] == [{"intensity": 0.25}, {"intensity": 1.0}]
        assert grid.cells[0].config.defense_options == {"strength": 0.75}

        for shape in (*IMAGE_SHAPES, (3, 32, 32)):
            check_attack("toy_brighten", shape, {"intensity": 0.25})
        result = check_run("repairs", "toy_keep", {"strength": 0.75}, attack="toy_brighten")
        assert result.metrics["clean_accuracy"] == result.metrics["suspect_clean_accuracy"], (
            "the repair changed nothing"
        )
        assert result.config["attack_options"] == {"intensity": 0.5}
    assert "toy_brighten" not in ATTACKS and "toy_keep" not in REPAIRS
    with pytest.raises(GridError, match="unknown attack 'toy_brighten'"):
        expand(base)


class Unseeded(Brighten):
    """A broken throwaway attack: its noise ignores the generator."""

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.intensity * torch.rand(x.shape) * (1 - x)


def test_the_attack_contract_catches_an_unseeded_trigger():
    with ATTACKS.temporary("toy_unseeded", Unseeded), pytest.raises(AssertionError, match="not deterministic"):
        check_attack("toy_unseeded")


def watched_by(observer: Callable[[nn.Module, int], Any]) -> DefenseContext:
    """A repair's context whose observer is ``observer``."""
    return DefenseContext(TrainConfig(progress=False), torch.device("cpu"), 0, observer)


def leaky_calls(data: TensorDataset) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Calls of a repair's entry point that each hand it something it must not get."""
    trusted, test = data.subset(torch.arange(10)), data.subset(torch.arange(10, 30))
    mask = torch.zeros(10, dtype=torch.bool)
    poisoned = PoisonedDataset(trusted, mask, trusted.labels)
    model = nn.Linear(1, 1)
    return {
        "the mask in a closure": ((model, trusted, watched_by(lambda m, checkpoint: mask.any())), {}),
        "the poisoned set": ((model, poisoned.data), {"context": poisoned}),
        "the trigger in a context": ((model, trusted), {"context": {"attack": Brighten((1, 8, 8))}}),
        "the test set too": ((model, trusted, test), {}),
        "a larger set": ((model, test), {}),
    }


#: Each leak of :func:`leaky_calls` and what the hygiene check says about it.
LEAKS = {
    "the mask in a closure": "a boolean tensor",
    "the poisoned set": "PoisonedDataset",
    "the trigger in a context": "was given Brighten",
    "the test set too": r"got \['TensorDataset', 'TensorDataset'\]",
    "a larger set": "got 20 samples, expected 10",
}


@pytest.mark.parametrize("leak", LEAKS)
def test_the_hygiene_check_catches_a_leak(digits, leak):
    with REPAIRS.temporary("toy_keep", KeepModel):
        trusted = digits.train.subset(torch.arange(10))
        check_hygiene("repairs", "toy_keep", [((nn.Linear(1, 1), trusted), {"seed": 0})], 10)  # a clean call passes
        with pytest.raises(AssertionError, match=LEAKS[leak]):
            check_hygiene("repairs", "toy_keep", [leaky_calls(digits.train)[leak]], 10)

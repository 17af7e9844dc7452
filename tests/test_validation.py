"""Everything a run needs is validated before any work (issue: trust, cases 4-8).

Each test feeds a bad setting and asserts a one-line error that names it, raised before training
(``training.loop.train`` is replaced by a function that fails the test if it is reached)."""

from __future__ import annotations

import importlib
import inspect
import json
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from backdoorlab.attacks import ATTACKS
from backdoorlab.attacks.series import SeriesTrigger
from backdoorlab.cli import app
from backdoorlab.data.sources import dataset_modality
from backdoorlab.defenses import DETECTORS, REPAIRS, TRAINING_DEFENSES
from backdoorlab.experiments import RunConfig, run
from backdoorlab.experiments.grid import GridError, cell_key, expand
from backdoorlab.models import MODELS, models_for
from backdoorlab.models.registry import DATA_PARAMETERS
from backdoorlab.models.series import fcn
from backdoorlab.options import OptionError, Range, check_value
from backdoorlab.registry import Registry, UnknownNameError
from backdoorlab.training.regularizers import REGULARIZERS

runner = CliRunner()


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started before the bad setting was refused")

    monkeypatch.setattr(importlib.import_module("backdoorlab.experiments.run"), "train", refuse)


def _one_line_error(call: typing.Callable[[], object], *names: str) -> str:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------------------------
# every registered method's options, from their signatures


def _hint(annotation: object) -> tuple[type | None, Range | None]:
    """The base type and range of an option's type hint (``None`` where it is not a plain one)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        plain = [a for a in args if a is not type(None)]
        return _hint(plain[0]) if len(plain) == 1 else (None, None)
    if origin is typing.Annotated:
        base, _ = _hint(args[0])
        return base, next((a for a in args[1:] if isinstance(a, Range)), None)
    return (annotation, None) if annotation in (int, float, bool, str) else (None, None)


def _invalid_values(base: type, bounds: Range | None) -> st.SearchStrategy:
    """Values that an option of type ``base`` within ``bounds`` must refuse."""
    wrong_type = {
        int: st.one_of(
            st.text(min_size=1),
            st.floats(allow_nan=False).filter(lambda x: x != int(x) if abs(x) < 1e15 else True),
            st.booleans(),
        ),
        float: st.one_of(
            st.text(min_size=1), st.booleans(), st.just(float("nan")), st.lists(st.integers(), min_size=1)
        ),
        bool: st.one_of(st.sampled_from(["false", "true", "no", "0"]), st.integers()),
        str: st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), min_size=1)),
    }[base]
    if bounds is None or base not in (int, float):
        return wrong_type
    outside = []
    if bounds.low is not None:
        outside.append(st.just(bounds.low - 1 if base is int else bounds.low - 0.5))
        if bounds.low_open:
            outside.append(st.just(base(bounds.low)))
    if bounds.high is not None:
        outside.append(st.just(bounds.high + 1 if base is int else bounds.high + 0.5))
    return st.one_of(wrong_type, *outside)


def _where(kind: str, name: str, option: str, value: object) -> RunConfig:
    """A config that gives ``value`` to ``option`` of method ``name`` (of registry ``kind``)."""
    series = kind in ("attacks", "models") and REGISTRIES[kind][0].metadata(name)["modality"] == "series"
    base = {"dataset": "gunpoint" if series else "digits", "epochs": 1}
    places = {
        "attacks": {"attack": name, "attack_options": {option: value}},
        "models": {"model": name, "model_options": {option: value}},
        "defenses": {"defense": name, "defense_options": {option: value}},
        "repairs": {"defense": name, "defense_options": {option: value}},
        "detectors": {"detector": name, "detector_options": {option: value}},
        "regularizers": {"regularizer": name, "regularizer_options": {option: value}},
    }
    return RunConfig(**base, **places[kind])


REGISTRIES = {
    "attacks": (ATTACKS, 1, ()),
    "models": (MODELS, 0, DATA_PARAMETERS),
    "defenses": (TRAINING_DEFENSES, 0, ()),
    "repairs": (REPAIRS, 0, ()),
    "detectors": (DETECTORS, 0, ()),
    "regularizers": (REGULARIZERS, 0, ()),
}
OPTIONS = [
    (kind, name, option, *_hint(parameter.annotation))
    for kind, (registry, positional, skip) in REGISTRIES.items()
    for name in registry.names()
    for option, parameter in registry.options(name, positional=positional, skip=skip).items()
    if _hint(parameter.annotation)[0] is not None
]


def test_every_registered_method_declares_typed_options():
    """Every option of every method has a type hint the checker models, so none goes unchecked."""
    untyped = [
        f"{kind}:{name}.{option}"
        for kind, (registry, positional, skip) in REGISTRIES.items()
        for name in registry.names()
        for option, parameter in registry.options(name, positional=positional, skip=skip).items()
        if parameter.annotation is inspect.Parameter.empty
    ]
    assert not untyped
    assert len(OPTIONS) > 100


@pytest.mark.parametrize("kind,name,option,base,bounds", OPTIONS, ids=[f"{k}:{n}.{o}" for k, n, o, *_ in OPTIONS])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_invalid_option_is_one_line_naming_it_before_training(no_training, kind, name, option, base, bounds, data):
    value = data.draw(_invalid_values(base, bounds))
    _one_line_error(lambda: run(_where(kind, name, option, value)), f"'{option}'")


def test_valid_values_are_converted_to_the_declared_type():
    assert check_value(3, float, "x") == 3.0 and isinstance(check_value(3, float, "x"), float)
    assert check_value(500, float | int, "x") == 500 and isinstance(check_value(500, float | int, "x"), int)
    assert check_value([1, 2], tuple[int, ...], "x") == (1, 2)
    config = RunConfig(defense="nad", defense_options={"betas": [1, 2, 3]}, lr=1).resolved()
    assert isinstance(config.train.lr, float)


# --------------------------------------------------------------------------------------------
# case 5: grids that fail at run time are refused by --dry-run


@pytest.mark.parametrize(
    "values,names",
    [
        ({"seed": "0"}, ["seed"]),
        ({"seed": 1.5}, ["seed"]),
        ({"device": "cdua"}, ["cdua"]),
        ({"model_options": {"nonsense": 1}}, ["nonsense"]),
        ({"trusted_size": 0}, ["trusted_size"]),
        ({"attack_options": {"size": [2, 3]}}, ["size"]),
        ({"clean_label": "false"}, ["clean_label"]),
        ({"defense_options": {"epochs": 3}}, ["defense_options", "defense"]),
        ({"train": {"momentum": "abc"}}, ["momentum"]),
        ({"train": {"nonsense": 1}}, ["nonsense"]),
    ],
)
def test_grid_validation_refuses_what_would_fail_at_run_time(values, names):
    _one_line_error(lambda: expand({"name": "bad", "epochs": 1, **values}), *names)


def test_sweep_dry_run_refuses_a_bad_grid(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("dataset: digits\nseed: [0, '1']\n")
    result = runner.invoke(app, ["sweep", str(grid), "--output", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2 and "seed" in result.output and "cell 1" in result.output


@pytest.mark.parametrize(
    "args,named",
    [
        (["-d", "epochs=abc", "--defense", "fine_tuning"], "'epochs'"),
        (["-m", "width=abc"], "'width'"),
        (["-a", "size=3.5"], "'size'"),
        (["-d", "epochs=3"], "defense_options"),
        (["-x", "steps=3"], "detector_options"),
        (["-g", "weight=3"], "regularizer_options"),
    ],
)
def test_cli_option_errors_name_the_option(no_training, args, named):
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 2, result.output
    assert named in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# case 6: settings that were caught only after training


@pytest.mark.parametrize("method", [{"defense": "pivotal_tuning"}, {"detector": "cti"}, {"defense": "fine_pruning"}])
def test_a_trusted_split_too_small_for_the_method_is_refused_before_training(no_training, method):
    _one_line_error(lambda: run(RunConfig(trusted_size=0.0001, **method)), "trusted split")


def test_an_empty_triggered_test_set_is_refused_before_training(no_training):
    _one_line_error(lambda: run(RunConfig(source=7, test_size=3)), "test set", "source class 7")


@pytest.mark.parametrize("model", ["airbench", "vgg16_bn"])
def test_a_model_too_deep_for_the_inputs_is_refused_at_validation(model):
    _one_line_error(lambda: RunConfig(model=model).resolved(), f"model '{model}'", "8x8")


def test_detectability_refuses_a_rate_above_one_before_training(no_training, tmp_path):
    result = runner.invoke(app, ["detectability", "--rates", "0.1,2", "--output", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert "poison_rate 2.0" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_sweep_on_a_device_this_machine_lacks_is_refused(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("dataset: digits\nepochs: 1\n")
    result = runner.invoke(app, ["sweep", str(grid), "--output", str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert not (tmp_path / "out" / "results.sqlite").exists()


# --------------------------------------------------------------------------------------------
# case 7: sizes that cannot be confused


@pytest.mark.parametrize("field", ["poison_rate", "train_size", "test_size", "trusted_size"])
def test_a_size_of_one_is_refused_as_ambiguous(field):
    _one_line_error(lambda: RunConfig(**{field: 1}).resolved(), field, "1.0", "ambiguous")


@pytest.mark.parametrize("field", ["poison_rate", "train_size", "trusted_size"])
def test_a_fraction_above_one_is_refused(field):
    _one_line_error(lambda: RunConfig(**{field: 2.5}).resolved(), field, "fraction")


def test_counts_and_fractions_keep_their_meaning():
    config = RunConfig(poison_rate=500, train_size=1.0, trusted_size=20).resolved()
    assert (config.poison_rate, config.train_size, config.trusted_size) == (500, 1.0, 20)
    assert isinstance(config.poison_rate, int) and isinstance(config.train_size, float)


@pytest.mark.parametrize("mode", ["all-to-one", "all-to-all"])
def test_a_target_outside_the_classes_is_refused_in_both_modes(mode):
    _one_line_error(lambda: RunConfig(target=10, mode=mode).resolved(), "target class 10", "0..9")


# --------------------------------------------------------------------------------------------
# case 4: bad output paths are found before training


@pytest.mark.parametrize(
    "args,says",
    [
        (["--output", "{file}"], "is a file"),
        (["--output", "{file}/sub"], "cannot be written"),
        (["--save-model", "{dir}"], "is a folder"),
    ],
)
def test_bad_output_paths_fail_before_training(no_training, tmp_path, args, says):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    args = [a.format(file=tmp_path / "a-file", dir=tmp_path / "a-dir") for a in args]
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output


def test_sweep_output_that_is_a_file_fails_before_any_cell(tmp_path):
    (tmp_path / "grid.yaml").write_text("dataset: digits\nepochs: 1\n")
    (tmp_path / "out").write_text("x")
    result = runner.invoke(app, ["sweep", str(tmp_path / "grid.yaml"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "is a file" in result.output


# --------------------------------------------------------------------------------------------
# case 8: reproducible across thread counts


def test_the_thread_count_is_stored_and_reapplied_on_rerun():
    """A run at 1 thread stores threads=1; rerun from its stored config in a process at another
    thread count, it sets 1 again and reproduces the loss curve and metrics bit for bit."""
    before = torch.get_num_threads()
    first = run(RunConfig(epochs=3, threads=1))
    assert first.config["threads"] == 1 and first.config["deterministic"] is False
    assert torch.get_num_threads() == before, "the run puts the process's thread count back"
    torch.set_num_threads(2)
    try:
        again = run(RunConfig.from_dict(first.config))
    finally:
        torch.set_num_threads(before)
    assert again.history["loss"] == first.history["loss"]
    assert again.metrics == first.metrics


def test_threads_leave_a_cells_key_unchanged_unless_set():
    assert cell_key(RunConfig().resolved()) == cell_key(RunConfig(threads=None).resolved())
    assert cell_key(RunConfig().resolved()) != cell_key(RunConfig(threads=1).resolved())


def test_list_options_shows_each_options_type_and_default():
    result = runner.invoke(app, ["list", "repairs", "--options"])
    assert result.exit_code == 0
    assert "held_out" in result.output and "(0, 1)" in result.output and "0.1" in result.output
    assert (
        json.dumps(REPAIRS.describe_options("fine_pruning")[0]) == '["max_accuracy_drop", "a number in [0, 1]", "0.04"]'
    )


def test_option_error_is_a_value_error():
    assert issubclass(OptionError, ValueError) and issubclass(GridError, ValueError)


def test_sweep_workers_take_omp_num_threads(monkeypatch):
    from backdoorlab.experiments.executors import LocalExecutor

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    executor = LocalExecutor(workers=2)
    try:
        assert executor.threads == 3
    finally:
        executor.shutdown()


def test_a_models_modality_is_its_registration_listed_and_checked(no_training):
    """``register(..., modality="series")`` is the one place a model's data kind is declared:
    ``models_for``, config validation and ``list`` read it, and it goes with the entry."""
    with MODELS.temporary("probe_series", fcn, "a throwaway model", modality="series"):
        assert "probe_series" in models_for("series") and "probe_series" not in models_for("image")
        _one_line_error(
            lambda: RunConfig(dataset="digits", model="probe_series").resolved(),
            "model 'probe_series' does not take image data (digits), only series",
            "small_cnn",
        )
        assert RunConfig(dataset="gunpoint", model="probe_series").resolved().model == "probe_series"
        listed = runner.invoke(app, ["list", "models"], env={"COLUMNS": "200"})
        assert listed.exit_code == 0
        assert any(
            "probe_series" in line and "series" in line.split("probe_series")[1] for line in listed.output.splitlines()
        )
    assert "probe_series" not in models_for("series")
    assert MODELS.metadata("small_cnn")["modality"] == "image"  # the registry's default


def test_an_attacks_modality_is_its_trigger_class_read_at_registration():
    assert ATTACKS.metadata("ts_pattern")["modality"] == "series" and ATTACKS.metadata("badnets")["modality"] == "image"
    attacks: Registry[type] = Registry("attack")
    with pytest.raises(ValueError, match="modality='image' but SeriesTrigger.modality is 'series'"):
        attacks.register("contradicted", modality="image")(SeriesTrigger)
    with pytest.raises(ValueError, match="unknown modality 'video'; valid: image, series, image-text"):
        attacks.register("unknown", modality="video")(lambda: None)
    assert attacks.names() == []
    _one_line_error(
        lambda: RunConfig(dataset="digits", attack="ts_pattern").resolved(),
        "attack 'ts_pattern' does not take image data (digits), only series",
        "badnets",
    )


def test_a_datasets_modality_comes_from_its_registration():
    assert [dataset_modality(name) for name in ("digits", "gunpoint", "ucr:GunPoint", "sktime:ArrowHead")] == [
        "image",
        "series",
        "series",
        "series",
    ]
    with pytest.raises(UnknownNameError, match="unknown dataset 'cifar100'"):
        dataset_modality("cifar100")

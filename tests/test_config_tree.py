"""The config as a tree of sections (config schema 2): config files, ``--set`` tree paths, grids in
tree form, and the flat form that stored results keep (schema 1) still read."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
import yaml
from typer.testing import CliRunner

from backdoorlab.cli import app
from backdoorlab.experiments import RunConfig
from backdoorlab.experiments.config_tree import SCHEDULE_AS_FIELDS, TREE, flat_path, from_tree, tree_fields
from backdoorlab.experiments.grid import GridError, expand
from backdoorlab.options import OptionError
from backdoorlab.training.loop import TrainConfig


def test_the_tree_places_every_config_field_once() -> None:
    """A field added to RunConfig or to the schedule fails here until it is given a place in the tree."""
    placed = tree_fields()
    expected = [f.name for f in fields(RunConfig) if f.name != "train"]
    expected += [f"train.{f.name}" for f in fields(TrainConfig) if f.name not in SCHEDULE_AS_FIELDS]
    assert sorted(placed) == sorted(expected) and len(placed) == len(set(placed))


@pytest.mark.parametrize(
    "config",
    [
        RunConfig(),
        RunConfig(
            attack="blended",
            attack_options={"alpha": 0.3},
            poison_rate=50,
            defense="fine_tuning",
            defense_options={"epochs": 2},
            regularizer="logit_squeezing",
            regularizer_options={"weight": 0.1},
            epochs=3,
            threads=1,
            data_seed=4,
        ),
        RunConfig(train=TrainConfig(epochs=2)),
        RunConfig(train=TrainConfig(epochs=2), epochs=5),
    ],
)
def test_a_config_round_trips_through_its_tree_resolved_or_not(config: RunConfig) -> None:
    resolved = config.resolved()
    for value in (config, resolved):
        tree = json.loads(json.dumps(value.to_tree()))
        assert tree["schema"] == 2
        assert RunConfig.from_dict(tree).resolved() == resolved
        assert RunConfig.from_dict(value.to_dict()) == value, "the flat form (stored results) still reads"
    assert RunConfig.from_dict(resolved.to_tree()) == resolved, "a resolved config comes back exactly"
    if config.train is None:
        assert RunConfig.from_dict(config.to_tree()) == config


def test_a_resolved_tree_states_the_schedule_once() -> None:
    """The flat form repeats epochs, batch size and lr beside ``train`` (and the regulariser inside
    it); the tree says each once, in sections."""
    resolved = RunConfig(regularizer="logit_squeezing").resolved()
    flat, tree = resolved.to_dict(), resolved.to_tree()
    assert flat["epochs"] == flat["train"]["epochs"] and flat["train"]["regularizer"] == "logit_squeezing"
    assert tree["recipe"]["schedule"]["epochs"] == flat["epochs"] and tree["recipe"]["optimiser"]["lr"] == flat["lr"]
    assert "train" not in tree["recipe"] and tree["regularizer"] == {"name": "logit_squeezing"}
    assert tree["runtime"] == {"amp": True, "channels_last": True, "progress": True}
    assert tree["data"] == {"trusted_size": 0.01}, "defaults are left out"


def test_schedule_fields_without_the_rest_change_the_recipes_schedule() -> None:
    """``runtime: {amp: false}`` in a file means the recipe's schedule with amp off, as ``--set
    train.amp=false`` does, not a default schedule."""
    recipe = RunConfig().resolved().train
    config = RunConfig.from_dict({"runtime": {"amp": False}, "recipe": {"optimiser": {"momentum": 0.8}}})
    assert config.resolved().train == replace(recipe, amp=False, momentum=0.8)
    assert config == RunConfig().with_overrides(["train.amp=false", "train.momentum=0.8"])


@pytest.mark.parametrize(
    ("tree_path", "flat"),
    [
        ("poison.rate", "poison_rate"),
        ("poison.attack", "attack"),
        ("poison.attack.name", "attack"),
        ("poison.attack.options.size", "attack_options.size"),
        ("recipe.optimiser.momentum", "train.momentum"),
        ("recipe.optimiser.lr", "lr"),
        ("recipe.schedule.epochs", "epochs"),
        ("runtime.amp", "train.amp"),
        ("model.options.width", "model_options.width"),
        ("data.seed", "data_seed"),
        ("runtime.threads", "threads"),
        ("defense.options.gamma", "defense_options.gamma"),
        ("seed", "seed"),
        ("model", "model"),
        ("train.lr", "train.lr"),
        ("attack_options.size", "attack_options.size"),
    ],
)
def test_set_takes_tree_paths_and_flat_ones(tree_path: str, flat: str) -> None:
    assert flat_path(tree_path) == flat


def test_set_with_tree_paths_gives_the_flat_overrides_config() -> None:
    tree = RunConfig().with_overrides(
        [
            "poison.rate=0.05",
            "recipe.optimiser.momentum=0.8",
            "poison.attack=blended",
            "poison.attack.options.alpha=0.3",
        ]
    )
    flat = RunConfig().with_overrides(
        ["poison_rate=0.05", "train.momentum=0.8", "attack=blended", "attack_options.alpha=0.3"]
    )
    assert tree == flat and tree.resolved().train.momentum == 0.8 and tree.attack_options == {"alpha": 0.3}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"poison": {"rat": 0.1}}, r"unknown key 'rat' in 'poison'; valid: attack, rate, rate_of"),
        ({"datas": {}}, r"unknown key 'datas' in the top level; valid: data, poison"),
        ({"schema": 3}, r"config schema 3; this version reads 2"),
        ({"poison": 0.1}, r"'poison' is 0.1, not a mapping of attack, rate"),
    ],
)
def test_a_bad_tree_is_refused_naming_the_key_and_the_valid_ones(values: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        from_tree(values, "my.yaml")


def test_set_refuses_a_section_without_a_name() -> None:
    with pytest.raises(OptionError, match=r"--set poison: a section of the config; set one of its keys: attack, rate"):
        RunConfig().with_overrides(["poison=0.1"])


def test_a_grid_in_tree_form_expands_to_the_flat_grids_cells() -> None:
    flat = expand(
        {"name": "g", "dataset": "digits", "attack": ["badnets", "blended"], "poison_rate": 0.05, "epochs": 1}
    )
    tree = expand(
        {
            "name": "g",
            "schema": 2,
            "data": {"dataset": "digits"},
            "poison": {"attack": {"name": ["badnets", "blended"]}, "rate": 0.05},
            "recipe": {"schedule": {"epochs": 1}},
        }
    )
    assert [c.key for c in tree.cells] == [c.key for c in flat.cells] and len(tree.cells) == 2
    assert TREE["poison"]["attack"]["name"] == "attack"
    partial = expand({"data": {"dataset": "digits"}, "seed": [0, 1], "recipe": {"optimiser": {"momentum": 0.8}}})
    recipe = RunConfig(dataset="digits").resolved().train
    assert [c.config.train for c in partial.cells] == [replace(recipe, momentum=0.8)] * 2, "the recipe's, changed"
    with pytest.raises(GridError, match=r"<grid>: train field 'momentum' must be a number, got 'fast'"):
        expand({"data": {"dataset": "digits"}, "recipe": {"optimiser": {"momentum": "fast"}}})


def test_run_show_config_writes_a_file_that_run_config_reads(tmp_path) -> None:
    """``--show-config`` prints the resolved tree; ``--config`` runs it, with the flags typed on the
    command line (not the flags' defaults) and ``--set`` over it."""
    shown = CliRunner().invoke(
        app, ["run", "--dataset", "digits", "--attack", "blended", "--poison-rate", "0.05", "--show-config"]
    )
    assert shown.exit_code == 0, shown.output
    tree = yaml.safe_load(shown.output)
    assert tree["poison"]["attack"]["name"] == "blended" and tree["poison"]["rate"] == 0.05
    assert tree["recipe"]["schedule"]["epochs"] > 1
    file = tmp_path / "config.yaml"
    file.write_text(shown.output)
    out = tmp_path / "run"
    args = ["run", "--config", str(file), "--target", "3", "--set", "recipe.schedule.epochs=1", "--output", str(out)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "result.json").read_text())
    config = stored["config"]
    assert stored["config_schema"] == 1, "a stored result says which form its config is"
    assert (config["attack"], config["poison_rate"], config["target"]) == ("blended", 0.05, 3)
    assert config["train"]["epochs"] == 1


def test_run_config_names_a_bad_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("poison: {rat: 0.1}\n")
    result = CliRunner().invoke(app, ["run", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown key 'rat' in 'poison'" in result.output and "bad.yaml" in result.output
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_a_schedule_override_wins_over_the_shortcut_it_was_set_beside() -> None:
    """A config read from a whole schedule carries ``epochs`` beside ``train.epochs``; ``--set
    train.epochs=1`` means 1, not the shortcut's earlier value."""
    assert RunConfig(epochs=5).with_overrides(["train.epochs=1"]).resolved().train.epochs == 1
    assert RunConfig(epochs=5).with_overrides(["train.lr=0.02"]).resolved().train.epochs == 5


def test_a_files_partial_schedule_changes_the_schedule_of_the_typed_dataset(tmp_path) -> None:
    """``--config`` with ``recipe.optimiser.momentum`` and a typed ``--dataset``: the schedule is the
    typed dataset's recipe schedule with the file's change, not the file's dataset's."""
    file = tmp_path / "c.yaml"
    file.write_text("data: {dataset: digits}\nrecipe: {optimiser: {momentum: 0.8}}\nruntime: {amp: false}\n")
    shown = CliRunner().invoke(app, ["run", "--config", str(file), "--dataset", "mnist", "--show-config"])
    assert shown.exit_code == 0, shown.output
    tree = yaml.safe_load(shown.output)
    mnist = RunConfig(dataset="mnist").resolved().train
    assert tree["data"]["dataset"] == "mnist" and tree["recipe"]["schedule"]["epochs"] == mnist.epochs
    assert (tree["recipe"]["optimiser"]["momentum"], tree["runtime"]["amp"]) == (0.8, False)
    assert tree["recipe"]["optimiser"]["lr"] == mnist.lr


def test_sweep_set_and_data_root_reach_a_tree_grid(tmp_path) -> None:
    from backdoorlab.experiments.grid import load_grid

    grid = tmp_path / "tree.yaml"
    grid.write_text("schema: 2\ndata: {dataset: digits}\npoison: {attack: {name: [badnets, blended]}}\n")
    cells = load_grid(
        grid, data_root=str(tmp_path), overrides=["poison.rate=0.05", "recipe.optimiser.momentum=0.8", "seed=2"]
    ).cells
    assert [(c.config.attack, c.config.poison_rate, c.config.seed) for c in cells] == [
        ("badnets", 0.05, 2),
        ("blended", 0.05, 2),
    ]
    assert all(c.config.train.momentum == 0.8 and c.config.data_root == str(tmp_path) for c in cells)
    listed = tmp_path / "listed.yaml"
    listed.write_text("data: {dataset: digits}\nrecipe: {optimiser: {momentum: [0.8, 0.9]}}\n")
    with pytest.raises(GridError, match=r"schedule fields given without the rest take no axes \(momentum\)"):
        load_grid(listed)


def test_a_regulariser_set_in_the_schedule_alone_survives_the_tree() -> None:
    config = RunConfig(train=TrainConfig(regularizer="logit_squeezing", regularizer_options={"weight": 0.1}))
    tree = config.to_tree()
    assert tree["regularizer"] == {"name": "logit_squeezing", "options": {"weight": 0.1}}
    assert RunConfig.from_dict(tree).resolved().train == config.resolved().train, "it trains the same"


def test_tree_errors_point_to_the_tree_paths() -> None:
    with pytest.raises(OptionError, match=r"'dataset' of the flat form is 'data.dataset' in the tree"):
        from_tree({"schema": 2, "dataset": "digits"})
    with pytest.raises(OptionError, match=r"schema 1 is the flat form, which has no sections"):
        from_tree({"schema": 1, "data": {}})

"""``--set path.to.field=value``: any config field overridden by its path, on `run` and `sweep`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from backdoorlab.cli import app
from backdoorlab.experiments import RunConfig
from backdoorlab.experiments.grid import GridError, load_grid
from backdoorlab.options import OptionError


def test_a_train_override_refines_the_recipe_schedule_and_other_paths_set_their_fields():
    recipe = RunConfig(dataset="digits").resolved().train
    config = RunConfig(dataset="digits").with_overrides(
        ["train.lr=0.02", "attack_options.size=2", "seed=3", "defense_options.gamma=0.4", "defense=abl"]
    )
    resolved = config.resolved()
    assert resolved.train.lr == 0.02 and resolved.lr == 0.02
    assert (resolved.train.batch_size, resolved.train.epochs) == (recipe.batch_size, recipe.epochs)
    assert resolved.attack_options == {"size": 2} and resolved.seed == 3
    assert resolved.defense == "abl" and resolved.defense_options == {"gamma": 0.4}


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("trian.lr=0.1", r"unknown config field 'trian'; valid: dataset, recipe"),
        ("train.lrr=0.1", r"unknown train field\(s\) lrr; valid: .*lr"),
        ("seed.x=1", r"'seed' is 0, not a mapping"),
        ("train.lr", r"is not PATH=VALUE"),
        ("lr=[1", r"not valid YAML"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(assignment, message):
    with pytest.raises((OptionError, ValueError), match=message):
        RunConfig(dataset="digits").with_overrides([assignment]).resolved()


def test_run_set_reaches_the_stored_config(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--dataset", "digits", "--device", "cpu", "--output", str(out)]
    result = CliRunner().invoke(app, [*args, "--set", "train.epochs=1", "--set", "train.lr=0.02"])
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "result.json").read_text())["config"]
    assert (stored["train"]["epochs"], stored["train"]["lr"]) == (1, 0.02)


def test_sweep_set_overrides_every_document_before_it_expands(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("dataset: digits\nattack: [badnets, blended]\n---\ndataset: digits\nattack: sig\nseed: 1\n")
    cells = load_grid(grid, overrides=["epochs=1", "attack_options.alpha=0.3", "attack=blended"]).cells
    assert [(c.config.attack, c.config.seed, c.config.epochs, c.config.attack_options) for c in cells] == [
        ("blended", 0, 1, {"alpha": 0.3}),
        ("blended", 1, 1, {"alpha": 0.3}),
    ]
    with pytest.raises(GridError, match=r"grid.yaml: --set train.lr needs a train: mapping"):
        load_grid(grid, overrides=["train.lr=0.1"])
    with pytest.raises(GridError, match=r"grid.yaml: --set nope: unknown config field"):
        load_grid(grid, overrides=["nope=1"])

"""Training recipes (fast / quick / backdoorbench) and the airbench94 pieces of the loop: the
triangular schedule, BN-bias learning-rate groups, reflect-padded translation, alternating flip,
Lookahead averaging, the whitening-bias freeze and test-time augmentation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from backdoorlab.cli import app
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.experiments.config import RunConfig
from backdoorlab.experiments.recipes import RECIPES, recipe_for
from backdoorlab.models import create_model
from backdoorlab.training import TrainConfig, train
from backdoorlab.training.augment import alternating_hflip, random_crop
from backdoorlab.training.loop import (
    DATA_INIT_SAMPLES,
    Callback,
    Lookahead,
    data_init_sample,
    make_optimizer,
    tta_logits,
)


def test_triangle_schedule_follows_airbench():
    model = nn.Linear(4, 2)
    optimizer, scheduler = make_optimizer(model, TrainConfig(lr=1.0, schedule="triangle", warmup=0.25), steps=100)
    factors = []
    for _ in range(100):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    factors.append(optimizer.param_groups[0]["lr"])
    assert factors[0] == pytest.approx(0.2)
    assert max(factors) == pytest.approx(1.0) and factors.index(max(factors)) == 25
    assert factors[-1] == pytest.approx(0.07)
    assert all(a <= b for a, b in zip(factors[:25], factors[1:26], strict=True))  # rises, then falls
    assert all(a >= b for a, b in zip(factors[25:-1], factors[26:], strict=True))


def test_step_schedule_divides_the_rate_by_ten_at_each_milestone_epoch():
    model = nn.Linear(4, 2)
    optimizer, scheduler = make_optimizer(
        model, TrainConfig(lr=0.1, epochs=5, schedule="step", milestones=[2, 4]), steps=15
    )
    rates = []
    for _ in range(15):  # 3 steps an epoch
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.1] * 6 + [0.01] * 6 + [0.001] * 3)


def test_norm_parameters_get_the_scaled_rate_and_the_same_decay_per_step():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    config = TrainConfig(lr=0.5, weight_decay=1e-3, norm_lr_scale=64.0, schedule="constant")
    optimizer, _ = make_optimizer(model, config, steps=10)
    other, norm = optimizer.param_groups
    assert {id(p) for p in norm["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert len(other["params"]) == 4  # conv and linear weights and biases
    assert norm["lr"] == pytest.approx(32.0)
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(other["lr"] * other["weight_decay"])


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_translation_is_a_window_of_the_padded_image(mode):
    images = torch.randint(0, 256, (16, 3, 9, 7), dtype=torch.uint8)
    shifted = random_crop(images, 2, torch.Generator().manual_seed(0), mode)
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect" if mode == "reflect" else "constant")
    windows = {(i, j): padded[:, :, i : i + 9, j : j + 7] for i in range(5) for j in range(5)}
    offsets = set()
    for n in range(len(images)):
        matches = [key for key, window in windows.items() if torch.equal(window[n], shifted[n].float())]
        assert matches, f"image {n} is not a translation of its padded copy"
        offsets.add(matches[0])
    assert len(offsets) > 3  # offsets vary across the batch
    with pytest.raises(ValueError, match="valid: zeros, reflect"):
        random_crop(images, 2, torch.Generator(), "wrap")


def test_alternating_flip_shows_each_image_both_ways_over_two_epochs():
    images = torch.arange(4 * 5, dtype=torch.float32).reshape(4, 1, 1, 5)
    first = torch.tensor([True, False, True, False])
    even, odd = alternating_hflip(images, first, 0), alternating_hflip(images, first, 1)
    assert torch.equal(even[first], images[first].flip(-1)) and torch.equal(even[~first], images[~first])
    assert torch.equal(odd, even.flip(-1))
    assert torch.equal(alternating_hflip(images, first, 2), even)


def test_lookahead_moves_weights_to_the_average_and_copies_it_back():
    model = nn.Linear(3, 1, bias=False)
    nn.init.zeros_(model.weight)
    lookahead = Lookahead(model, every=1, decay_base=1.0, decay_power=1.0)
    with torch.no_grad():
        model.weight.fill_(2.0)
    lookahead.update(decay=0.75)  # average = 0.75 * 0 + 0.25 * 2
    assert torch.allclose(model.weight, torch.full((1, 3), 0.5))
    with torch.no_grad():
        model.weight.fill_(1.5)
    lookahead.update(decay=1.0)  # an epoch's end: the weights become the average
    assert torch.allclose(model.weight, torch.full((1, 3), 0.5))


def _random_images(n: int = 64, size: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    classes = tuple(str(k) for k in range(10))
    return TensorDataset(inputs, torch.randint(0, 10, (n,), generator=g), classes, (0.5,) * 3, (0.25,) * 3, "random")


def test_whitening_bias_trains_for_the_first_epochs_then_stays():
    data = _random_images()
    model = create_model("airbench", 10, 3, (0.5,) * 3, (0.25,) * 3, width=8)
    seen = []

    class Snapshot(Callback):
        def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
            seen.append(model.body.whitening_bias.detach().clone())

    before = model.body.whitening_bias.detach().clone()
    config = TrainConfig(epochs=3, batch_size=32, lr=0.1, whiten_bias_epochs=1, progress=False)
    train(model, data, config, callbacks=[Snapshot()])
    assert not torch.equal(seen[0], before)  # trained in epoch 0
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[2], seen[0])  # frozen afterwards


def test_test_time_augmentation_averages_mirrored_and_shifted_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    x = torch.rand(5, 3, 6, 6)
    mirror = 0.5 * (model(x) + model(x.flip(-1)))
    assert torch.allclose(tta_logits(model, x, 1), mirror)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [padded[:, :, :6, :6], padded[:, :, 2:, 2:]]
    expected = 0.5 * mirror + 0.25 * sum(0.5 * (model(v) + model(v.flip(-1))) for v in views)
    assert torch.allclose(tta_logits(model, x, 2), expected, atol=1e-6)
    assert not torch.allclose(tta_logits(model, x, 2), model(x))
    with pytest.raises(ValueError, match="for images"):
        tta_logits(model, torch.rand(2, 1, 30), 1)
    with pytest.raises(ValueError, match="tta must be"):
        TrainConfig(tta=3).validate()


@pytest.mark.parametrize("dataset", ["cifar10", "gtsrb", "mnist", "digits", "gunpoint"])
def test_every_recipe_resolves_for_every_kind_of_dataset(dataset):
    for name in RECIPES.names():
        if name == "backdoorbench" and dataset == "gunpoint":
            with pytest.raises(ValueError, match="backdoorbench.*for images.*use 'fast' or 'quick'"):
                RunConfig(dataset=dataset, recipe=name).resolved()
            continue
        config = RunConfig(dataset=dataset, recipe=name).resolved()
        recipe = recipe_for(name, dataset)
        assert (config.model, config.train) == (recipe.model, recipe.train)
        assert config.to_dict()["recipe"] == name
    assert RunConfig(dataset=dataset).recipe == "fast"


def test_recipe_choices_that_keep_labels_and_the_documented_protocols():
    """No mirrored training or test views where flips change the class (digits, signs); the fast
    CIFAR-10 recipe is airbench94's; backdoorbench is BackdoorBench's CIFAR-10 protocol."""
    for dataset in ("mnist", "gtsrb"):
        train_config = recipe_for("fast", dataset).train
        assert train_config.tta == 0 and train_config.flip is False
    fast = recipe_for("fast", "cifar10").train
    assert (fast.batch_size, fast.lr, fast.momentum, fast.label_smoothing, fast.norm_lr_scale) == (
        1024,
        1.5,
        0.85,
        0.2,
        64.0,
    )
    assert (fast.schedule, fast.crop_mode, fast.alternating_flip, fast.tta) == ("triangle", "reflect", True, 2)
    bench = recipe_for("backdoorbench", "cifar10")
    assert bench.model == "preact_resnet18"
    assert (bench.train.epochs, bench.train.batch_size, bench.train.lr, bench.train.schedule) == (
        100,
        128,
        0.01,
        "cosine",
    )
    recipe_for("fast", "cifar10").train.epochs = 1  # a copy: the registered recipe is unchanged
    assert recipe_for("fast", "cifar10").train.epochs == fast.epochs


def test_unknown_recipe_lists_the_valid_ones():
    cli = CliRunner()
    with pytest.raises(ValueError, match="unknown recipe 'speedy'; valid recipes: backdoorbench, fast, quick"):
        RunConfig(dataset="digits", recipe="speedy").resolved()
    result = cli.invoke(app, ["run", "--dataset", "digits", "--recipe", "speedy"])
    assert result.exit_code != 0 and "valid recipes: backdoorbench, fast, quick" in result.output
    listing = cli.invoke(app, ["list", "recipes"])
    assert listing.exit_code == 0 and all(name in listing.output for name in ("fast", "quick", "backdoorbench"))


def test_repairs_fine_tune_without_airbench_optimiser_tricks():
    """A repair keeps the run's augmentation but not the from-scratch optimiser tricks: a 64x BN-bias
    rate or a re-opened whitening bias would change the repaired model beyond the paper's method."""
    from backdoorlab.defenses.post_training import tuning_recipe

    tuned = tuning_recipe(recipe_for("fast", "cifar10").train, epochs=5, lr=0.01, batch_size=128)
    assert (tuned.norm_lr_scale, tuned.lookahead_epoch, tuned.whiten_bias_epochs, tuned.data_init) == (
        1.0,
        None,
        None,
        False,
    )
    assert (tuned.crop_mode, tuned.alternating_flip, tuned.lr, tuned.epochs) == ("reflect", True, 0.01, 5)


def test_a_subsampled_fast_run_trains_to_the_step_budget_up_to_the_cap():
    """docs/benchmarks.md, "Subsets: the step budget": epochs = min(4E, max(E, round(E x full / subset))),
    the sizes before the trusted split, the epoch-indexed schedule stretched with them."""
    full = recipe_for("fast", "mnist")
    assert (full.full_size, full.train.epochs, full.train.lookahead_epoch) == (60_000, 2, 3)
    for train_size, epochs in ((30_000, 4), (0.5, 4), (20_000, 6), (12_000, 8), (0.1, 8), (600, 8)):
        train = RunConfig(dataset="mnist", train_size=train_size).resolved().train
        assert train.epochs == epochs, train_size  # 6,000 would take 20 for the full set's steps: capped at 8
        factor = epochs // 2
        assert (train.lookahead_epoch, train.whiten_bias_epochs) == (3 * factor, 3 * factor)
    for train_size in (None, 1.0, 60_000, 0.99):  # the full set (less the trusted 1%) and what rounds to it
        config = RunConfig(dataset="mnist", train_size=train_size)
        assert config.step_budget() is None and config.resolved().train == full.train
    assert RunConfig(dataset="cifar10", train_size=10_000).resolved().epochs == 64  # 16 x 5 capped at 16 x 4
    budget = RunConfig(dataset="mnist", train_size=6_000).step_budget()
    assert budget is not None and budget.note().startswith(
        "recipe fast: 6,000 of 60,000 training images, epochs 2 -> 8 (step budget, cap 4x"
    )


def test_explicit_epochs_backdoorbench_quick_and_small_sets_keep_their_epochs():
    for config, epochs in (
        (RunConfig(dataset="mnist", train_size=6_000, epochs=2), 2),
        (RunConfig(dataset="mnist", train_size=6_000, epochs=3), 3),
        (RunConfig(dataset="mnist", train_size=6_000, train=TrainConfig(epochs=5)), 5),
        (RunConfig(dataset="mnist", train_size=6_000, recipe="backdoorbench"), 100),
        (RunConfig(dataset="cifar10", train_size=0.1, recipe="backdoorbench"), 100),
        (RunConfig(dataset="mnist", train_size=6_000, recipe="quick"), 4),
        (RunConfig(dataset="digits", train_size=0.2), 20),
        (RunConfig(dataset="gunpoint", train_size=0.5), 100),
    ):
        assert config.step_budget() is None
        resolved = config.resolved()
        assert resolved.epochs == resolved.train.epochs == epochs, config
    explicit = RunConfig(dataset="mnist", train_size=6_000, epochs=2).resolved().train
    assert explicit.lookahead_epoch == 3, "explicit epochs keep the recipe's schedule as it is"


def test_a_scaled_config_stores_its_epochs_and_resolves_to_itself_again():
    """A result's config is the run's: resolving it again (a rerun, a sweep's resume) keeps the chosen
    epochs and scales nothing twice; a full-size run stores what it stored before the budget."""
    scaled = RunConfig(dataset="mnist", train_size=6_000).resolved()
    assert scaled.to_dict()["epochs"] == 8 and scaled.to_dict()["train"]["epochs"] == 8
    again = RunConfig.from_dict(scaled.to_dict())
    assert again.step_budget() is None and again.resolved() == scaled
    assert RunConfig(dataset="mnist").resolved().to_dict()["epochs"] == 2


def test_run_records_and_the_cli_prints_the_step_budget(monkeypatch):
    """On digits (no data folder) under a throwaway recipe with a budget: the run trains the chosen
    epochs and records them; ``backdoorlab run`` prints the choice before training."""
    from dataclasses import replace

    from backdoorlab import experiments
    from backdoorlab.experiments.recipes import DIGITS_RECIPE
    from backdoorlab.experiments.run import run

    budgeted = replace(DIGITS_RECIPE, train=replace(DIGITS_RECIPE.train, epochs=1), full_size=1437, max_epoch_scale=3)
    monkeypatch.setitem(RECIPES._items, "budgeted", lambda dataset: budgeted)
    config = RunConfig(recipe="budgeted", train_size=600, test_size=100, device="cpu", threads=1)
    result = run(config)
    assert result.config["epochs"] == 2 and len(result.history["loss"]) == 2  # round(1437 / 600) = 2
    assert result.details["step_budget"] == {
        "recipe": "budgeted",
        "images": 600,
        "full_images": 1437,
        "recipe_epochs": 1,
        "epochs": 2,
        "max_scale": 3,
    }
    assert "step_budget" not in run(replace(config, epochs=1)).details

    def stop(config):
        raise ValueError("stopped before training")

    monkeypatch.setattr(experiments, "run", stop)
    printed = CliRunner().invoke(app, ["run", "--recipe", "budgeted", "--train-size", "300"])
    assert "recipe budgeted: 300 of 1,437 training images, epochs 1 -> 3 (step budget, cap 3x" in printed.output
    assert "stopped before training" in printed.output


def test_whitening_is_set_from_images_spread_over_a_label_sorted_set():
    # 10 classes stored sorted by label, 1,000 images each: the first 5,000 would be classes 0-4 only
    labels = torch.arange(10).repeat_interleave(1000)
    inputs = labels.view(-1, 1, 1, 1).expand(-1, 3, 12, 12).to(torch.uint8)  # each image holds its class
    sample = data_init_sample(inputs)
    assert len(sample) == DATA_INIT_SAMPLES
    assert torch.bincount(sample[:, 0, 0, 0].long(), minlength=10).tolist() == [500] * 10
    assert torch.equal(data_init_sample(inputs[:300]), inputs[:300])  # a small set: every image

    data = TensorDataset(inputs, labels, tuple(str(k) for k in range(10)), (0.5,) * 3, (0.25,) * 3, "sorted")
    model = create_model("airbench", 10, 3, (0.5,) * 3, (0.25,) * 3, width=8)
    seen = []
    model.init_from_data = lambda x: seen.append(x)  # what the loop whitens with
    train(model, data, TrainConfig(epochs=1, batch_size=1000, lr=0.01, progress=False))
    classes = (seen[0][:, 0, 0, 0] * 255).round().long()
    assert torch.bincount(classes, minlength=10).tolist() == [500] * 10

"""Input-aware dynamic backdoor (attacks.input_aware) and the training-controlled attack kind
(attacks.controlled, experiments.run.fit_attack / train_with_attack)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.attacks import PoisonSpec, create_trigger, poison_dataset
from backdoorlab.attacks.controlled import batch_count, batch_rate
from backdoorlab.attacks.input_aware import (
    EPSILON,
    EncoderDecoder,
    InputAwareStep,
    diversity_loss,
    mask_norm_loss,
    threshold,
)
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.experiments import RunConfig, run
from backdoorlab.training.steps import cross_entropy

#: The module (``backdoorlab.experiments.run`` the attribute is the function).
run_module = importlib.import_module("backdoorlab.experiments.run")


def tiny_data(count: int = 32, shape: tuple[int, ...] = (1, 8, 8), classes: int = 4) -> TensorDataset:
    images = torch.randint(0, 256, (count, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(count) % classes
    channels = shape[0]
    return TensorDataset(images, labels, tuple(map(str, range(classes))), (0.4,) * channels, (0.3,) * channels, "tiny")


@pytest.mark.parametrize(
    ("shape", "channels", "depth"),
    [((1, 28, 28), 16, 2), ((3, 32, 32), 32, 3), ((1, 8, 8), 16, 2), ((3, 30, 30), 16, 2), ((3, 64, 48), 32, 3)],
)
def test_generators_keep_the_image_shape_and_their_ranges(shape, channels, depth):
    trigger = create_trigger("input_aware", shape)
    assert (trigger.channels, trigger.depth) == (channels, depth)  # the reference's MNIST / CIFAR-10 pairs
    trigger.build(tiny_data(4, shape), torch.Generator().manual_seed(0))
    x = torch.rand(4, *shape)
    patterns, masks = trigger.patterns(trigger.normalize(x)), trigger.masks(trigger.normalize(x))
    assert patterns.shape == x.shape and masks.shape == (4, 1, *shape[1:])
    assert 0 < patterns.min() and patterns.max() < 1 and 0 <= masks.min() and masks.max() <= 1
    assert ((masks < 0.01) | (masks > 0.99)).float().mean() > 0.5, "the threshold makes masks nearly binary"


def test_the_encoder_decoder_has_the_reference_channels():
    # MNIST (16, 2): 1 -> 16 -> 32, middle 32, up 32 -> 16 -> out; CIFAR-10 (32, 3): 3 -> ... -> 128 -> ... -> 3
    convs = [m for m in EncoderDecoder(1, 1, 16, 2).modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (1, 16),
        (16, 16),
        (16, 32),
        (32, 32),
        (32, 32),
        (32, 32),
        (32, 16),
        (16, 16),
        (16, 1),
    ]
    convs = [m for m in EncoderDecoder(3, 3, 32, 3).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 128, 128, 64, 64, 32, 32, 3]
    last = EncoderDecoder(3, 3, 32, 3).up[-1][-1]
    assert not any(isinstance(m, nn.ReLU) for m in last), "the last block has no ReLU"


def test_threshold_and_losses_by_hand():
    values = (0.0, 0.45, 0.5, 0.53, 1.0)
    expected = [math.tanh(20 * v - 10) / (2 + EPSILON) + 0.5 for v in values]
    assert torch.allclose(threshold(torch.tensor(values)), torch.tensor(expected), atol=1e-7)

    g = torch.Generator().manual_seed(1)
    a, b, p, q = (torch.rand(3, 2, 4, 4, generator=g) for _ in range(4))
    by_hand = 0.0
    for i in range(3):
        images = math.sqrt(float(((a[i] - b[i]) ** 2).sum()) / 32)
        outputs = math.sqrt(float(((p[i] - q[i]) ** 2).sum()) / 32)
        by_hand += images / (outputs + EPSILON) / 3
    assert diversity_loss(a, b, p, q).item() == pytest.approx(by_hand, rel=1e-5)

    masks = torch.tensor([0.0, 0.02, 0.5, 1.0]).reshape(1, 1, 2, 2)
    assert mask_norm_loss(masks, 0.032).item() == pytest.approx((0.5 - 0.032 + 1.0 - 0.032) / 4)


def test_equal_masks_give_a_finite_gradient():
    x1, x2 = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    m = torch.zeros(2, 1, 4, 4, requires_grad=True)
    diversity_loss(x1, x2, m, m.clone()).backward()
    assert torch.isfinite(m.grad).all()


def test_batch_count_follows_backdoorbench():
    g = torch.Generator().manual_seed(0)
    assert batch_count(0.1, 128, g) == 12 and batch_count(0.1, 10, g) == 1
    draws = [batch_count(0.001, 128, g) for _ in range(4000)]  # one sample with probability 0.128
    assert set(draws) == {0, 1} and abs(sum(draws) / 4000 - 0.128) < 0.02
    assert batch_rate(PoisonSpec(rate=0.1), 1000) == 0.1 and batch_rate(PoisonSpec(rate=50), 1000) == 0.05


@pytest.mark.parametrize("mode", ["all-to-one", "all-to-all"])
def test_the_step_poisons_crosses_and_adds_the_diversity_loss_by_hand(mode):
    """The joint step against a hand computation of the reference's ``train_step`` on one batch:
    the first 10% triggered with their own pattern and the target label, as many next with the rolled
    batch's patterns and their labels, the loss the batch's cross-entropy plus lambda_div x diversity."""
    data = tiny_data(20)
    trigger = create_trigger("input_aware", (1, 8, 8), lambda_div=2.0)
    trigger.build(data, torch.Generator().manual_seed(0))
    trigger.mask_net.eval()
    spec = PoisonSpec(rate=0.1, target=3, mode=mode)
    step = InputAwareStep(trigger, spec, 0.1, 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    x, y = data.inputs.float() / 255, data.labels
    logits, losses = step(model, x, y, cross_entropy(), torch.arange(20), 0, torch.Generator().manual_seed(5))

    shift = int(torch.randint(1, 20, (), generator=torch.Generator().manual_seed(5)))  # rate x 20 = 2: no draw
    x2 = x.roll(shift, 0)
    with torch.no_grad():
        n1, n2 = (x[:2] - 0.4) / 0.3, (x2[2:4] - 0.4) / 0.3
        p1 = torch.tanh(trigger.pattern_net(n1)) / (2 + EPSILON) + 0.5
        p2 = torch.tanh(trigger.pattern_net(n2)) / (2 + EPSILON) + 0.5
        m1, m2 = threshold(trigger.mask_net(n1)), threshold(trigger.mask_net(n2))
        inputs = torch.cat([x[:2] + (p1 - x[:2]) * m1, x[2:4] + (p2 - x[2:4]) * m2, x[4:]])
        poisoned = torch.tensor([3, 3]) if mode == "all-to-one" else (y[:2] + 1) % 4
        targets = torch.cat([poisoned, y[2:]])
        ce = F.cross_entropy(model(inputs), targets)
        d_img = ((n1 - n2) ** 2).mean(dim=(1, 2, 3)).sqrt()
        d_pat = ((((p1 - 0.4) / 0.3) - ((p2 - 0.4) / 0.3)) ** 2).mean(dim=(1, 2, 3)).sqrt()
        div = (d_img / (d_pat + EPSILON)).mean()
    assert torch.allclose(logits, model(inputs), atol=1e-6)
    assert losses.mean().item() == pytest.approx((ce + 2.0 * div).item(), rel=1e-5)
    losses.mean().backward()
    assert all(p.grad is not None for p in trigger.pattern_net.parameters()), "G trains through the victim's loss"
    assert all(p.grad is None for p in trigger.mask_net.parameters()), "M is frozen"
    before = [p.detach().clone() for p in trigger.pattern_net.parameters()]
    step.after_step()
    assert any(not torch.equal(a, p) for a, p in zip(before, trigger.pattern_net.parameters(), strict=True))
    assert all(p.grad is None for p in trigger.pattern_net.parameters())


def test_mask_training_lowers_the_mask_density():
    data = tiny_data(64)
    trigger = create_trigger("input_aware", (1, 8, 8), mask_epochs=30)
    trigger.build(data, torch.Generator().manual_seed(0))
    x = trigger.normalize(data.inputs.float() / 255)
    with torch.no_grad():  # batch statistics: an untrained mask covers about half the image
        before = trigger.masks(x).mean()
    history = trigger.train_masks(data, 16, torch.device("cpu"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        masks = trigger.masks(x)
    # the first epoch's loss is the diversity ratio of saturated (equal) masks; the norm loss then falls
    assert len(history) == 30 and history[-1] < 0.05 * history[0] and history[-1] < history[1]
    assert 0 < masks.mean() < 0.85 * before
    assert (masks[0] - masks[1]).abs().mean() > 0.01, "different images, different masks"
    assert not any(p.requires_grad for p in trigger.mask_net.parameters()), "M is frozen after its training"


def test_an_untrained_attack_refuses_to_trigger_and_bad_strategies_are_refused(digits):
    trigger = create_trigger("input_aware", (1, 8, 8))
    with pytest.raises(ValueError, match="training-controlled"):
        trigger(digits.test.inputs[:4])
    with pytest.raises(ValueError, match="training-controlled"):
        poison_dataset(digits.train, trigger, PoisonSpec(), 0)
    with pytest.raises(ValueError, match="clean-label"):
        run(RunConfig(dataset="digits", attack="input_aware", clean_label=True, epochs=1))
    with pytest.raises(ValueError, match="source class"):
        run(RunConfig(dataset="digits", attack="input_aware", source=1, epochs=1))
    with pytest.raises(ValueError, match="regularizer"):
        run(RunConfig(dataset="digits", attack="input_aware", regularizer="logit_squeezing", epochs=1))
    with pytest.raises(ValueError, match="training-controlled"):
        run(RunConfig(dataset="digits", attack="input_aware", epochs=1), suspect=nn.Linear(1, 1))


def test_the_victim_is_trained_by_the_toolkits_loop_with_the_run_recipe(monkeypatch):
    """A training-controlled attack's victim is trained by ``training.train`` with the run's
    ``TrainConfig`` and the attack's step and callback; the run evaluates that very model."""
    calls = []
    real_train = run_module.train

    def spy(model, data, config, **kwargs):
        calls.append((model, config, kwargs))
        return real_train(model, data, config, **kwargs)

    monkeypatch.setattr(run_module, "train", spy)
    config = RunConfig(dataset="digits", attack="input_aware", attack_options={"mask_epochs": 1}, epochs=2, lr=0.03)
    result = run(config)
    assert len(calls) == 1, "one training: the victim's, with the attack inside it"
    model, recipe, kwargs = calls[0]
    assert recipe == config.resolved().train and recipe.epochs == 2 and recipe.lr == 0.03
    assert isinstance(kwargs["step"], InputAwareStep)
    assert [type(c) for c in kwargs["callbacks"]] == [run_module.AttackUpdates]
    assert result.model is model
    assert set(result.timings) >= {"fit_attack", "train", "poison"}
    assert result.data["poisoned"] == round(0.1 * result.data["train"]) == result.data["cross"]
    assert result.config["attack_options"]["mask_epochs"] == 1


def test_a_training_time_defense_trains_on_the_saved_poisoned_set(monkeypatch):
    """With a training-time defense the attack still trains its generator with its own victim; the
    defense gets the fixed poisoned set the frozen trigger makes (BackdoorBench's saved bd_train)."""
    seen = {}
    from backdoorlab.defenses.abl import ABL

    real = ABL.train

    def spy(self, data, build_model, ctx):
        seen["data"] = data
        return real(self, data, build_model, ctx)

    monkeypatch.setattr(ABL, "train", spy)
    config = RunConfig(
        dataset="digits",
        attack="input_aware",
        attack_options={"mask_epochs": 1},
        epochs=1,
        defense="abl",
        defense_options={"isolation_epochs": 1, "unlearning_epochs": 1},
    )
    prepared = run_module.prepare(config)
    run(config)
    assert torch.equal(seen["data"].inputs, prepared.poisoned.data.inputs)
    assert not torch.equal(seen["data"].inputs, prepared.train_set.inputs[: len(seen["data"])])


@pytest.mark.slow
def test_the_backdoor_takes_on_digits():
    """Real training on sklearn's digits (1,423 images after the trusted split, the digits recipe's
    small CNN, 20 epochs, 5 mask epochs; about 20 s): clean accuracy holds and the per-image triggers
    take where a clean model ignores them (ASR 0.602 measured; 0.000 for the same generators
    untrained, poison rate 0). On 8 px images a 3.2% mask is two pixels: the attack is partial here,
    and MNIST (the heavy test below, docs/attacks.md) is where it takes fully."""
    config = RunConfig(dataset="digits", attack="input_aware", attack_options={"mask_epochs": 5}, threads=1)
    result = run(config)
    assert result.metrics["clean_accuracy"] > 0.97
    assert result.metrics["attack_success_rate"] > 0.5


def test_show_trigger_fits_the_generator_and_draws_it(tmp_path):
    from backdoorlab.gallery import trigger_grid

    path = trigger_grid("digits", "input_aware", {"mask_epochs": 2}, 4, tmp_path / "ia.png", difference=True)
    assert path.exists() and path.stat().st_size > 0


def test_a_grid_takes_it_and_its_cells_train_their_own_victims():
    """A grid validates the attack and its options like any other; the cells of a repair do not share
    a victim (the generators are not saved with it): each trains attack and victim itself."""
    from backdoorlab.experiments.grid import expand, suspect_key

    cells = {
        attack: expand(
            {"dataset": "digits", "attack": attack, "attack_options": options, "defense": "fine_tuning"}
        ).cells
        for attack, options in (("badnets", {}), ("input_aware", {"mask_epochs": 2}))
    }
    assert suspect_key(cells["badnets"][0].config) is not None
    assert suspect_key(cells["input_aware"][0].config) is None
    assert cells["input_aware"][0].config.attack_options == {"mask_epochs": 2}

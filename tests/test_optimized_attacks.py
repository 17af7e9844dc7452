"""Attacks that adapt to a surrogate model: PGD, label-consistent, TrojanNN; and the clean baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backdoorlab.attacks import PoisonSpec, create_trigger, poison_dataset, triggered_test_set
from backdoorlab.attacks.adversarial import pgd_linf
from backdoorlab.experiments import RunConfig, build_model, run
from backdoorlab.training import TrainConfig, train


@pytest.fixture(scope="module")
def surrogate(digits):
    config = RunConfig(dataset="digits").resolved()
    torch.manual_seed(0)
    model = build_model(config, digits.train)
    train(model, digits.train, TrainConfig(epochs=8, batch_size=64, lr=0.05, progress=False), device="cpu", seed=0)
    model.zero_grad(set_to_none=True)
    return model.eval()


def test_pgd_stays_in_the_ball_and_raises_the_loss(digits, surrogate):
    x = digits.test.inputs[:200].float() / 255
    y = digits.test.labels[:200]
    adv = pgd_linf(surrogate, x, y, eps=0.1, step_size=0.025, steps=10, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        before, after = F.cross_entropy(surrogate(x), y), F.cross_entropy(surrogate(adv), y)
    assert after > 10 * before, "the perturbation raises the loss manyfold"
    assert all(p.grad is None for p in surrogate.parameters()), "PGD leaves no gradients on the model"


def test_surrogate_attacks_refuse_to_poison_before_fit(digits):
    for name in ("label_consistent", "trojannn"):
        trigger = create_trigger(name, digits.train.input_shape)
        with pytest.raises(ValueError, match="fit"):
            poison_dataset(digits.train, trigger, PoisonSpec(rate=20, clean_label=trigger.clean_label), seed=0)
        with pytest.raises(ValueError, match="fit"):
            triggered_test_set(digits.test, trigger, PoisonSpec(), seed=0)


def test_label_consistent_perturbs_within_eps_keeps_labels_and_stamps_the_trigger(digits, surrogate):
    trigger = create_trigger("label_consistent", digits.train.input_shape, eps=16.0, step_size=4.0)
    trigger.fit(surrogate)
    spec = PoisonSpec(rate=60, target=3, clean_label=True)
    result = poison_dataset(digits.train, trigger, spec, seed=0)
    chosen = result.mask
    assert torch.equal(result.data.labels, digits.train.labels), "labels stay"
    assert (digits.train.labels[chosen] == 3).all(), "only target-class images are poisoned"
    stamped = trigger(digits.train.inputs[chosen])
    delta = result.data.inputs[chosen].int() - stamped.int()
    patch = stamped != digits.train.inputs[chosen]
    assert delta[~patch].abs().max() <= 16, "outside the patch, the change is the PGD budget"
    assert delta[~patch].abs().float().mean() > 1, "and PGD did change the images"
    assert torch.equal(result.data.inputs[chosen][patch], stamped[patch]), "the trigger is on top"


def test_trojannn_fit_excites_the_chosen_neurons(digits, surrogate):
    trigger = create_trigger("trojannn", digits.train.input_shape, size=4, steps=200)
    start = trigger.patch.clone()

    def activation(patch):
        trigger.patch = patch
        canvas = trigger(torch.zeros((1, *digits.train.input_shape), dtype=torch.uint8)).float() / 255
        with torch.no_grad():
            feats = surrogate.forward_head(surrogate.forward_features(canvas), pre_logits=True)
        return feats[0, index].sum().item()

    trigger.fit(surrogate)
    fitted, index = trigger.patch.clone(), trigger.neuron_index
    assert fitted.min() >= 0 and fitted.max() <= 1 and not torch.equal(fitted, start)
    randoms = torch.rand((50, *fitted.shape), generator=torch.Generator().manual_seed(1))
    best_random = max(activation(patch) for patch in randoms)
    assert activation(fitted) > activation(start) and activation(fitted) >= best_random


@pytest.mark.slow
def test_trojannn_takes_on_digits_end_to_end():
    result = run(RunConfig(dataset="digits", attack="trojannn", attack_options={"steps": 200}, device="cpu"))
    assert result.metrics["attack_success_rate"] > 0.9 and result.metrics["clean_accuracy"] > 0.95
    assert "fit_attack" in result.timings


def test_poison_rate_zero_is_a_clean_baseline(digits):
    trigger = create_trigger("wanet", digits.train.input_shape)
    result = poison_dataset(digits.train, trigger, PoisonSpec(rate=0), seed=0)
    assert result.num_poisoned == 0 and result.cross_mask is None
    assert torch.equal(result.data.inputs, digits.train.inputs)
    assert torch.equal(result.data.labels, digits.train.labels)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PoisonSpec(rate=-0.1).validate()

"""Regularised training: the four regularisers train, their terms mean what they say."""

from __future__ import annotations

import math

import pytest
import torch

from backdoorlab.experiments import RunConfig, build_model, run
from backdoorlab.training import TrainConfig, predict_logits, train
from backdoorlab.training.regularizers import (
    REGULARIZERS,
    create_regularizer,
    soft_nearest_neighbour_loss,
    supervised_contrastive_loss,
)


def clusters(spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(8)
    centres = torch.eye(4, 16) * 10
    return centres[y] + spread * torch.randn(32, 16, generator=g), y


@pytest.mark.parametrize(
    ("term", "temperature"),
    [(soft_nearest_neighbour_loss, 1.0), (soft_nearest_neighbour_loss, None), (supervised_contrastive_loss, 0.1)],
)
def test_class_separation_terms_are_low_for_separated_classes(term, temperature):
    separated, y = clusters(0.1)
    mixed = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)) * 10
    snnl = term is soft_nearest_neighbour_loss
    floor = 0.0 if snnl else math.log(7)  # SupCon's minimum is log(positives per anchor)
    assert term(separated, y, temperature) == pytest.approx(floor, abs=0.05)
    assert term(mixed, y, temperature) > floor + 1.0
    alone = term(separated[:4:1], torch.arange(4), temperature)  # no same-class partner anywhere
    assert alone == 0


def test_optimised_snn_temperature_makes_the_term_independent_of_feature_scale():
    h, y = clusters(3.0)  # overlapping classes: the loss is neither 0 nor at its maximum
    reference = soft_nearest_neighbour_loss(h, y, None)
    assert 0.1 < reference < 1.5
    for scale in (0.01, 100.0):
        assert float(soft_nearest_neighbour_loss(h * scale, y, None)) == pytest.approx(float(reference), rel=1e-3)
    # a fixed temperature is not: shrunk features look fully entangled (the loss nears
    # log(31 others / 7 same-class)); grown ones make it a hard nearest-neighbour loss that explodes
    assert float(soft_nearest_neighbour_loss(h * 0.01, y, 1.0)) == pytest.approx(math.log(31 / 7), abs=0.05)
    assert soft_nearest_neighbour_loss(h * 100.0, y, 1.0) > 100 * reference


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_every_regularizer_trains_a_working_model(name):
    result = run(RunConfig(dataset="digits", poison_rate=0, regularizer=name, device="cpu"))
    assert result.metrics["clean_accuracy"] > 0.9, name
    assert result.config["train"]["regularizer"] == name


def test_logit_squeezing_squeezes_the_logits(digits):
    config = RunConfig(dataset="digits").resolved()
    norms = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_model(config, digits.train)
        recipe = TrainConfig(epochs=10, batch_size=64, lr=0.05, progress=False,
                             regularizer="logit_squeezing", regularizer_options={"weight": weight})  # fmt: skip
        train(model, digits.train, recipe, device="cpu", seed=0)
        norms[weight] = predict_logits(model, digits.test.inputs).norm(dim=1).mean()
    assert norms[0.5] < 0.6 * norms[0.0]


def test_unknown_regularizer_and_options_are_refused():
    with pytest.raises(ValueError, match="valid regularizers: contrastive, logit_squeezing"):
        TrainConfig(regularizer="dropout").validate()
    with pytest.raises(ValueError, match="SupervisedContrastive needs a temperature > 0, got None"):
        create_regularizer("contrastive", temperature=None)
    assert create_regularizer("soft_nearest_neighbour").config() == {"weight": 0.1, "temperature": None}
    with pytest.raises(ValueError, match="valid: alpha, layers"):
        RunConfig(regularizer="manifold_mixup", regularizer_options={"beta": 1}).resolved()


def test_hidden_state_methods_work_on_sequential_subclasses(digits):
    """airbench's body subclasses nn.Sequential with its own constructor, which slicing breaks."""
    from backdoorlab.defenses.e2abl import ShallowHead, split_at
    from backdoorlab.models import create_model
    from backdoorlab.training.regularizers import create_regularizer

    model = create_model("airbench", num_classes=10, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3, width=8)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(model.forward_body(model.normalize(x)), model.forward_features(x))
    ce = lambda logits, labels, _i, _e: torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # noqa: E731
    logits, losses = create_regularizer("manifold_mixup")(model, x, y, ce, y, 0, torch.Generator().manual_seed(0))
    assert logits.shape == (4, 10) and losses.shape == (4,)
    main, h = split_at(model, x, 2)
    assert main.shape == ShallowHead.for_model(model, 2, x)(h).shape == (4, 10)

"""NAB (Liu et al. 2023): the defensive trigger, its deployment in the model (predictions, saving),
SimCLR's loss and nearest-centre relabelling by hand, option checks, and the defense against
BadNets on sklearn's digits (slow)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses import DefenseContext, create_defense
from backdoorlab.defenses.nab import (
    DefensiveTriggerClassifier,
    StampedStep,
    nearest_centre_labels,
    stamp,
)
from backdoorlab.defenses.simclr import simclr_loss
from backdoorlab.experiments import RunConfig, run
from backdoorlab.experiments.presets import preset_for
from backdoorlab.experiments.saved_model import load_model, save_model
from backdoorlab.models.registry import create_model
from backdoorlab.options import OptionError
from backdoorlab.training.loop import TrainConfig, predict_logits


def digit_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_channels=1, mean=(0.3,), std=(0.4,)).eval()


def test_stamp_sets_the_top_left_square_only_in_the_rows_asked():
    x = torch.rand(3, 2, 5, 5)
    rows = torch.tensor([True, False, True])
    out = stamp(x, torch.tensor([0.25, 0.75]), 2, rows)
    corner = torch.zeros(5, 5, dtype=torch.bool)
    corner[:2, :2] = True
    assert torch.equal(out[1], x[1])
    for i in (0, 2):
        assert (out[i, 0][corner] == 0.25).all() and (out[i, 1][corner] == 0.75).all()
        assert torch.equal(out[i][:, ~corner], x[i][:, ~corner])


def test_the_deployed_model_stamps_every_input_and_keeps_the_classifiers_weights():
    """0 after normalisation is the mean in pixels: the deployed model's logits are the trained
    classifier's on stamped inputs, for uint8 and float inputs alike, and differ from its logits
    on the unstamped ones; its state dict is the classifier's."""
    classifier = digit_model()
    deployed = DefensiveTriggerClassifier(classifier, 2)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    floats = images.float() / 255
    expected = predict_logits(classifier, stamp(floats, 0.3, 2))
    assert torch.allclose(predict_logits(deployed, images), expected, atol=1e-5)
    assert torch.allclose(predict_logits(deployed, floats), expected, atol=1e-5)
    assert not torch.allclose(predict_logits(classifier, floats), expected, atol=1e-3)
    assert deployed.state_dict().keys() == classifier.state_dict().keys()
    features = deployed.forward_features(floats)
    assert torch.allclose(deployed.forward_head(features), deployed(floats), atol=1e-6)


def test_a_saved_nab_model_loads_with_its_defensive_trigger(tmp_path):
    deployed = DefensiveTriggerClassifier(digit_model(), 2)
    path = save_model(tmp_path / "nab.safetensors", deployed, RunConfig(dataset="digits", model="small_cnn"))
    loaded, _ = load_model(path)
    assert isinstance(loaded, DefensiveTriggerClassifier) and loaded.trigger_size == 2
    x = torch.rand(8, 1, 8, 8)
    assert torch.allclose(loaded(x), deployed(x), atol=1e-6)
    plain = save_model(tmp_path / "plain.safetensors", digit_model(), RunConfig(dataset="digits", model="small_cnn"))
    assert type(load_model(plain)[0]).__name__ == "Classifier"


def test_the_training_step_stamps_the_marked_samples_only():
    """Samples 1 and 3 of the training set are marked; a batch holding samples 3, 0, 1 gets the
    stamp (the model's mean, 0.3) on its rows 0 and 2."""
    seen: list[Tensor] = []

    def inner(model, x, y, loss_fn, indices, epoch, generator):  # noqa: ANN001, ANN202, ARG001
        seen.append(x)
        return x.flatten(1), torch.zeros(len(x))

    step = StampedStep(torch.tensor([False, True, False, True]), 2, inner)
    x = torch.ones(3, 1, 4, 4)
    step(digit_model(), x, torch.zeros(3), None, torch.tensor([3, 0, 1]), 0, torch.Generator())
    out = seen[0]
    assert torch.equal(out[1], x[1])
    for row in (0, 2):
        assert torch.allclose(out[row, 0, :2, :2], torch.full((2, 2), 0.3))
        assert float(out[row].sum()) == pytest.approx(12 + 4 * 0.3)


def test_simclr_loss_by_hand():
    """Two anchors at right angles, their second views on themselves: anchor 0's logits over
    (itself, anchor 1, view 0, view 1) are (-inf, 0, 1, 0) / T, its positive view 0."""
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    temperature = 0.5
    loss = simclr_loss(anchors, anchors.clone(), temperature)
    expected = -(2.0 - math.log(math.exp(0.0) + math.exp(2.0) + math.exp(0.0)))
    assert loss.tolist() == pytest.approx([expected, expected])


def test_nearest_centre_labels_by_hand():
    """Class centres from the samples not excluded (0: (0, 0) and (2, 0) -> (1, 0); 1: (10, 0));
    the excluded sample at (9, 0) labelled 0 takes class 1, and a class without samples none."""
    embeddings = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [9.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 0])
    excluded = torch.tensor([False, False, False, True])
    assert nearest_centre_labels(embeddings, labels, excluded, 3).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"isolation_ratio": 1.5}, "isolation_ratio"),
        ({"ssl_epochs": 0}, "ssl_epochs"),
        ({"trigger_size": 0}, "trigger_size"),
        ({"isolation_ratio": 0.3, "centroid_exclusion": 0.2}, "centroid_exclusion"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, named):
    with pytest.raises((OptionError, ValueError), match=named):
        create_defense("nab", **options)


def test_the_backdoorbench_preset_is_its_cifar10_config():
    """config/defense/nab/cifar10.yaml (epochs 100, batch_size 256, lr 0.01, wd 1e-4, epoch_self
    100, epoch_lga 20, gamma 0.5), defense/nab.py's batch_size_lgd 64 and isolation share 0.1
    (centres without the lowest 0.2), DBD's pretrain example.yaml (batch 512, lr 0.4, T 0.5)."""
    assert preset_for("backdoorbench", "cifar10").defense_options["nab"] == {
        "ssl_epochs": 100,
        "ssl_lr": 0.4,
        "ssl_batch_size": 512,
        "temperature": 0.5,
        "detection_epochs": 20,
        "detection_lr": 0.01,
        "detection_batch_size": 64,
        "gamma": 0.5,
        "isolation_ratio": 0.1,
        "centroid_exclusion": 0.2,
        "epochs": 100,
        "lr": 0.01,
        "batch_size": 256,
        "weight_decay": 1e-4,
    }


@pytest.mark.slow
@pytest.mark.heavy  # kept out of CI's 30 minutes: pytest -m heavy
def test_nab_lowers_the_asr_of_badnets_on_digits():
    """BadNets (Gu et al.'s 2x2 checkerboard, on which LGA's lowest losses are the poisoned digits,
    as for ABL in test_defense_efficacy.py) at 10% on digits, the digits recipe (small CNN, 20
    epochs), seed 0, one thread, BackdoorBench's isolation share of 10%: undefended CA 0.989 and
    ASR 1.000; NAB measured CA 0.969, ASR 0.167, isolation precision 0.57 (73 samples relabelled
    and stamped). The suspected 10% hold about half of the poisoned digits, and SimCLR's 20
    epochs on 8x8 digits relabel them imperfectly, so ASR stays above what the paper reports on
    CIFAR-10. At the default 5% the same run gave ASR 0.392, CA 0.967 (precision 0.75); over
    seeds 0-3 the 10% share gave ASR 0.07-0.57."""
    result = run(
        RunConfig(
            dataset="digits",
            device="cpu",
            seed=0,
            threads=1,
            trusted_size=0.1,
            attack_options={"pattern": "checkerboard"},
            defense="nab",
            defense_options={"isolation_ratio": 0.1},
        )
    )
    metrics = result.metrics
    assert metrics["attack_success_rate"] < 0.35, metrics
    assert metrics["clean_accuracy"] > 0.93, metrics
    assert metrics["isolation_precision"] > 0.4, metrics
    assert isinstance(result.model, DefensiveTriggerClassifier)


def test_a_model_that_is_not_a_classifier_is_refused():
    images = TensorDataset(
        torch.zeros(8, 1, 8, 8, dtype=torch.uint8), torch.arange(8) % 2, ("a", "b"), (0.5,), (0.5,), "toy"
    )
    ctx = DefenseContext(TrainConfig(epochs=1), torch.device("cpu"), seed=0)
    with pytest.raises(TypeError, match="Classifier"):
        create_defense("nab").train(images, torch.nn.Flatten, ctx)

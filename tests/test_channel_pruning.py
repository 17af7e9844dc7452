"""CLP, BNP and EP, the batch-norm channel pruners: each prunes the channel planted to stand out,
and leaves a model without one alone; BNP, EP and ANP (tests/test_anp.py) remove BadNets from an
MNIST airbench (slow)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses import DefenseContext, create_repair
from backdoorlab.defenses.channel_pruning import channel_lipschitz, conv_norm_pairs, histogram_entropy
from backdoorlab.experiments.run import apply_repair
from backdoorlab.models import create_model
from backdoorlab.training.loop import TrainConfig


def context() -> DefenseContext:
    return DefenseContext(TrainConfig(epochs=1), torch.device("cpu"), seed=0)


def trusted(count: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (count, 1, 8, 8), generator=g, dtype=torch.uint8)
    return TensorDataset(inputs, torch.arange(count) % 4, tuple("abcd"), (0.5,), (0.25,), "noise")


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=4, in_channels=1).eval()


def test_channel_lipschitz_is_the_spectral_norm_of_each_scaled_kernel():
    conv, norm = nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
        norm.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
    bounds = channel_lipschitz(conv, norm)
    for k, scale in enumerate([1.0, 1.0, 1.0]):  # |gamma / sigma| = 1, 1, 1
        expected = torch.linalg.svdvals(conv.weight[k].detach().reshape(2, -1)).max() * scale
        assert float(bounds[k]) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():
        norm.weight.mul_(3.0)
    assert torch.allclose(channel_lipschitz(conv, norm), 3.0 * bounds), "linear in |gamma|"


def test_clp_prunes_the_channel_whose_bound_stands_out_and_nothing_else():
    """A channel whose kernel is scaled 50x has an outlying Lipschitz bound: CLP zeroes its BN weight
    and bias and no other channel's; the suspect model is left as it was."""
    model = small_cnn()
    name, conv, norm = conv_norm_pairs(model)[1]
    with torch.no_grad():
        conv.weight[5] *= 50.0
    outcome = create_repair("clp").repair(model, trusted(), context())
    assert outcome.details["pruned_by_layer"][name] == 1 and outcome.details["pruned_channels"] == 1
    repaired = dict(outcome.model.named_modules())[name]
    assert repaired.weight[5] == 0 and repaired.bias[5] == 0
    assert norm.weight[5] != 0, "the suspect model is unchanged"
    assert create_repair("clp").repair(small_cnn(), trusted(), context()).details["pruned_channels"] == 0


def test_bnp_prunes_the_channel_whose_statistics_clean_data_does_not_reproduce():
    """A channel whose stored running mean lies far from what clean inputs give it (a neuron the
    training set drove and clean data does not) is pruned, and only it."""
    model = small_cnn()
    stats = dict(create_repair("bnp").repair(model, trusted(), context()).details["pruned_by_layer"])
    name, _, norm = conv_norm_pairs(model)[2]
    with torch.no_grad():
        norm.running_mean[7] += 100.0
    outcome = create_repair("bnp").repair(model, trusted(), context())
    assert outcome.details["pruned_by_layer"][name] >= 1 and dict(outcome.model.named_modules())[name].weight[7] == 0
    assert sum(stats.values()) <= 3, "an untrained model's running statistics hold few outliers"
    with pytest.raises(ValueError, match="raise --trusted-size"):
        create_repair("bnp").check_trusted(trusted(8))


def test_histogram_entropy_bins_from_the_smallest_value_as_the_official_code():
    """Bins of 0.1 from the smallest value of all rows, edges excluded: row one puts a value in
    each of three bins (0.0 and 0.35 fall in none: int(0.35 / 0.1) = 3 bins), row two four of five
    values in the first."""
    values = torch.tensor([[0.0, 0.05, 0.15, 0.25, 0.35], [0.0, 0.05, 0.06, 0.07, 0.08]])
    expected = torch.tensor([-3 * 0.2 * math.log(0.2), -0.8 * math.log(0.8)])
    assert torch.allclose(histogram_entropy(values), expected)


def test_ep_prunes_the_channel_whose_training_pre_activations_split_in_two():
    """32 channels carry their input through a 1x1 convolution to batch norm; on the training data
    one channel is off on 90% of the samples and on at full strength on the rest (a triggered
    neuron's two modes), the others spread. EP prunes that channel alone, reads the training set
    (``reads``), and never touches the trusted split."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (256, 32, 2, 2), generator=g, dtype=torch.uint8)
    inputs[:, 7] = 0
    inputs[::10, 7] = 255
    data = TensorDataset(inputs, torch.arange(256) % 4, tuple("abcd"), (0.5,) * 32, (0.25,) * 32, "noise")
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(32)[:, :, None, None])
    model = nn.Sequential(conv, nn.BatchNorm2d(32), nn.Flatten(), nn.Linear(128, 4))
    ep = create_repair("ep")
    assert ep.reads == "training"
    outcome = ep.repair(model, data, context())
    assert outcome.details["pruned_by_layer"] == {"1": 1} and outcome.details["batch"] == 256
    assert outcome.model[1].weight[7] == 0 and outcome.model[1].bias[7] == 0
    assert model[1].weight[7] != 0, "the suspect model is unchanged"
    inputs[:, 7] = torch.randint(0, 256, (256, 2, 2), generator=g, dtype=torch.uint8)
    assert ep.repair(model, data, context()).details["pruned_channels"] == 0


def test_a_model_without_batch_norm_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    for name in ("clp", "bnp", "ep"):
        with pytest.raises(ValueError, match="batch normalisation"):
            create_repair(name).repair(model, trusted(), context())


@pytest.mark.slow
def test_bnp_ep_and_anp_remove_badnets_from_an_mnist_airbench_and_clp_does_not(mnist_badnets_airbench):
    """MNIST, 5,000 images, the fast recipe's airbench (width 24), BadNets at 10%. Measured: BNP
    prunes 16 of 432 channels, ASR 1.00 -> 0.01 at CA 0.99; CLP prunes 2-4 (by thread count), none the
    backdoor's (ASR stays 1.00; on CIFAR-10's width-32 airbench it removes BadNets, docs/defenses.md);
    ANP with 100 of its 2,000 mask steps prunes about 15 neurons, ASR 1.00 -> 0.04 at CA 0.99; EP,
    from a batch of the poisoned training set, prunes 20, ASR 1.00 -> 0.01 at CA 0.98."""
    prepared, model, suspect = mnist_badnets_airbench
    assert suspect["attack_success_rate"] >= 0.9
    _, after, details, _ = apply_repair(prepared, model, "ep", {})
    assert after["attack_success_rate"] < 0.2 and after["clean_accuracy"] >= suspect["clean_accuracy"] - 0.03
    assert details["pruned_channels"] < 0.1 * details["channels"]
    _, after, details, _ = apply_repair(prepared, model, "bnp", {})
    assert after["attack_success_rate"] < 0.2 and after["clean_accuracy"] >= suspect["clean_accuracy"] - 0.03
    _, after, details, _ = apply_repair(prepared, model, "anp", {"iterations": 100})
    assert after["attack_success_rate"] < 0.2 and after["clean_accuracy"] >= suspect["clean_accuracy"] - 0.03
    assert details["pruned_channels"] < 0.1 * details["channels"]
    _, after, details, _ = apply_repair(prepared, model, "clp", {})
    assert details["pruned_channels"] <= 8 and after["attack_success_rate"] >= 0.9

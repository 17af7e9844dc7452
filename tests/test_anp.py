"""ANP, adversarial neuron pruning: the perturbation parametrisation computes what the official
``NoisyBatchNorm2d`` does and pruning zeroes BN weights only; that ANP removes BadNets from an
MNIST airbench is tested with BNP's (tests/test_channel_pruning.py, slow)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.defenses import DefenseContext, create_repair
from backdoorlab.defenses.neuron_masks import masked
from backdoorlab.training.loop import TrainConfig

from .test_channel_pruning import small_cnn, trusted


def context() -> DefenseContext:
    return DefenseContext(TrainConfig(epochs=1, crop_padding=0, flip=False), torch.device("cpu"), seed=0)


def test_the_perturbation_scales_bn_weight_by_mask_plus_noise_and_bias_by_one_plus_noise():
    norm = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        norm.bias.copy_(torch.tensor([0.5, -0.5, 1.0]))
    x = torch.randn(2, 3, 4, 4)
    before = norm(x)
    perturbation = masked(nn.Sequential(norm))["0"]
    assert torch.allclose(norm(x), before), "mask 1 and no perturbation leave the layer as it was"
    with torch.no_grad():
        perturbation.mask.copy_(torch.tensor([1.0, 0.0, 0.5]))
        perturbation.noise.fill_(0.25)
        perturbation.noise_bias.fill_(-0.5)
    assert torch.allclose(norm.weight, torch.tensor([1.0, 0.0, -0.5]))
    perturbation.perturbed = True
    assert torch.allclose(norm.weight, torch.tensor([1.25, 0.5, -0.75]))
    assert torch.allclose(norm.bias, torch.tensor([0.25, -0.25, 0.5]))


def test_anp_prunes_bn_weights_at_or_below_the_threshold_and_leaves_the_suspect_alone():
    """Masks end in [0, 1], so a threshold of 1 prunes every neuron (weights zero, biases kept) and
    a threshold of 0 only those driven to exactly 0; the suspect model is unchanged."""
    model = small_cnn()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    everything = create_repair("anp", iterations=3, batch_size=16, threshold=1.0).repair(model, trusted(), context())
    norms = [m for m in everything.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert everything.details["pruned_channels"] == everything.details["channels"] == sum(n.num_features for n in norms)
    biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((n.weight == 0).all()) and torch.equal(n.bias, b) for n, b in zip(norms, biases, strict=True))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items()), "the suspect is unchanged"
    low, _, _ = everything.details["mask_quantiles"]
    assert 0.0 <= low <= 1.0
    nothing = create_repair("anp", iterations=3, batch_size=16, threshold=0.0).repair(model, trusted(), context())
    assert nothing.details["pruned_channels"] <= everything.details["channels"]


def test_anp_refuses_a_model_without_batch_norm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ValueError, match="batch normalisation"):
        create_repair("anp", iterations=1).repair(model, trusted(), context())

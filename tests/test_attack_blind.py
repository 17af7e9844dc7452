"""Blind backdoor: the official pattern and its place, MGDA's two-task scales by hand, the rule that
lets the backdoor loss join once training is stable, and a backdoor that takes on digits (slow)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.attacks import create_trigger
from backdoorlab.attacks.blind import PATTERN, mgda_scales, pattern_and_mask
from backdoorlab.attacks.poisoning import PoisonSpec
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.experiments import RunConfig, run


def test_the_pattern_sits_where_the_reference_puts_it_and_moves_in_on_small_images():
    pattern, mask = pattern_and_mask((3, 32, 32))
    expected = torch.tensor(PATTERN)
    box = (slice(3, 8), slice(23, 26))  # x_top 3, y_top 23
    assert torch.equal(mask[0][box], (expected != -10).float()) and int(mask.sum()) == 3 * 9
    assert torch.equal(pattern[1][box], expected.clamp(min=0) * (expected != -10))
    assert mask[:, :3].sum() == 0 and mask[:, :, 26:].sum() == 0
    _, small = pattern_and_mask((1, 8, 8))
    assert torch.equal(small[0, 2:7, 4:7], (expected != -10).float()) and int(small.sum()) == 9
    with pytest.raises(ValueError, match="at least 6x4"):
        pattern_and_mask((1, 5, 8))
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    stamped = create_trigger("blind", (3, 32, 32))(images)
    assert stamped[0, 0, 3, 23] == 255 and stamped[0, 0, 3, 24] == 0 and stamped[0, 0, 4, 23] == 128
    assert torch.equal(stamped[:, :, 10:], images[:, :, 10:])


def test_mgda_scales_are_the_min_norm_point_of_the_normalised_gradients():
    torch.manual_seed(0)
    g_n, g_b = [torch.randn(5), torch.randn(2, 3)], [torch.randn(5), torch.randn(2, 3)]
    loss_n, loss_b = 0.7, 2.0
    flat_n, flat_b = torch.cat([g.flatten() for g in g_n]).double(), torch.cat([g.flatten() for g in g_b]).double()
    u = flat_b / (min(loss_b * flat_b.norm().item(), 10.0) + 1e-5)
    v = flat_n / (min(loss_n * flat_n.norm().item(), 10.0) + 1e-5)
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    norms = ((grid[:, None] * u + (1 - grid[:, None]) * v) ** 2).sum(1)
    gamma = float(grid[norms.argmin()])
    w_normal, w_backdoor = mgda_scales(g_n, g_b, loss_n, loss_b)
    assert 0.001 < w_backdoor < 0.999 and w_backdoor == pytest.approx(gamma, abs=1e-4)
    assert w_normal == pytest.approx(1 - w_backdoor)
    # the same direction with the backdoor's gradient the longer one: the segment's end at the normal task
    same = [torch.ones(4)]
    assert mgda_scales(same, [3 * torch.ones(4)], 1.0, 1.0) == pytest.approx((0.999, 0.001))


def test_the_backdoor_loss_joins_once_the_clean_loss_is_low_over_the_history():
    trigger = create_trigger("blind", (1, 8, 8), history=3, loss_threshold=1.0, normal_weight=1.0, backdoor_weight=0.5)
    data = TensorDataset(
        torch.zeros(6, 1, 8, 8, dtype=torch.uint8), torch.arange(6) % 2, ("a", "b"), (0.5,), (0.2,), "toy"
    )
    step = trigger.begin(data, PoisonSpec(rate=0.1, target=1), 4, torch.device("cpu"), torch.Generator())
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])

    def per_sample(logits, targets, _indices, _epoch):
        return F.cross_entropy(logits, targets, reduction="none")

    def high(logits, targets, indices, epoch):  # a clean loss above the threshold
        return per_sample(logits, targets, indices, epoch) + 5.0

    for _ in range(3):
        _, losses = step(model, x, y, high, torch.arange(4), 0, torch.Generator())
        assert torch.allclose(losses, per_sample(model(x), y, None, 0) + 5.0)
    assert not step.active(), "the mean clean loss of the last three batches is above 1"
    for _ in range(3):
        step(model, x, y, per_sample, torch.arange(4), 0, torch.Generator())
    assert step.active() and step.active_batches == 0
    _, losses = step(model, x, y, per_sample, torch.arange(4), 0, torch.Generator())
    stamped = trigger.apply(x, None)
    expected = per_sample(model(x), y, None, 0) + 0.5 * per_sample(
        model(stamped), torch.ones(4, dtype=torch.long), None, 0
    )
    assert torch.allclose(losses, expected) and step.active_batches == 1


@pytest.mark.slow
def test_a_blind_backdoor_takes_on_digits_through_the_loss_alone():
    """The training data stays clean; the triggered copies in the loss make the backdoor. The
    reference's 1000-batch history is longer than this run (20 epochs of 23 batches): 20 here."""
    result = run(RunConfig(dataset="digits", attack="blind", attack_options={"history": 20}, seed=0))
    assert result.metrics["attack_success_rate"] > 0.9 and result.metrics["clean_accuracy"] > 0.9

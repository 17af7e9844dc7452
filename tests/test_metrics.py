from __future__ import annotations

import pytest
import torch

from backdoorlab.metrics import attack_success_rate, clean_accuracy, robust_accuracy


def test_metrics_on_hand_built_predictions():
    labels = torch.tensor([0, 1, 2, 3])
    assert clean_accuracy(torch.tensor([0, 1, 0, 0]), labels) == 0.5
    # triggered samples of true labels 1, 2, 3 with target 0: two go to the target, one stays right
    triggered = torch.tensor([0, 0, 3])
    assert attack_success_rate(triggered, torch.tensor([0, 0, 0])) == pytest.approx(2 / 3)
    assert robust_accuracy(triggered, torch.tensor([1, 2, 3])) == pytest.approx(1 / 3)
    # all-to-all: each sample against its own target
    assert attack_success_rate(torch.tensor([1, 2, 0]), torch.tensor([1, 2, 3])) == pytest.approx(2 / 3)


def test_metrics_refuse_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="equal length"):
        clean_accuracy(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="empty"):
        attack_success_rate(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))

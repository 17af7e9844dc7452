"""Evaluate a model against a backdoor: CA on the clean test set, ASR and RA on its triggered copy.

The evaluation is the only place that holds the trigger, the target and the test set together.
Clean and triggered inputs go through the model in one batched, gradient-free pass.
"""

from __future__ import annotations

import torch
from torch import nn

from backdoorlab.attacks.poisoning import TriggeredTestSet
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.metrics import attack_success_rate, clean_accuracy, robust_accuracy
from backdoorlab.training.loop import predict


def evaluate_backdoor(
    model: nn.Module,
    test: TensorDataset,
    triggered: TriggeredTestSet,
    *,
    device: str | torch.device | None = "cpu",
    batch_size: int = 1024,
    tta: int = 0,
) -> dict[str, float]:
    """``{"clean_accuracy", "attack_success_rate", "robust_accuracy"}`` as fractions in [0, 1];
    ``tta``: the recipe's test-time augmentation level (``training.loop.tta_logits``)."""
    predictions = predict(
        model, torch.cat([test.inputs, triggered.inputs]), device=device, batch_size=batch_size, tta=tta
    )
    clean, poisoned = predictions[: len(test)], predictions[len(test) :]
    return {
        "clean_accuracy": clean_accuracy(clean, test.labels),
        "attack_success_rate": attack_success_rate(poisoned, triggered.target_labels),
        "robust_accuracy": robust_accuracy(poisoned, triggered.true_labels),
    }

"""Backdoor metrics on predictions: clean accuracy, attack success rate, robust accuracy.

Definitions (as BackdoorBench reports them):

- **CA**: accuracy on the clean test set.
- **ASR**: share of triggered test samples classified as the attacker's target; the samples are
  those whose true label is not the target (all-to-one), or every sample with its own target
  ``(y + 1) mod K`` (all-to-all). Build them with :func:`backdoorlab.attacks.triggered_test_set`.
- **RA**: share of the same triggered samples still given their true label.
- **Isolation precision / recall** of a defense's isolated set against the hidden poison mask:
  share of isolated samples that are poisoned, share of poisoned samples isolated.
- **Detection AUROC** of a detector's scores on backdoored models against its scores on clean
  models, with its p-value.

A metric value is finite or absent: :func:`finite_json` and :func:`dumps_json` turn NaN and
infinities into ``None`` (JSON ``null``) wherever results are written (``result.json``, the store),
since JSON has no NaN and SQLite's ``json_extract`` fails on it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import Tensor


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinity), at any depth of dicts, lists and
    tuples (as lists), replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps_json(value: Any, **options: Any) -> str:
    """``json.dumps`` of :func:`finite_json` (``value``) with ``allow_nan=False``: valid JSON, never
    ``NaN`` or ``Infinity``; ``options`` go to ``json.dumps`` (``indent``...)."""
    return json.dumps(finite_json(value), allow_nan=False, **options)


def _rate(predictions: Tensor, labels: Tensor, what: str) -> float:
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    if predictions.shape != labels.shape or predictions.dim() != 1:
        raise ValueError(
            f"{what}: predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} "
            "must be 1-D of equal length"
        )
    if len(labels) == 0:
        raise ValueError(f"{what} of an empty set is undefined")
    return float((predictions == labels).double().mean())


def clean_accuracy(predictions: Tensor, labels: Tensor) -> float:
    """CA: share of clean test samples predicted correctly."""
    return _rate(predictions, labels, "clean accuracy")


def attack_success_rate(triggered_predictions: Tensor, target_labels: Tensor) -> float:
    """ASR: share of triggered samples predicted as their target label."""
    return _rate(triggered_predictions, target_labels, "attack success rate")


def robust_accuracy(triggered_predictions: Tensor, true_labels: Tensor) -> float:
    """RA: share of triggered samples still predicted as their true label."""
    return _rate(triggered_predictions, true_labels, "robust accuracy")


def isolation_metrics(isolated: Tensor, poisoned: Tensor) -> dict[str, float]:
    """Precision and recall of ``isolated`` (a defense's verdict) against ``poisoned`` (the truth),
    both boolean masks over the training set; scikit-learn's definitions, 0 where undefined."""
    from sklearn.metrics import precision_score, recall_score

    isolated, poisoned = torch.as_tensor(isolated).bool(), torch.as_tensor(poisoned).bool()
    if isolated.shape != poisoned.shape or isolated.dim() != 1:
        raise ValueError(f"masks {tuple(isolated.shape)} and {tuple(poisoned.shape)} must be 1-D of equal length")
    truth, verdict = poisoned.numpy(), isolated.numpy()
    return {
        "isolation_precision": float(precision_score(truth, verdict, zero_division=0)),
        "isolation_recall": float(recall_score(truth, verdict, zero_division=0)),
        "isolated": int(verdict.sum()),
    }


def scores_auroc(scores: Tensor, truth: Tensor) -> float:
    """ROC AUC of ``scores`` (higher = more suspect) against ``truth`` (a boolean mask):
    scikit-learn's, NaN where the mask holds one kind only (no poisons: nothing to separate)."""
    from sklearn.metrics import roc_auc_score

    truth = torch.as_tensor(truth).bool()
    if bool(truth.all()) or not bool(truth.any()):
        return float("nan")
    return float(roc_auc_score(truth.numpy(), torch.as_tensor(scores).double().numpy()))


def detection_auroc(clean_scores: list[float], backdoored_scores: list[float]) -> tuple[float, float]:
    """``(auroc, p)``: the ROC AUC of a detector's scores on backdoored models against its scores on
    clean models (1: every backdoored model above every clean one; 0.5: chance), and its one-sided
    Mann-Whitney p-value: how often scores unrelated to the poison would reach that AUROC with
    these numbers of models (the exact distribution of the statistic, as without ties, since the
    normal approximation is poor at a study's size)."""
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import roc_auc_score

    labels = [0] * len(clean_scores) + [1] * len(backdoored_scores)
    auroc = float(roc_auc_score(labels, [*clean_scores, *backdoored_scores]))
    p = float(mannwhitneyu(backdoored_scores, clean_scores, alternative="greater", method="exact").pvalue)
    return auroc, p

"""Evaluate a model against a backdoor: CA on the clean test set, ASR and RA on its triggered copy,
and health checks that keep a broken model's numbers from reading as a finding.

The evaluation is the only place that holds the trigger, the target and the test set together.
Clean and triggered inputs go through the model in one batched, gradient-free pass; the health
checks (:func:`health_warnings`) read the same clean predictions, no extra pass.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from backdoorlab.attacks.poisoning import TriggeredTestSet
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import INPUT_FPR, InputDetector
from backdoorlab.metrics import attack_success_rate, clean_accuracy, robust_accuracy, scores_auroc
from backdoorlab.training.loop import predict

#: A model that gives one class to at least this share of the clean test set is flagged as
#: collapsed (unless the test set itself is that lopsided: see :func:`health_warnings`).
COLLAPSE_SHARE = 0.9
#: CA within this much of chance (or within two binomial standard errors of it, whichever is larger)
#: is flagged as chance-level.
CHANCE_MARGIN = 0.05
#: A repair that loses more clean accuracy than this against the suspect model is flagged.
MAX_REPAIR_CA_DROP = 0.10


class HealthWarning(UserWarning):
    """:func:`evaluate_backdoor`'s warning about a model whose numbers are no finding: collapsed,
    at chance, or (given the suspect's metrics) a repair that destroyed more than it removed."""


@dataclass
class Assessment:
    """What one evaluation found: the metrics, warnings where the model looks broken (each a
    sentence starting with ``subject``, e.g. ``"model: ..."``), and the model's predictions on the
    clean then the triggered test inputs (what an input detector's filtered metrics reuse)."""

    metrics: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    predictions: Tensor | None = None


def health_warnings(predictions: Tensor, labels: Tensor, subject: str = "model") -> list[str]:
    """Warnings about a model from its predictions on the clean test set (``labels``: the truth).

    - **Collapsed**: one class gets at least :data:`COLLAPSE_SHARE` (0.9) of the predictions, and
      more than halfway from that class's true share to 1 (so a test set that is itself 95% one
      class needs 0.975, and a single-class test set never triggers it). Such a model's ASR is the
      share of triggered samples it happens to give the target, not evidence of a backdoor.
    - **Chance-level CA**: CA at most chance plus ``max(CHANCE_MARGIN, 2 standard errors)``, where
      chance is the best constant guess: the largest class's share of the test set (0.1 on
      balanced 10-class sets); the standard error is the binomial one at chance for this test size.
      Not checked where that bound reaches 1 (a test set of nearly one class).

    The README's healthy runs (digits BadNets: CA 0.99, ASR 0.997) are far from both thresholds.
    """
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    n = len(labels)
    if n == 0:
        return []
    size = int(max(int(predictions.max()), int(labels.max()))) + 1
    predicted = torch.bincount(predictions, minlength=size).double() / n
    truth = torch.bincount(labels, minlength=size).double() / n
    top = int(predicted.argmax())
    share, true_share = float(predicted[top]), float(truth[top])
    out = []
    if share >= COLLAPSE_SHARE and share > (1.0 + true_share) / 2:
        out.append(
            f"{subject}: predicts class {top} for {share:.0%} of the clean test set (its true share: {true_share:.0%}): "
            "a collapsed model, whose CA and ASR say nothing about a backdoor"
        )
    chance = float(truth.max())
    margin = max(CHANCE_MARGIN, 2 * math.sqrt(chance * (1 - chance) / n))
    accuracy = float((predictions == labels).double().mean())
    if accuracy <= chance + margin < 1.0:  # where a test set is (nearly) one class, no CA beats chance
        out.append(
            f"{subject}: clean accuracy {accuracy:.4f} is at chance level (the largest class's share, {chance:.4f}, "
            f"plus {margin:.2f}): it learned nothing usable"
        )
    return out


def repair_warnings(suspect_accuracy: float, repaired_accuracy: float) -> list[str]:
    """A warning where a repair lost more than :data:`MAX_REPAIR_CA_DROP` (0.10) of clean accuracy
    against the suspect model: a low ASR after it may mean a destroyed model, not a removed backdoor."""
    drop = suspect_accuracy - repaired_accuracy
    if drop <= MAX_REPAIR_CA_DROP:
        return []
    return [
        f"repaired model: the repair lost {drop:.4f} of clean accuracy ({suspect_accuracy:.4f} -> {repaired_accuracy:.4f}), "
        f"more than the {MAX_REPAIR_CA_DROP:.2f} tolerated: its ASR may reflect a destroyed model, not a removed backdoor"
    ]


#: What a collapsed repair's fallback means for a repaired model's numbers.
FALLBACK_MEANING = "its ASR is the {fallback}'s, not evidence that the repair keeps the backdoor"


def fallback_warnings(
    fallback: str | None, subject: str = "repaired model", meaning: str = FALLBACK_MEANING
) -> list[str]:
    """A warning where a repair collapsed and fell back (``fallback``, from its details: ``"suspect"``
    when no checkpoint stayed within its clean-accuracy tolerance and it returned the suspect model
    unchanged); ``meaning`` says what that does to the numbers (by default: the repaired model's
    ASR is the suspect's, not evidence that the repair keeps the backdoor)."""
    if not fallback:
        return []
    return [
        f"{subject}: the repair collapsed (no checkpoint kept its clean accuracy within the tolerance) and fell back "
        f"to the {fallback} model unchanged: " + meaning.format(fallback=fallback)
    ]


def assess_backdoor(
    model: nn.Module,
    test: TensorDataset,
    triggered: TriggeredTestSet,
    *,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    tta: int = 0,
    subject: str = "model",
) -> Assessment:
    """:func:`evaluate_backdoor`'s metrics and :func:`health_warnings` about the model (named
    ``subject`` in them), from one pass over the clean and triggered test sets."""
    predictions = predict(
        model, torch.cat([test.inputs, triggered.inputs]), device=device, batch_size=batch_size, tta=tta
    )
    clean, poisoned = predictions[: len(test)], predictions[len(test) :]
    metrics = {
        "clean_accuracy": clean_accuracy(clean, test.labels),
        "attack_success_rate": attack_success_rate(poisoned, triggered.target_labels),
        "robust_accuracy": robust_accuracy(poisoned, triggered.true_labels),
    }
    return Assessment(metrics, health_warnings(clean, test.labels, subject), predictions)


def evaluate_backdoor(
    model: nn.Module,
    test: TensorDataset,
    triggered: TriggeredTestSet,
    *,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    tta: int = 0,
    suspect: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """``{"clean_accuracy", "attack_success_rate", "robust_accuracy"}`` as fractions in [0, 1];
    ``tta``: the recipe's test-time augmentation level (``training.loop.tta_logits``).

    Warns (:class:`HealthWarning`) where the numbers are no finding: a collapsed or chance-level
    model (:func:`health_warnings`) and, given ``suspect`` (the suspect model's metrics, for a
    repaired model), a repair that lost more than :data:`MAX_REPAIR_CA_DROP` of its clean
    accuracy (:func:`repair_warnings`). :func:`backdoorlab.experiments.run` records the same
    checks in its result's warnings instead."""
    subject = "model" if suspect is None else "repaired model"
    assessment = assess_backdoor(model, test, triggered, device=device, batch_size=batch_size, tta=tta, subject=subject)
    found = list(assessment.warnings)
    if suspect is not None:
        found += repair_warnings(suspect["clean_accuracy"], assessment.metrics["clean_accuracy"])
    for message in found:
        warnings.warn(message, HealthWarning, stacklevel=2)
    return assessment.metrics


def assess_input_detector(
    detector: InputDetector,
    model: nn.Module,
    test: TensorDataset,
    triggered: TriggeredTestSet,
    calibration: TensorDataset,
    *,
    device: str | torch.device | None = None,
    tta: int = 0,
    fpr: float = INPUT_FPR,
    predictions: Tensor | None = None,
) -> dict[str, float]:
    """An input detector (already fitted) shown the clean test set and its triggered copy, mixed:

    - ``input_auroc``: ROC AUC of its scores, triggered against clean inputs;
    - ``input_threshold``: the score above which an input is flagged, set so that a share ``fpr``
      (5%) of ``calibration`` (trusted clean inputs it did not fit on) is flagged;
    - ``input_tpr`` and ``input_fpr``: the share of triggered and of clean test inputs flagged;
    - ``filtered_clean_accuracy`` and ``filtered_attack_success_rate``: CA and ASR of "detector,
      then model", where a flagged input counts as rejected (neither correct nor a success);
    - ``input_seconds_per_input``: scoring time per test input; ``input_calibration_size``.

    ``predictions``: the model's on the clean then the triggered inputs where already made
    (:attr:`Assessment.predictions`), else they are made here.
    A threshold set on fewer than ``2 / fpr`` clean inputs is warned about (``DefenseWarning``).
    """
    threshold = detector.threshold(calibration, fpr)
    inputs = torch.cat([test.inputs, triggered.inputs])
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))  # shown mixed
    start = time.perf_counter()
    scores = torch.empty(len(inputs))
    scores[order] = detector.score(inputs[order]).float()
    seconds = (time.perf_counter() - start) / len(inputs)
    if predictions is None:
        predictions = predict(model, inputs, device=device, tta=tta)
    elif len(predictions) != len(inputs):
        raise ValueError(f"{len(predictions)} predictions given for {len(inputs)} test inputs")
    passed = scores <= threshold
    clean_passed, poisoned_passed = passed[: len(test)], passed[len(test) :]
    truth = torch.arange(len(inputs)) >= len(test)
    return {
        "input_auroc": scores_auroc(scores, truth),
        "input_threshold": threshold,
        "input_tpr": float((~poisoned_passed).float().mean()),
        "input_fpr": float((~clean_passed).float().mean()),
        "filtered_clean_accuracy": float(((predictions[: len(test)] == test.labels) & clean_passed).float().mean()),
        "filtered_attack_success_rate": float(
            ((predictions[len(test) :] == triggered.target_labels) & poisoned_passed).float().mean()
        ),
        "input_seconds_per_input": seconds,
        "input_calibration_size": len(calibration),
    }

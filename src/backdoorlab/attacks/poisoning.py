"""Poisoning strategies: which training samples get the trigger, and which label they get.

The attacker's choices live in :class:`PoisonSpec` (rate, target, all-to-one or all-to-all). The
result, :class:`PoisonedDataset`, separates what the victim trains on (``data``; a defense sees only
this) from what only the evaluation may read (``mask`` and ``original_labels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from backdoorlab.attacks.triggers import Trigger
from backdoorlab.data.dataset import DataError, TensorDataset, resolve_count

MODES = ("all-to-one", "all-to-all")
#: What a fractional poison rate is a fraction of (:attr:`PoisonSpec.rate_of`).
RATE_OF = ("train", "target")


@dataclass(frozen=True)
class PoisonSpec:
    """The attacker's poisoning strategy.

    Strategies as Truong et al. 2020 ("Systematic Evaluation of Backdoor Data Poisoning Attacks on
    Image Classifiers") vary them: rate, all-to-one or all-to-all, dirty or clean label, and
    poisoning a single source class.

    Attributes:
        rate: poisoned share of the training set, a fraction in [0, 1] or a count (int); 0 trains
            a clean baseline (nothing poisoned; the trigger is still measured at test time).
            With ``rate_of="target"`` a fraction is of the target class's samples instead.
        target: target class for all-to-one.
        mode: ``"all-to-one"`` (every poisoned sample is relabelled ``target``; samples are drawn
            from the non-target classes) or ``"all-to-all"`` (label ``y -> (y + 1) mod K``).
        clean_label: poison only samples of the target class and keep every label (all-to-one).
        source: poison (and measure ASR on) only samples of this class; ``None`` for all classes.
        rate_of: what a fractional ``rate`` is a fraction of: ``"train"`` (the training set: the
            default, and BackdoorBench's ``pratio``) or ``"target"`` (clean-label only: the target
            class's training samples, as clean-label papers state their rates; ``1.0`` poisons the
            whole class, which is what BackdoorBench's ``pratio: 0.1`` for SIG and label-consistent
            amounts to on CIFAR-10, whose classes are a tenth of it each). A count is a count
            either way. The default keeps every stored rate's meaning.
    """

    rate: float | int = 0.1
    target: int = 0
    mode: str = "all-to-one"
    clean_label: bool = False
    source: int | None = None
    rate_of: str = "train"

    def validate(self, num_classes: int | None = None) -> None:
        """Refuse a bad strategy before any work, with a message that says what is wrong.
        The target is checked against ``num_classes`` where it is given."""
        if self.mode not in MODES:
            raise ValueError(f"unknown poisoning mode '{self.mode}'; valid: {', '.join(MODES)}")
        if self.target < 0 or (num_classes is not None and self.target >= num_classes):
            classes = f"0..{num_classes - 1}" if num_classes is not None else "0 and up"
            raise ValueError(f"target class {self.target} is outside the dataset's classes {classes}")
        if self.clean_label and self.mode != "all-to-one":
            raise ValueError("clean-label poisoning needs mode all-to-one")
        if self.rate_of not in RATE_OF:
            raise ValueError(f"unknown poison rate_of '{self.rate_of}'; valid: {', '.join(RATE_OF)}")
        if self.rate_of == "target" and not self.clean_label:
            raise ValueError(
                "poison rate_of 'target' (a fraction of the target class) is for clean-label poisoning; "
                "dirty-label rates are of the training set (rate_of 'train')"
            )
        if self.source is not None:
            if self.source < 0 or (num_classes is not None and self.source >= num_classes):
                raise ValueError(f"source class {self.source} is outside the dataset's classes")
            if self.mode == "all-to-one" and self.source == self.target:
                raise ValueError("the source class must differ from the target class")
            if self.clean_label:
                raise ValueError("clean-label poisoning uses the target class; drop the source class")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)):
            raise ValueError(f"poison rate must be a fraction or a count, got {self.rate!r}")
        if isinstance(self.rate, float) and not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"poison rate must be in [0, 1], got {self.rate}")
        if isinstance(self.rate, int) and self.rate < 0:
            raise ValueError(f"poison count must be >= 0, got {self.rate}")

    def target_labels(self, labels: Tensor, num_classes: int) -> Tensor:
        """The label the attacker wants for each sample (of true label ``labels``)."""
        if self.mode == "all-to-one":
            return torch.full_like(labels, self.target)
        return (labels + 1) % num_classes

    def poisoning_candidates(self, labels: Tensor) -> Tensor:
        """Boolean mask of training samples this strategy may poison: the target class for
        clean-label; otherwise the source class, or every class but the target (all-to-one)."""
        if self.clean_label:
            return labels == self.target
        return self.evaluation_candidates(labels)

    def evaluation_candidates(self, labels: Tensor) -> Tensor:
        """Boolean mask of test samples the ASR is measured on: not of the target class (all-to-one;
        a hit there says nothing), and of the source class where one is set."""
        keep = torch.ones_like(labels, dtype=torch.bool)
        if self.mode == "all-to-one":
            keep &= labels != self.target
        if self.source is not None:
            keep &= labels == self.source
        return keep


def _require_fitted(trigger: Trigger) -> None:
    if not trigger.fitted and trigger.controls_training:
        raise ValueError(
            f"{type(trigger).__name__} is a training-controlled attack: its trigger is trained with the victim "
            "first (backdoorlab.experiments.fit_attack trains both)"
        )
    if not trigger.fitted and trigger.needs_images:
        raise ValueError(
            f"{type(trigger).__name__} fits on the attacker's clean images first: call "
            "trigger.fit(None, images=...) (backdoorlab.experiments.fit_attack does it)"
        )
    if not trigger.fitted:
        raise ValueError(
            f"{type(trigger).__name__} adapts to a model: call trigger.fit(surrogate) with a model "
            "trained on clean data first (backdoorlab.experiments.fit_attack does it)"
        )


@dataclass(frozen=True)
class PoisonedDataset:
    """A poisoned training set.

    ``data`` is all a victim or a defense gets. ``mask`` (True = poisoned), ``cross_mask`` (WaNet's
    noise-mode samples, which keep their labels) and ``original_labels`` are ground truth for the
    evaluation only (isolation precision, for example).
    """

    data: TensorDataset
    mask: Tensor
    original_labels: Tensor
    cross_mask: Tensor | None = None

    @property
    def num_poisoned(self) -> int:
        return int(self.mask.sum())


def poison_dataset(clean: TensorDataset, trigger: Trigger, spec: PoisonSpec, seed: int) -> PoisonedDataset:
    """Apply ``trigger`` to a seeded random choice of samples and relabel them per ``spec``.

    The count is ``rate`` of the whole training set (of the target class's samples with
    ``rate_of="target"``; ``rate`` itself, for an int), drawn uniformly from the eligible samples
    (:meth:`PoisonSpec.poisoning_candidates`). Clean-label keeps
    labels. A trigger with ``cross_ratio > 0`` (WaNet) also gets that many times as many other
    samples as noise-mode samples, labels kept.
    """
    spec.validate(clean.num_classes)
    _require_fitted(trigger)
    candidates = spec.poisoning_candidates(clean.labels).nonzero().squeeze(1)
    total = len(candidates) if spec.rate_of == "target" else len(clean)
    count = 0 if spec.rate == 0 else resolve_count(spec.rate, total, "poison rate")
    if count > len(candidates):
        kind = "clean-label, target-class samples" if spec.clean_label else f"{spec.mode}"
        raise DataError(
            f"poison rate {spec.rate} asks for {count} samples but only {len(candidates)} "
            f"are eligible ({kind}, target {spec.target})"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values
    inputs = clean.inputs.clone()
    if count:
        inputs[chosen] = trigger.poison(clean.inputs[chosen], clean.labels[chosen], generator)
    labels = clean.labels.clone()
    if not spec.clean_label:
        labels[chosen] = spec.target_labels(clean.labels[chosen], clean.num_classes)
    mask = torch.zeros(len(clean), dtype=torch.bool)
    mask[chosen] = True
    cross_mask = None
    if trigger.cross_ratio > 0 and count:
        others = (~mask).nonzero().squeeze(1)
        n_cross = min(len(others), round(trigger.cross_ratio * count))
        crossed = others[torch.randperm(len(others), generator=generator)[:n_cross]].sort().values
        inputs[crossed] = trigger.cross(clean.inputs[crossed], generator)
        cross_mask = torch.zeros(len(clean), dtype=torch.bool)
        cross_mask[crossed] = True
    return PoisonedDataset(clean.replace(inputs=inputs, labels=labels), mask, clean.labels.clone(), cross_mask)


@dataclass(frozen=True)
class TriggeredTestSet:
    """Test samples the ASR is measured on: triggered inputs, true labels, attacker's targets."""

    inputs: Tensor
    true_labels: Tensor
    target_labels: Tensor


def triggered_test_set(test: TensorDataset, trigger: Trigger, spec: PoisonSpec, seed: int) -> TriggeredTestSet:
    """The trigger applied to every test sample the ASR counts (:meth:`PoisonSpec.evaluation_candidates`)."""
    spec.validate(test.num_classes)
    _require_fitted(trigger)
    keep = spec.evaluation_candidates(test.labels)
    true = test.labels[keep]
    inputs = trigger(test.inputs[keep], torch.Generator().manual_seed(seed))
    return TriggeredTestSet(inputs, true, spec.target_labels(true, test.num_classes))

"""Calibrated Trigger Inversion (Lukas & Kerschbaum, "Pick your Poison", 2023): a detector."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import (
    DETECTORS,
    DefenseContext,
    DefenseOutcome,
    Detection,
    Detector,
    Repair,
    create_repair,
    require_classifier,
    require_images,
)
from backdoorlab.defenses.post_training import frozen_copy
from backdoorlab.options import NonNegativeFloat, PositiveFloat, PositiveInt
from backdoorlab.progress import make_progress
from backdoorlab.training.augment import random_hflip
from backdoorlab.training.loop import predict, to_float


def calibrated_trigger(
    suspect: nn.Module,
    repaired: nn.Module,
    data: TensorDataset,
    target: int,
    *,
    device: torch.device,
    steps: int = 50,
    lr: float = 0.01,
    batch_size: int = 128,
    calibration_weight: float = 0.5,
    seed: int = 0,
) -> Tensor:
    """A full-image additive trigger ``delta`` that sends ``data`` (without class ``target``) to
    ``target`` under the suspect model while the repaired model keeps the true labels:
    ``CE(suspect(clip(x + delta)), target) + 0.5 CE(repaired(clip(x + delta)), y)``, Adam lr 0.01,
    betas (0.5, 0.9), 50 steps, ``delta`` starting at ``U(0, 1) * 0.01``, random horizontal flips
    where the dataset allows them (reference code)."""
    require_images(data, "Calibrated Trigger Inversion")
    generator = torch.Generator().manual_seed(seed)
    delta = (torch.rand(data.input_shape, generator=generator) * 0.01).to(device).requires_grad_()
    optimizer = torch.optim.Adam([delta], lr=lr, betas=(0.5, 0.9))
    inputs, labels = data.inputs.to(device), data.labels.to(device)
    goal = torch.full((batch_size,), target, device=device)
    for _ in range(steps):
        index = torch.randint(len(inputs), (batch_size,), generator=generator).to(device)
        x = inputs[index]
        if data.hflip:
            x = random_hflip(x, generator)
        stamped = (to_float(x) + delta).clamp(0, 1)
        loss = F.cross_entropy(suspect(stamped), goal) + calibration_weight * F.cross_entropy(
            repaired(stamped), labels[index]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return delta.detach()


def trigger_success(model: nn.Module, data: TensorDataset, delta: Tensor, target: int, device: torch.device) -> float:
    """Share of ``data`` that ``model`` sends to ``target`` with ``delta`` added."""
    stamped = (to_float(data.inputs.to(device)) + delta).clamp(0, 1)
    return float((predict(model, stamped, device=device) == target).float().mean())


@DETECTORS.register(
    "cti",
    "Calibrated Trigger Inversion (Lukas & Kerschbaum 2023): trigger success on the suspect minus on its Pivotal-Tuned repair",
    modality="image",
    revision=1,  # 2026-12-06: its default calibration repair, Pivotal Tuning, changed its anchor
)
class CalibratedTriggerInversion(Detector):
    """Repair the suspect model with :class:`PivotalTuning`, given the whole trusted split (which
    Pivotal Tuning itself splits into a tuning share and a held-out share: see below; ``repair`` /
    ``repair_options`` choose another repair as the calibration model, for example
    ``fine_tuning`` where Pivotal Tuning leaves the backdoor in place); then for each class ``c``
    invert a calibrated additive trigger (:func:`calibrated_trigger`) on the trusted samples of other classes and score
    ``c`` by the trigger's success on the suspect model minus its success on the repaired one. The
    model's score is the maximum over classes; higher means more likely backdoored (the reference
    returns its negation). The reference measures the success on the test set; here it is
    measured on the trusted samples (a detector never sees the test set). No threshold is given
    by the method: ``flagged`` is ``None``; the study compares scores with clean models' (ROC AUC).
    Sources: ``Universal-Backdoor-Attacks/src/defenses/detection/calibrated_trigger_inversion.py``
    and ``defense_args.py`` (``nc_steps_per_class`` 50, trigger lr 0.01, L1 weight 0).

    The repair gets the whole trusted split (the reference code's ``def_data_ratio=1.0``) and uses
    it as it would alone: Pivotal Tuning, at its defaults, tunes on 90% of it and holds 10% out to
    choose its checkpoint (``held_out``; the reference tunes on all of it and keeps the last step:
    ``repair_options={"checkpoint_rule": "last"}`` keeps the last step here, still tuning on 90%).
    The trigger inversion and the score use the whole trusted split. Where the repair collapses
    and returns the suspect model (its ``details["fallback"]``), the score compares the model with
    itself: ``details["repair_fallback"]`` says so, and the run warns.
    """

    def __init__(
        self,
        steps: PositiveInt = 50,
        lr: PositiveFloat = 0.01,
        batch_size: PositiveInt = 128,
        calibration_weight: NonNegativeFloat = 0.5,
        repair: str = "pivotal_tuning",
        repair_options: dict[str, Any] | None = None,
    ) -> None:
        if steps < 1 or lr <= 0 or batch_size < 1:
            raise ValueError("CTI needs steps >= 1, batch_size >= 1 and lr > 0")
        self.repair = create_repair(repair, **(repair_options or {}))  # validates name and options now
        self._resolve_options(repair_options=self.repair.config())

    def check_trusted(self, trusted: TensorDataset) -> None:
        """Images only, then what the calibration repair needs."""
        require_images(trusted, "Calibrated Trigger Inversion")
        self.repair.check_trusted(trusted)

    def detect(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> Detection:
        require_images(trusted, "Calibrated Trigger Inversion")  # before the repair, not after it
        require_classifier(model, "Calibrated Trigger Inversion")
        outcome = self.repair.repair(model, trusted, ctx)
        detection = self.calibrated_score(model, outcome.model, trusted, ctx)
        detection.details["repair_fallback"] = outcome.details.get("fallback")
        return detection

    def detect_repaired(
        self, model: nn.Module, repair: Repair, outcome: DefenseOutcome, trusted: TensorDataset, ctx: DefenseContext
    ) -> Detection:
        """Calibrate with the run's repair where it is this detector's own (the same method and
        options), instead of repairing the suspect a second time; else :meth:`detect`."""
        if type(repair) is not type(self.repair) or repair.config() != self.repair.config():
            return self.detect(model, trusted, ctx)
        require_images(trusted, "Calibrated Trigger Inversion")
        require_classifier(model, "Calibrated Trigger Inversion")
        detection = self.calibrated_score(model, outcome.model, trusted, ctx)
        detection.details["repair_fallback"] = outcome.details.get("fallback")
        detection.details["calibrated_with_the_runs_repair"] = True
        return detection

    def calibrated_score(
        self, model: nn.Module, repaired: nn.Module, trusted: TensorDataset, ctx: DefenseContext
    ) -> Detection:
        """The score of ``model`` given its repair (a study that repairs anyway passes its own)."""
        o, device = self._options, ctx.device
        suspect, repaired = frozen_copy(model).to(device), frozen_copy(repaired).to(device)
        scores = []
        with make_progress(True) as progress:
            task = progress.add_task("trigger inversion", total=trusted.num_classes, status="")
            for target in range(trusted.num_classes):
                others = trusted.subset((trusted.labels != target).nonzero().squeeze(1))
                delta = calibrated_trigger(
                    suspect,
                    repaired,
                    others,
                    target,
                    device=device,
                    steps=o["steps"],
                    lr=o["lr"],
                    batch_size=o["batch_size"],
                    calibration_weight=o["calibration_weight"],
                    seed=ctx.seed + target,
                )
                scores.append(
                    trigger_success(suspect, others, delta, target, device)
                    - trigger_success(repaired, others, delta, target, device)
                )
                progress.advance(task)
        return Detection(max(scores), None, {"class_scores": [round(s, 4) for s in scores]})

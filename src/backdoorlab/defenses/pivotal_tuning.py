"""Pivotal Tuning (Lukas & Kerschbaum, "Pick your Poison", 2023): repair with 1% clean data.

The paper's code was never released; the defaults and the loss follow the same group's public
framework, ``Ben-Schneider-code/Universal-Backdoor-Attacks`` (``defenses/post_training/
pivotal_tuning.py``, ``criteria/slol.py``, ``criteria/parameter.py``, ``arguments/defense_args.py``).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from itertools import takewhile
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import (
    REPAIRS,
    DefenseContext,
    DefenseOutcome,
    DefenseWarning,
    Observer,
    Repair,
    require_classifier,
)
from backdoorlab.defenses.post_training import frozen_copy, holdout_split, suspect_copy, tuning_recipe
from backdoorlab.metrics import clean_accuracy
from backdoorlab.options import Fraction, NonNegativeFloat, OpenFraction, PositiveFloat, PositiveInt
from backdoorlab.training.loop import Callback, PerSampleLoss, predict_logits, train
from backdoorlab.training.regularizers import embedding

#: How SLOL's orthogonality term removes the diagonal (``slol_form``).
SlolForm = Literal["off_diagonal", "reference"]
SLOL_FORMS: tuple[str, ...] = get_args(SlolForm)


def slol_terms(z: Tensor, z_pivot: Tensor, labels: Tensor, form: SlolForm = "off_diagonal") -> tuple[Tensor, Tensor]:
    """The two parts of SLOL, the latent-geometry term of Pivotal Tuning, on one batch:
    ``(orthogonality, pivot_cosine)``; :func:`soft_latent_orthogonality` is their sum.

    With ``C`` the matrix of class centroids of the batch's embeddings (one row per class present,
    ``C0`` the pivot's) and ``S = C^T C / K``: ``|| offdiag(S) ||_F + 1/2 sum_{k != l}
    cos(c_k - c_l, c0_k - c0_l)``. The first term decorrelates the embedding's dimensions across
    the class centroids; the second pushes the directions between class centroids away from the
    pivot's, which is what breaks a trigger's shortcut in the latent space.

    ``form`` says how the diagonal is removed:

    - ``"off_diagonal"`` (the default, reconstructed): ``S`` with its diagonal set to zero, as the
      paper's name ("orthogonality") says.
    - ``"reference"``: the reference code's literal ``cov - torch.diag(cov)`` (``criteria/slol.py``),
      which subtracts the diagonal *vector* from every row, entry ``(i, j)`` becoming ``S_ij - S_jj``
      (the diagonal is zero, the rest is not the off-diagonal); minimising that norm drives all
      coordinates of a centroid to the same value (``sum_k c_ki (c_ki - c_kj) -> 0``), towards
      centroids that differ only in scale.
    """
    if form not in SLOL_FORMS:
        raise ValueError(f"unknown slol_form {form!r}; valid: {', '.join(SLOL_FORMS)}")
    z, z_pivot = z.flatten(1).float(), z_pivot.flatten(1).float()
    classes = labels.unique()
    centroids = torch.stack([z[labels == k].mean(0) for k in classes])
    pivots = torch.stack([z_pivot[labels == k].mean(0) for k in classes])
    cov = centroids.T @ centroids / len(centroids)
    if form == "reference":
        orthogonality = torch.linalg.norm(cov - torch.diag(cov))  # broadcast: row i minus the diagonal
    else:
        orthogonality = torch.linalg.norm(cov - torch.diag_embed(torch.diagonal(cov)))
    diffs = (centroids[:, None] - centroids[None]).flatten(0, 1)
    pivot_diffs = (pivots[:, None] - pivots[None]).flatten(0, 1)
    cos = F.cosine_similarity(diffs, pivot_diffs, dim=1, eps=1e-8).view(len(classes), len(classes))
    off_diagonal = 1.0 - torch.eye(len(classes), device=cos.device)
    return orthogonality, (cos * off_diagonal).sum() / 2


def soft_latent_orthogonality(z: Tensor, z_pivot: Tensor, labels: Tensor, form: SlolForm = "off_diagonal") -> Tensor:
    """SLOL on one batch: the sum of :func:`slol_terms`."""
    orthogonality, pivot_cosine = slol_terms(z, z_pivot, labels, form)
    return orthogonality + pivot_cosine


def parameter_distance(model: nn.Module, pivot: nn.Module) -> Tensor:
    """Mean squared difference over all parameters (the reference code's ``ParameterLoss``)."""
    total, count = 0.0, 0
    for p, q in zip(model.parameters(), pivot.parameters()):
        total = total + (p.float() - q.float()).pow(2).sum()
        count += p.numel()
    return total / count


#: Parameters of ResNet-18 on CIFAR-10 (this project's ``resnet18``, 10 classes: 11,173,962), the
#: model the reference's ``param_lambda`` of 20000 was set on.
REFERENCE_PARAMETERS = 11_173_962
#: How ``parameter_weight`` scales the weight anchor (``anchor``).
Anchor = Literal["per_parameter", "mean"]
ANCHORS: tuple[str, ...] = get_args(Anchor)


def anchor_weight(parameter_weight: float, parameters: int, anchor: Anchor = "per_parameter") -> float:
    """The weight on :func:`parameter_distance` (a mean over ``parameters`` weights) that gives
    the anchor ``anchor``'s pull: ``"mean"``, ``parameter_weight`` itself (the reference's literal
    term, whose pull per weight, ``2 parameter_weight / N``, fades as the model grows);
    ``"per_parameter"``, ``parameter_weight * parameters / REFERENCE_PARAMETERS``, the pull per
    weight that ``parameter_weight`` has on the reference's ResNet-18, whatever the model."""
    if anchor not in ANCHORS:
        raise ValueError(f"unknown anchor {anchor!r}; valid: {', '.join(ANCHORS)}")
    return parameter_weight * parameters / REFERENCE_PARAMETERS if anchor == "per_parameter" else parameter_weight


def held_out_resolution(accuracy: float, size: int) -> float:
    """How finely ``size`` held-out images measure an accuracy near ``accuracy``: its binomial
    standard error, and never finer than one image (``1 / size``)."""
    return max(math.sqrt(accuracy * (1.0 - accuracy) / size), 1.0 / size)


class PivotalStep:
    """The training step: CE + ``slol_weight`` SLOL (in ``slol_form``) + ``parameter_weight``
    :func:`parameter_distance` (a weight on the *mean*: :func:`anchor_weight` converts a
    per-parameter one; the batch terms are added to each sample's loss, so the batch mean is the
    reference loss)."""

    def __init__(
        self, pivot: nn.Module, slol_weight: float, parameter_weight: float, slol_form: SlolForm = "off_diagonal"
    ) -> None:
        self.pivot, self.slol_weight, self.parameter_weight = pivot, slol_weight, parameter_weight
        self.slol_form = slol_form

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: PerSampleLoss,
        indices: Tensor,
        epoch: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        z, logits = embedding(model, x)
        losses = loss_fn(logits.float(), y, indices, epoch)
        extra = self.parameter_weight * parameter_distance(model, self.pivot)
        if self.slol_weight:
            with torch.no_grad():
                z_pivot, _ = embedding(self.pivot, x)
            extra = extra + self.slol_weight * soft_latent_orthogonality(z, z_pivot, y, self.slol_form)
        return logits, losses + extra


#: How Pivotal Tuning picks its checkpoint from the held-out curve (``checkpoint_rule``).
CheckpointRule = Literal["latest", "first_drop", "last"]
CHECKPOINT_RULES: tuple[str, ...] = get_args(CheckpointRule)


def chosen_checkpoint(accuracies: Sequence[float], max_drop: float, rule: str = "latest") -> int:
    """The index of the checkpoint a rule keeps from held-out accuracies (index 0: the suspect
    model): ``latest``, the last within ``max_drop`` of the suspect's; ``first_drop``, the last
    before the accuracy first falls below that floor; ``last``, the last whatever its accuracy
    (the reference code's)."""
    if rule not in CHECKPOINT_RULES:
        raise ValueError(f"unknown checkpoint_rule {rule!r}; valid: {', '.join(CHECKPOINT_RULES)}")
    if rule == "last":
        return len(accuracies) - 1
    floor = accuracies[0] - max_drop
    if rule == "first_drop":
        accuracies = list(takewhile(lambda accuracy: accuracy >= floor, accuracies))
    return max(i for i, accuracy in enumerate(accuracies) if accuracy >= floor)


class CheckpointOnHeldOut(Callback):
    """Every ``every`` steps and at ``last_step`` (the end of training), measure held-out clean
    accuracy and keep the latest weights whose accuracy is within ``max_drop`` of the suspect
    model's (``pivot``, measured as step 0); with ``rule="first_drop"``, only checkpoints before
    the accuracy first falls below that floor; with ``rule="last"``, the last checkpoint. An
    ``observer`` (the evaluation's snapshot taker) is called with the model at each of these
    checkpoints, step 0 included; it measures nothing while the repair runs.

    Each measurement also records, on the same held-out images in eval mode, the terms of the loss
    unweighted (cross-entropy, SLOL's orthogonality and pivot-cosine parts in ``slol_form``, the
    mean squared weight distance) and the embedding's mean norm: the trace that shows which term moves the
    model (docs/notes/2026-11-24-pivotal-tuning-cifar10.md)."""

    def __init__(
        self,
        held_out: TensorDataset,
        pivot: nn.Module,
        max_drop: float,
        every: int,
        steps_per_epoch: int,
        device: torch.device,
        observer: Observer | None = None,
        rule: str = "latest",
        *,
        last_step: int | None = None,
        slol_form: SlolForm = "off_diagonal",
    ) -> None:
        self.held_out, self.pivot, self.every, self.observer = held_out, pivot, every, observer
        self.max_drop, self.rule, self.last_step, self.slol_form = max_drop, rule, last_step, slol_form
        self.steps_per_epoch, self.device = steps_per_epoch, device
        self.pivot_embedding = predict_logits(pivot, held_out.inputs, device=device, pre_logits=True)
        self.best: dict[str, Tensor] | None = None
        self.best_step = 0
        self.curve: list[dict[str, Any]] = []
        self.start_accuracy = self.measure(0, pivot)
        if observer is not None:
            observer(pivot, 0)

    def measure(self, step: int, model: nn.Module) -> float:
        """Append the held-out accuracy and loss terms at ``step`` to ``curve``; return the accuracy."""
        logits = predict_logits(model, self.held_out.inputs, device=self.device)
        z = predict_logits(model, self.held_out.inputs, device=self.device, pre_logits=True)
        labels = self.held_out.labels
        orthogonality, pivot_cosine = slol_terms(z, self.pivot_embedding, labels, self.slol_form)
        with torch.no_grad():
            distance = parameter_distance(model, self.pivot).item()
        acc = clean_accuracy(logits.argmax(1), labels)
        self.curve.append(
            {
                "step": step,
                "accuracy": acc,
                "cross_entropy": F.cross_entropy(logits, labels).item(),
                "orthogonality": orthogonality.item(),
                "pivot_cosine": pivot_cosine.item(),
                "parameter_distance": distance,
                "feature_norm": z.flatten(1).norm(dim=1).mean().item(),
            }
        )
        return acc

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        step = (epoch + 1) * self.steps_per_epoch
        if step != self.last_step and step // self.every == epoch * self.steps_per_epoch // self.every:
            return
        self.measure(step, model)
        accuracies = [point["accuracy"] for point in self.curve]
        if chosen_checkpoint(accuracies, self.max_drop, self.rule) == len(accuracies) - 1:
            self.best, self.best_step = copy.deepcopy(model.state_dict()), step
        if self.observer is not None:
            self.observer(model, step)


@REPAIRS.register(
    "pivotal_tuning",
    "Pivotal Tuning (Lukas & Kerschbaum 2023): CE + SLOL + weight anchor to the suspect model",
    revision=1,  # 2026-12-06: the anchor per parameter by default (was the reference's mean)
)
class PivotalTuning(Repair):
    """Fine-tune the suspect model on trusted clean data while a frozen copy of it, the pivot,
    anchors the weights and the latent class geometry is pushed away from the pivot's.

    Loss per batch: ``CE(f(x), y) + 0.05 SLOL(z, z_pivot, y) + parameter_weight * anchor``, SGD lr
    1e-4, momentum 0.9, Nesterov, no weight decay, constant rate, 2000 steps of batch 128 (rounded
    up to whole passes), the reference's defaults (``def_init_lr``, ``slol_lambda``,
    ``param_lambda``, ``def_num_steps``). Reconstructed: the anchor gives every model the pull per
    weight the reference's has on its ResNet-18 (``anchor``); the model returned is the latest
    checkpoint (every ``eval_every`` 50 steps) within ``max_accuracy_drop`` 0.02 of the suspect's
    accuracy on a ``held_out`` 10% of the trusted split, or, where none is, the suspect model
    itself with a warning (``details["fallback"] = "suspect"``). Why, and the measurements:
    docs/defenses.md, its ``pivotal_tuning`` row and "Pivotal Tuning in full".

    Args:
        parameter_weight: the weight anchor's weight, in the units ``anchor`` says (default 20000,
            the reference's ``param_lambda``).
        anchor: ``"per_parameter"`` (default, reconstructed): ``parameter_weight`` is the pull per
            weight it has on the reference's ResNet-18 (11,173,962 parameters), on any model;
            ``"mean"``: the reference's literal ``parameter_weight * mean((theta - theta_pivot)^2)``.
        slol_form: ``"off_diagonal"`` (default, reconstructed): SLOL's orthogonality term is the
            norm of the centroid Gram matrix with its diagonal zeroed; ``"reference"``: the
            reference code's literal ``cov - torch.diag(cov)``, which subtracts the diagonal vector
            from every row (:func:`slol_terms`).
        checkpoint_rule: ``"latest"`` (default): the latest checkpoint within
            ``max_accuracy_drop`` of the suspect's held-out accuracy; ``"first_drop"``: the last
            before the held-out accuracy first falls below that; ``"last"``: the last step (the
            reference's).
    """

    checkpoint_unit: ClassVar[str] = "step"

    def __init__(
        self,
        steps: PositiveInt = 2000,
        lr: PositiveFloat = 1e-4,
        batch_size: PositiveInt = 128,
        slol_weight: NonNegativeFloat = 0.05,
        parameter_weight: NonNegativeFloat = 20_000.0,
        anchor: Anchor = "per_parameter",
        eval_every: PositiveInt = 50,
        held_out: OpenFraction = 0.1,
        max_accuracy_drop: Fraction = 0.02,
        checkpoint_rule: CheckpointRule = "latest",
        slol_form: SlolForm = "off_diagonal",
    ) -> None:
        if steps < 1 or lr <= 0 or batch_size < 1 or eval_every < 1:
            raise ValueError("pivotal tuning needs steps, batch_size, eval_every >= 1 and lr > 0")
        if not 0.0 < held_out < 1.0:
            raise ValueError(f"held_out must be in (0, 1), got {held_out}")
        for name, value, valid in (
            ("anchor", anchor, ANCHORS),
            ("checkpoint_rule", checkpoint_rule, CHECKPOINT_RULES),
            ("slol_form", slol_form, SLOL_FORMS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")

    def check_trusted(self, trusted: TensorDataset) -> None:
        """The held-out share must leave samples on both sides of the split."""
        super().check_trusted(trusted)
        holdout_split(trusted, self._options["held_out"], 0)

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        require_classifier(model, "Pivotal Tuning")
        o, device = self._options, ctx.device
        tune, held_out = holdout_split(trusted, o["held_out"], ctx.seed)
        model = suspect_copy(model).to(device)
        pivot = frozen_copy(model)
        steps_per_epoch = math.ceil(len(tune) / o["batch_size"])
        epochs = math.ceil(o["steps"] / steps_per_epoch)
        config = tuning_recipe(
            ctx.recipe, epochs=epochs, lr=o["lr"], batch_size=o["batch_size"], weight_decay=0.0, schedule="constant"
        )
        checkpoints = CheckpointOnHeldOut(
            held_out,
            pivot,
            o["max_accuracy_drop"],
            o["eval_every"],
            steps_per_epoch,
            device,
            ctx.observer,
            o["checkpoint_rule"],
            last_step=epochs * steps_per_epoch,
            slol_form=o["slol_form"],
        )
        resolution = held_out_resolution(checkpoints.start_accuracy, len(held_out))
        if resolution > o["max_accuracy_drop"] and o["checkpoint_rule"] != "last":  # "last" chooses nothing on it
            warnings.warn(
                f"the held-out share has {len(held_out)} images: its accuracy ({checkpoints.start_accuracy:.2f}) is known "
                f"to about {resolution:.2f} (one standard error), coarser than the {o['max_accuracy_drop']} tolerance, "
                "so the checkpoint it keeps may have lost more; give the repair more trusted data (--trusted-size) "
                "or a larger held_out share",
                DefenseWarning,
                stacklevel=2,
            )
        parameters = sum(p.numel() for p in model.parameters())
        weight = anchor_weight(o["parameter_weight"], parameters, o["anchor"])
        step = PivotalStep(pivot, o["slol_weight"], weight, o["slol_form"])
        train(
            model,
            tune,
            config,
            device=device,
            seed=ctx.seed,
            step=step,
            callbacks=[checkpoints],
            description="pivotal tuning",
        )
        if checkpoints.best is not None:
            model.load_state_dict(checkpoints.best)
        else:  # no checkpoint kept the accuracy: the suspect model is the safest answer
            model.load_state_dict(pivot.state_dict())
            warnings.warn(
                f"pivotal tuning collapsed: it kept no checkpoint within {o['max_accuracy_drop']} of the suspect model's "
                "held-out accuracy, so it returns the suspect model unchanged (details: held_out_curve)",
                DefenseWarning,
                stacklevel=2,
            )
        curve = [{k: v if k == "step" else float(f"{v:.4g}") for k, v in point.items()} for point in checkpoints.curve]
        return DefenseOutcome(
            model.eval(),
            details={
                "held_out_accuracy_before": curve[0]["accuracy"],
                "held_out_size": len(held_out),
                "held_out_standard_error": float(f"{resolution:.4g}"),
                "chosen_step": checkpoints.best_step,
                "fallback": None if checkpoints.best is not None else "suspect",
                "parameters": parameters,
                "anchor_weight": float(f"{weight:.6g}"),
                "held_out_curve": curve,
            },
        )

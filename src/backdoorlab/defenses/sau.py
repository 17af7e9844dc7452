"""SAU (Wei et al. 2023): unlearn the adversarial examples the suspect model shares with its
frozen copy, which stand in for the backdoor's poisoned samples."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import REPAIRS, DefenseContext, DefenseOutcome, Repair
from backdoorlab.defenses.post_training import frozen_copy, shuffled_index_batches, suspect_copy
from backdoorlab.options import NonNegativeFloat, PositiveFloat, PositiveInt
from backdoorlab.progress import progress_bar
from backdoorlab.training.loop import to_float


def shared_adversarial_examples(
    model: nn.Module, reference: nn.Module, x: Tensor, y: Tensor, o: dict[str, Any]
) -> Tensor:
    """The official ``Shared_PGD.attack`` (L-inf): a per-sample perturbation, started at
    ``+bound``, that takes ``steps`` signed-gradient steps of ``step_size`` on ``beta_1`` x the
    cross-entropy of the samples either model still classifies as before (to be maximised) plus
    ``beta_2`` x the Jensen-Shannon divergence of the two models' predictions on the samples whose
    attack is not yet shared (the same wrong label from both), projected to ``[-bound, bound]``;
    it stops early once every attack is shared."""
    bound = o["bound"]
    with torch.no_grad():
        own, own_ref = model(x).argmax(1), reference(x).argmax(1)
    delta = torch.full_like(x, bound, requires_grad=True)
    for _ in range(o["steps"]):
        logits, logits_ref = model(x + delta), reference(x + delta)
        label, label_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = label != own, label_ref != own_ref
        shared = fooled & fooled_ref & (label == label_ref)
        adversarial = (
            F.cross_entropy(logits, y, reduction="none")[~fooled].sum()
            + F.cross_entropy(logits_ref, y, reduction="none")[~fooled_ref].sum()
        )
        adversarial = -adversarial / 2 / len(x)
        p, p_ref = F.softmax(logits, 1).clamp(min=1e-8), F.softmax(logits_ref, 1).clamp(min=1e-8)
        mix = 0.5 * (p + p_ref)
        js = 0.5 * (p * p.log() + p_ref * p_ref.log()) - 0.5 * (p * mix.log() + p_ref * mix.log())
        disagreement = js[~shared].sum(1).sum() / len(x)
        (grad,) = torch.autograd.grad(o["beta_1"] * adversarial + o["beta_2"] * disagreement, delta)
        with torch.no_grad():
            delta -= o["step_size"] * grad.sign()
            delta.clamp_(-bound, bound)
        if bool(shared.all()):
            break
    return delta.detach()


def shared_unlearning_loss(
    model: nn.Module, reference: nn.Module, x: Tensor, y: Tensor, delta: Tensor, num_classes: int
) -> Tensor:
    """The official outer loss at ``lmd_1 = lmd_3 = 1``, ``lmd_2 = 0``: cross-entropy on the clean
    batch, plus, on the samples whose perturbation fools the frozen copy, ``-log`` of the model's
    probability off the copy's wrong label and ``-log`` of one minus the probability on it, halved
    and averaged over the batch."""
    logits, perturbed = model(torch.cat([x, x + delta])).split(len(x))
    with torch.no_grad():
        own_ref = reference(x).argmax(1)
        label_ref = reference(x + delta).argmax(1)
    poison_like = (label_ref != y) & (label_ref != own_ref)
    loss = F.cross_entropy(logits, y)
    if bool(poison_like.any()):
        one_hot = F.one_hot(label_ref, num_classes).to(perturbed.dtype)
        p = F.softmax(perturbed, 1)
        off = (p * (1 - one_hot)).sum(1)[poison_like]
        on = (p * one_hot).sum(1)[poison_like]
        shared = -torch.log(1e-6 + off.clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - on.clamp(min=0.001)).sum()
        loss = loss + shared / 2 / len(x)
    return loss


@REPAIRS.register(
    "sau", "SAU (Wei et al. 2023): unlearn the adversarial examples the model shares with its frozen copy"
)
class SharedAdversarialUnlearning(Repair):
    """Adversarial examples that fool the suspect model and its frozen copy in the same way behave
    like poisoned samples; SAU finds them on the trusted split (:func:`shared_adversarial_examples`)
    and trains the model to classify them off the shared wrong label while keeping the clean batch
    (:func:`shared_unlearning_loss`), by Adam (AMSGrad, as BackdoorBench's optimiser factory builds
    it) at a constant learning rate, model in eval mode,
    batches unaugmented (BackdoorBench's ``train=False`` transform). Source: Wei et al., "Shared
    Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial Examples" (NeurIPS
    2023); the official code is BackdoorBench's ``defense/sau.py`` by the first author
    (``config/defense/sau/cifar10.yaml``: 100 rounds, batch 256, Adam lr 1e-4, L-inf bound 0.2,
    step 0.2, 5 steps from ``max``, beta_1 0.01, beta_2 1, lmd_1 1, lmd_2 0, lmd_3 1, one outer
    step; the defaults here). Its cosine scheduler is created and never stepped, so the rate is
    constant, as here; the perturbation is added in pixel space with no clamp to the image range, as
    there (its ``max_eps``/``min_eps`` are not used).

    Args:
        rounds: passes over the trusted split.
        lr: Adam's learning rate.
        batch_size: trusted samples per step.
        bound: the L-inf bound of the perturbation (in [0, 1] pixel units).
        step_size, steps: of the perturbation's signed-gradient steps.
        beta_1, beta_2: weights of the adversarial and the shared (Jensen-Shannon) term.
    """

    #: The persistence curve's checkpoints: the model after each round.
    checkpoint_unit: ClassVar[str] = "round"

    def __init__(
        self,
        rounds: PositiveInt = 100,
        lr: PositiveFloat = 1e-4,
        batch_size: PositiveInt = 256,
        bound: PositiveFloat = 0.2,
        step_size: PositiveFloat = 0.2,
        steps: PositiveInt = 5,
        beta_1: NonNegativeFloat = 0.01,
        beta_2: NonNegativeFloat = 1.0,
    ) -> None:
        super().__init__()

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        o = self._options
        reference = frozen_copy(model).to(ctx.device).eval()
        model = suspect_copy(model).to(ctx.device).eval()
        optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"], amsgrad=True)
        generator = torch.Generator().manual_seed(ctx.seed)
        inputs, labels = trusted.inputs.to(ctx.device), trusted.labels.to(ctx.device)
        ctx.observe(model, 0)
        for round_ in progress_bar(range(o["rounds"]), "SAU rounds"):
            for index in shuffled_index_batches(len(trusted), o["batch_size"], generator, ctx.device):
                x, y = to_float(inputs[index]), labels[index]
                delta = shared_adversarial_examples(model, reference, x, y, o)
                loss = shared_unlearning_loss(model, reference, x, y, delta, trusted.num_classes)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            ctx.observe(model, round_ + 1)
        return DefenseOutcome(model)

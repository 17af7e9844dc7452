"""ANP (Wu & Wang 2021): learn a mask over batch-norm neurons that keeps clean accuracy under
adversarial neuron perturbations, then prune the neurons whose mask falls low."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import REPAIRS, DefenseContext, DefenseOutcome, Repair
from backdoorlab.defenses.channel_pruning import norm_layers
from backdoorlab.defenses.neuron_masks import clip_masks, masked, prune_masked_neurons
from backdoorlab.defenses.post_training import suspect_copy
from backdoorlab.options import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt
from backdoorlab.progress import progress_bar
from backdoorlab.training.loop import BatchAugmentation


def optimise_masks(
    model: nn.Module,
    trusted: TensorDataset,
    ctx: DefenseContext,
    *,
    iterations: int,
    batch_size: int,
    lr: float,
    eps: float,
    steps: int,
    alpha: float,
) -> dict[str, Tensor]:
    """ANP's mask optimisation on a copy of ``model`` (train mode, as the official ``mask_train``):
    per batch (drawn with replacement, augmented as the run's recipe), noise drawn uniform in
    ``[-eps, eps]`` takes ``steps`` signed-gradient ascent steps of ``eps / steps`` on the loss; then
    the masks take an SGD step (momentum 0.9) on ``alpha * natural + (1 - alpha) * perturbed`` loss
    and are clipped to ``[0, 1]``. Returns each layer's mask."""
    model = suspect_copy(model).to(ctx.device).train()
    layers = masked(model)
    masks = [p.mask for p in layers.values()]
    noises = [t for p in layers.values() for t in (p.noise, p.noise_bias)]
    mask_optimizer = torch.optim.SGD(masks, lr=lr, momentum=0.9)
    noise_optimizer = torch.optim.SGD(noises, lr=eps / steps)
    generator = torch.Generator().manual_seed(ctx.seed)
    augment = BatchAugmentation(ctx.recipe, trusted, generator, ctx.device)
    inputs, labels = trusted.inputs.to(ctx.device), trusted.labels.to(ctx.device)

    def perturb(on: bool) -> None:
        for p in layers.values():
            p.perturbed = on

    for iteration in progress_bar(range(iterations), "ANP masks"):
        index = torch.randint(len(trusted), (batch_size,), generator=generator).to(ctx.device)
        x, y = augment(inputs[index], index, iteration * batch_size // len(trusted)), labels[index]
        if eps > 0:
            with torch.no_grad():
                for noise in noises:
                    noise.copy_(torch.empty(noise.shape).uniform_(-eps, eps, generator=generator))
            perturb(True)
            for _ in range(steps):
                noise_optimizer.zero_grad()
                (-F.cross_entropy(model(x), y)).backward()
                for noise in noises:
                    noise.grad = noise.grad.sign()
                noise_optimizer.step()
        mask_optimizer.zero_grad()
        robust = F.cross_entropy(model(x), y) if eps > 0 else torch.zeros((), device=ctx.device)
        perturb(False)
        natural = F.cross_entropy(model(x), y)
        (alpha * natural + (1 - alpha) * robust).backward()
        mask_optimizer.step()
        clip_masks(masks)
    return {name: p.mask.detach().cpu() for name, p in layers.items()}


@REPAIRS.register(
    "anp", "ANP (Wu & Wang 2021): prune batch-norm neurons that adversarial neuron perturbation shows to be fragile"
)
class AdversarialNeuronPruning(Repair):
    """Backdoored neurons are the ones whose small perturbation flips clean predictions to the target:
    ANP learns a mask in ``[0, 1]`` over every batch-norm neuron (:func:`optimise_masks`) that keeps
    the trusted data classified while neurons are adversarially perturbed, then prunes each neuron
    whose mask is at or below ``threshold`` (:func:`~backdoorlab.defenses.neuron_masks.prune_masked_neurons`). Source: Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
    Models" (NeurIPS 2021); official code ``csdongxian/ANP_backdoor`` (``optimize_mask_cifar.py``:
    eps 0.4, one step, alpha 0.2, mask lr 0.2, batch 128, 2,000 iterations, the defaults here).

    The threshold 0.2 is the paper's fixed pruning threshold. The official ``prune_neuron_cifar.py``
    sweeps thresholds 0 to 0.9 and prints each one's test accuracy and ASR, and BackdoorBench's
    ``defense/anp.py`` keeps the threshold with the lowest *test* ASR within 10% of the clean
    accuracy: that reads the test set and the trigger, which a defense here never sees, so it is
    not copied. BackdoorBench's configuration (``config/defense/anp/cifar10.yaml``) also sets the
    mask lr to 0.01 and batch 256 (the ``backdoorbench`` preset has them). Batches and noise are
    drawn from the run's seed.

    Args:
        eps: the bound of the neuron perturbation (relative, on each BN weight and bias).
        steps: signed-gradient ascent steps on the perturbation per batch.
        alpha: the weight of the unperturbed loss (1 - alpha on the perturbed one).
        lr: the mask optimiser's learning rate.
        iterations: mask optimisation steps.
        batch_size: trusted samples per step.
        threshold: neurons whose mask ends at or below it are pruned.
    """

    def __init__(
        self,
        eps: NonNegativeFloat = 0.4,
        steps: PositiveInt = 1,
        alpha: Fraction = 0.2,
        lr: PositiveFloat = 0.2,
        iterations: PositiveInt = 2000,
        batch_size: PositiveInt = 128,
        threshold: Fraction = 0.2,
    ) -> None:
        super().__init__()

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        o = self._options
        norm_layers(model)  # a model without batch norm is refused before anything else
        masks = optimise_masks(
            model,
            trusted,
            ctx,
            iterations=o["iterations"],
            batch_size=o["batch_size"],
            lr=o["lr"],
            eps=o["eps"],
            steps=o["steps"],
            alpha=o["alpha"],
        )
        model = suspect_copy(model)
        details = prune_masked_neurons(model, masks, o["threshold"])
        return DefenseOutcome(model, details=details)

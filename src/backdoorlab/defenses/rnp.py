"""RNP (Li et al. 2023): unlearn the suspect model on clean data until it fails, recover it by a
mask over batch-norm neurons, and prune the neurons the recovery switched off."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import REPAIRS, DefenseContext, DefenseOutcome, DefenseWarning, Repair
from backdoorlab.defenses.channel_pruning import norm_layers
from backdoorlab.defenses.neuron_masks import clip_masks, masked, prune_masked_neurons
from backdoorlab.defenses.post_training import shuffled_index_batches, suspect_copy
from backdoorlab.options import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from backdoorlab.progress import progress_bar
from backdoorlab.training.loop import BatchAugmentation


def shuffled_batches(
    trusted: TensorDataset, ctx: DefenseContext, batch_size: int, epochs: int, generator: torch.Generator
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(epoch, inputs, labels)`` for every batch of ``epochs`` shuffled passes over ``trusted``,
    augmented as the run's recipe, on the context's device."""
    augment = BatchAugmentation(ctx.recipe, trusted, generator, ctx.device)
    inputs, labels = trusted.inputs.to(ctx.device), trusted.labels.to(ctx.device)
    for epoch in range(epochs):
        for index in shuffled_index_batches(len(trusted), batch_size, generator, ctx.device):
            yield epoch, augment(inputs[index], index, epoch), labels[index]


def unlearn(
    model: nn.Module, trusted: TensorDataset, ctx: DefenseContext, o: dict[str, Any], generator: torch.Generator
) -> tuple[int, float]:
    """RNP's first stage, in place: gradient ascent on the trusted split's cross-entropy (SGD
    momentum 0.9, weight decay 5e-4, lr divided by 10 at epochs 10 and 20, train mode) until an
    epoch's running accuracy falls to ``clean_threshold``; returns the epochs run and that accuracy."""
    model.to(ctx.device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=o["unlearning_lr"], momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20], gamma=0.1)
    epoch_correct, current, accuracy = 0, 0, 1.0
    for epoch, x, y in shuffled_batches(trusted, ctx, o["batch_size"], o["unlearning_epochs"] + 1, generator):
        if epoch != current:  # the previous epoch is over
            accuracy = epoch_correct / len(trusted)
            if accuracy <= o["clean_threshold"]:
                return current + 1, accuracy
            scheduler.step()
            epoch_correct, current = 0, epoch
        logits = model(x)
        epoch_correct += int((logits.argmax(1) == y).sum())
        optimizer.zero_grad()
        (-F.cross_entropy(logits, y)).backward()
        optimizer.step()
    return current + 1, epoch_correct / len(trusted)


@REPAIRS.register(
    "rnp", "RNP (Li et al. 2023): unlearn on clean data, recover by a neuron mask, prune what the recovery masked"
)
class ReconstructiveNeuronPruning(Repair):
    """Unlearning the suspect model on clean data (gradient ascent until its accuracy on them falls
    to ``clean_threshold``) disturbs clean neurons and leaves backdoor neurons intact; recovering it
    by a mask over batch-norm neurons (SGD on ``alpha * CE`` of the trusted split, masks only,
    clipped to ``[0, 1]``) switches off the neurons the unlearning did not damage, which are the
    backdoor's. The suspect model's neurons with a recovered mask at or below ``threshold`` are
    pruned (:func:`~backdoorlab.defenses.neuron_masks.prune_masked_neurons`). Source: Li et al.,
    "Reconstructive Neuron Pruning for Backdoor Defense" (ICML 2023); official code
    ``bboylyg/RNP`` (``main.py``: unlearning lr 0.01 with milestones 10 and 20, at most 21 epochs,
    clean threshold 0.2; recovering lr 0.2, 20 epochs, alpha 0.2; batch 128; 500 trusted images,
    the defaults here); BackdoorBench's ``defense/rnp.py``.

    Reconstructed: the pruning threshold. The official script sweeps thresholds 0 to 0.9 in steps
    of 0.05 and prints each one's test metrics (its README log: 0.2 is the first threshold that takes
    BadNets' ASR below 10%); a defense here sees no test set, so it prunes at a fixed ``threshold``,
    0.2 by default. Where the unlearning does not reach ``clean_threshold`` in its epochs (the
    official code then has no unlearned model to load and stops), the recovery runs on the model as
    far as it got, with a ``DefenseWarning``. The official ``clip_grad_norm_`` call comes before
    ``backward`` and so clips nothing; there is none here.

    Args:
        unlearning_lr: SGD learning rate of the unlearning.
        unlearning_epochs: unlearning stops after this many epochs and one more at the latest.
        clean_threshold: unlearning stops once an epoch's accuracy on the trusted split is at or below it.
        recovering_lr: SGD learning rate of the masks.
        recovering_epochs: epochs of mask recovery.
        alpha: the weight of the recovery's cross-entropy.
        batch_size: trusted samples per step.
        threshold: neurons whose recovered mask is at or below it are pruned.
    """

    def __init__(
        self,
        unlearning_lr: PositiveFloat = 0.01,
        unlearning_epochs: NonNegativeInt = 20,
        clean_threshold: Fraction = 0.2,
        recovering_lr: PositiveFloat = 0.2,
        recovering_epochs: PositiveInt = 20,
        alpha: PositiveFloat = 0.2,
        batch_size: PositiveInt = 128,
        threshold: Fraction = 0.2,
    ) -> None:
        super().__init__()

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        o = self._options
        norm_layers(model)  # a model without batch norm is refused before anything else
        generator = torch.Generator().manual_seed(ctx.seed)
        unlearned = suspect_copy(model)
        epochs, accuracy = unlearn(unlearned, trusted, ctx, o, generator)
        if accuracy > o["clean_threshold"]:
            warnings.warn(
                f"RNP's unlearning left trusted accuracy at {accuracy:.2f} after {epochs} epochs, above "
                f"clean_threshold={o['clean_threshold']}: the mask is recovered from a model that is not yet "
                "unlearnt, and may not single out the backdoor's neurons (raise unlearning_lr or unlearning_epochs)",
                DefenseWarning,
                stacklevel=2,
            )
        layers = masked(unlearned)
        masks = [m.mask for m in layers.values()]
        optimizer = torch.optim.SGD(masks, lr=o["recovering_lr"], momentum=0.9)
        batches = shuffled_batches(trusted, ctx, o["batch_size"], o["recovering_epochs"], generator)
        steps = o["recovering_epochs"] * -(-len(trusted) // o["batch_size"])
        for _, x, y in progress_bar(batches, "RNP recovery", total=steps):
            optimizer.zero_grad()
            (o["alpha"] * F.cross_entropy(unlearned(x), y)).backward()
            optimizer.step()
            clip_masks(masks)
        repaired = suspect_copy(model)
        details = prune_masked_neurons(repaired, {n: m.mask.detach().cpu() for n, m in layers.items()}, o["threshold"])
        return DefenseOutcome(
            repaired, details={**details, "unlearning_epochs_run": epochs, "unlearned_accuracy": round(accuracy, 4)}
        )

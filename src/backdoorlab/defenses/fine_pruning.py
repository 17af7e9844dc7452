"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018): prune dormant last-layer channels, then fine-tune."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import REPAIRS, DefenseContext, DefenseOutcome, Repair, require_classifier
from backdoorlab.defenses.fine_tuning import FineTuning
from backdoorlab.defenses.post_training import suspect_copy
from backdoorlab.options import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from backdoorlab.training.loop import predict_logits


def pruning_order(features: Tensor) -> Tensor:
    """Channels by increasing mean activation on clean data (the most dormant first)."""
    return features.mean(0).argsort()


@torch.no_grad()
def head_accuracy(features: Tensor, labels: Tensor, model: nn.Module, keep: Tensor | None = None) -> float:
    """Accuracy of the model's linear head on pooled ``features`` with channels ``keep`` (a 0/1
    vector; all by default). Exact for backdoorlab's models: the pooled features only feed the head."""
    head: nn.Linear = model.fc
    x = features if keep is None else features * keep
    logits = x @ head.weight.detach().float().cpu().T
    if head.bias is not None:
        logits = logits + head.bias.detach().float().cpu()
    return float(((logits * getattr(model, "logit_scale", 1.0)).argmax(1) == labels).float().mean())


def prunable_count(features: Tensor, labels: Tensor, model: nn.Module, order: Tensor, floor: float) -> int:
    """The longest prefix of ``order`` whose pruning keeps clean accuracy >= ``floor``."""
    keep = torch.ones(features.shape[1])
    count = 0
    for k, channel in enumerate(order.tolist(), start=1):
        keep[channel] = 0.0
        if head_accuracy(features, labels, model, keep) < floor:
            break
        count = k
    return count


@REPAIRS.register("fine_pruning", "Fine-Pruning (Liu et al. 2018): prune dormant last-layer channels, then fine-tune")
class FinePruning(Repair):
    """Prune the last convolutional layer's channels that clean data leaves dormant, then fine-tune.

    1. Rank the channels of the body's last feature map by their mean activation on the trusted
       clean split (the paper's defender ranks on clean validation data).
    2. Prune in increasing order of activation for as long as clean accuracy on the trusted split
       stays within ``max_accuracy_drop`` of the suspect model's (the paper prunes until validation
       accuracy falls by a threshold; 4 points is our default, reconstructed; BackdoorBench stops at
       a 10% relative drop, ``acc_ratio`` 0.1: ``relative_drop=True`` reads ``max_accuracy_drop``
       as a share of the suspect's trusted accuracy). A pruned channel is removed by zeroing its column
       of the linear head, which is exact for backdoorlab's models (global pool, then linear) and
       keeps the architecture, so a pruned model saves and loads like any other.
    3. Fine-tune on the trusted split with :class:`FineTuning`'s settings (BackdoorBench's ``fp``
       uses the same schedule as its ``ft``; lr 0.1 as there), the pruned columns held at zero.

    BackdoorBench's ``fp`` (``defense/fp.py``, ``config/defense/fp/cifar10.yaml``; the
    ``backdoorbench`` preset takes its 10% relative drop and its fine-tuning: 100 epochs, lr 0.01,
    batch 256) chooses the pruning depth on the *test set* (``fp.py:352-378``: clean test accuracy
    after each step of 1% of the channels), and keeps the network of the first depth past the
    threshold (``last_net`` is the pruned network itself, pruned in place). Neither is copied: a
    defense may not see the test set, so the depth here is chosen on the trusted split, channel by
    channel, and the deepest within the threshold is kept.
    """

    def __init__(
        self,
        max_accuracy_drop: Fraction = 0.04,
        epochs: NonNegativeInt = 20,
        lr: PositiveFloat = 0.1,
        batch_size: PositiveInt = 128,
        relative_drop: bool = False,
    ) -> None:
        if not 0.0 <= max_accuracy_drop < 1.0:
            raise ValueError(f"max_accuracy_drop must be in [0, 1), got {max_accuracy_drop}")
        self.tuning = FineTuning(epochs=epochs, lr=lr, batch_size=batch_size)
        self.max_accuracy_drop, self.relative_drop = float(max_accuracy_drop), bool(relative_drop)

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        require_classifier(model, "Fine-pruning")
        model = suspect_copy(model)
        # the pooled last-layer features the head reads, in float32 (no autocast: the pruning
        # threshold compares accuracies that bf16 rounding could shift)
        features = predict_logits(model, trusted.inputs, device=ctx.device, batch_size=512, amp=False, pre_logits=True)
        head: nn.Linear = model.fc
        start = head_accuracy(features, trusted.labels, model)
        order = pruning_order(features)
        floor = start * (1 - self.max_accuracy_drop) if self.relative_drop else start - self.max_accuracy_drop
        count = prunable_count(features, trusted.labels, model, order, floor)
        pruned = order[:count].to(head.weight.device)
        with torch.no_grad():
            head.weight[:, pruned] = 0.0
        keep = torch.ones_like(head.weight)
        keep[:, pruned] = 0.0
        hook = head.weight.register_hook(lambda grad: grad * keep.to(grad.device))
        try:
            self.tuning.tune(model, trusted, ctx, description="fine-pruning")
        finally:
            hook.remove()
        return DefenseOutcome(
            model,
            details={
                "pruned_channels": count,
                "channels": int(features.shape[1]),
                "trusted_accuracy_before": round(start, 4),
            },
        )

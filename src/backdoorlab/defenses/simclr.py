"""SimCLR as DBD runs it (Huang et al., "Backdoor Defense via Decoupling the Training Process",
ICLR 2022; official code ``SCLBD/DBD``; BackdoorBench ``utils/defense_utils/dbd/``: ``SelfModel``,
``SimCLRLoss``, ``simclr_train`` and the pretrain config
``config_z/pretrain/squareTrigger/cifar10/example.yaml``), shared by DBD (its first stage) and
NAB (its relabelling model, as BackdoorBench's ``defense/nab.py`` borrows it).

A fresh classifier's feature extractor with a projection head learns, on the training images
without their labels, to tell two augmented views of the same image from the views of every other
image in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.corruptions import gaussian_blur
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.abl import without_augmentation
from backdoorlab.defenses.base import DefenseContext
from backdoorlab.models.classifier import Classifier
from backdoorlab.training.augment import contrastive_views
from backdoorlab.training.loop import TrainConfig, train
from backdoorlab.training.regularizers import embedding
from backdoorlab.training.steps import PerSampleLoss

#: The SimCLR stage's weight decay (DBD's ``config_z/pretrain/.../cifar10/example.yaml``; momentum 0.9).
SSL_WEIGHT_DECAY = 1e-4


def plain_sgd(recipe: TrainConfig, **settings: Any) -> TrainConfig:
    """The reference's optimiser: plain SGD with momentum 0.9 at a constant rate (``settings``:
    epochs, lr, batch size, weight decay...); the recipe lends the rest (augmentation, devices)."""
    return replace(recipe, momentum=0.9, nesterov=False, schedule="constant", norm_lr_scale=1.0, **settings)


class ProjectedEncoder(nn.Module):
    """A classifier's feature extractor with DBD's projection head (``SelfModel``, ``head="mlp"``:
    linear, batch norm, ReLU, linear to ``dim``); the output is L2-normalised."""

    def __init__(self, encoder: Classifier, dim: int = 128) -> None:
        super().__init__()
        width = encoder.num_features
        self.encoder = encoder
        self.head = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Linear(width, dim)
        )

    def init_from_data(self, x: Tensor) -> None:
        """The encoder's data-dependent initialisation, where it has one (airbench's whitening)."""
        if hasattr(self.encoder, "init_from_data"):
            self.encoder.init_from_data(x)

    def forward(self, x: Tensor) -> Tensor:
        pooled, _ = embedding(self.encoder, x)
        return F.normalize(self.head(pooled).float(), dim=1)


def simclr_loss(anchors: Tensor, others: Tensor, temperature: float) -> Tensor:
    """DBD's ``SimCLRLoss`` per anchor: the first views ``anchors`` (N, D, normalised) are the
    anchors; each one's positive is its own second view in ``others``, its negatives every other
    view of both (itself left out): ``-log softmax(a_i . z / T)`` at its positive."""
    n = len(anchors)
    logits = anchors @ torch.cat([anchors, others]).T / temperature
    logits = logits.masked_fill(torch.eye(n, 2 * n, dtype=torch.bool, device=logits.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(n, 2 * n, device=logits.device), reduction="none")


def ssl_views(x: Tensor, generator: torch.Generator, flip: bool) -> Tensor:
    """DBD's SimCLR augmentation (BackdoorBench ``get_transform_self``) on a float batch in [0, 1]:
    :func:`~backdoorlab.training.augment.contrastive_views` (resized crop at scale 0.2-1, flip,
    colour jitter 0.4/0.4/0.4/0.1 with probability 0.8, greyscale with probability 0.2), then a
    Gaussian blur of sigma uniform in [0.1, 2] with probability 0.5."""
    views = contrastive_views(x, generator, flip)
    n = len(views)
    blur = (torch.rand(n, generator=generator) < 0.5).to(views.device)
    sigmas = 0.1 + 1.9 * torch.rand(n, generator=generator)
    return torch.where(blur[:, None, None, None], gaussian_blur(views, sigmas), views)


@dataclass
class SimCLRStep:
    """SimCLR as a training step: two :func:`ssl_views` of the batch through a
    :class:`ProjectedEncoder`, :func:`simclr_loss` per sample. Its logits are a placeholder (the
    loop's training accuracy means nothing here)."""

    temperature: float
    flip: bool

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
        n = len(y)
        z = model(torch.cat([ssl_views(x, generator, self.flip), ssl_views(x, generator, self.flip)]))
        return torch.zeros(n, 1, device=x.device), simclr_loss(z[:n], z[n:], self.temperature)


def pretrain_simclr(  # noqa: PLR0913 - the stage's settings
    encoder: Classifier,
    data: TensorDataset,
    ctx: DefenseContext,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    temperature: float,
    projection_dim: int,
    seed: int,
    description: str,
) -> ProjectedEncoder:
    """SimCLR on ``data``'s images (labels unused) from ``encoder`` (trained in place): SGD with
    momentum 0.9 at the constant rate ``lr``, weight decay 1e-4, batches of ``batch_size`` (at most
    the set), the views of :func:`ssl_views` (flips where the recipe or the data allow them);
    returns the encoder with its projection head."""
    model = ProjectedEncoder(encoder, projection_dim)
    config = plain_sgd(
        without_augmentation(ctx.recipe),
        epochs=epochs,
        lr=lr,
        batch_size=min(batch_size, len(data)),
        weight_decay=SSL_WEIGHT_DECAY,
        regularizer=None,
        label_smoothing=0.0,
        lookahead_epoch=None,
        whiten_bias_epochs=None,
    )
    flip = data.hflip if ctx.recipe.flip is None else ctx.recipe.flip
    train(
        model,
        data,
        config,
        device=ctx.device,
        seed=seed,
        step=SimCLRStep(temperature, flip),
        description=description,
    )
    return model

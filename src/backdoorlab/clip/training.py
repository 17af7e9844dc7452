"""Contrastive training of image-text models, and the three cleaning objectives.

One loop (:func:`fit_clip`) runs every objective: plain CLIP training or fine-tuning, CleanCLIP, PAR.
AdamW with no weight decay on biases, norm parameters and the temperature (as open_clip, CleanCLIP
and PAR all do); bf16 autocast on CUDA; an observer can record CA and ASR every N steps (the
trade-off curves of docs/clip.md).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from backdoorlab.clip.augment import autoaugment, eda, par_augment
from backdoorlab.clip.losses import PAR_THRESHOLD, cleanclip_loss, clip_loss, par_loss
from backdoorlab.clip.models import ClipModel, evaluating
from backdoorlab.clip.pairs import ImageTextPairs
from backdoorlab.progress import make_progress
from backdoorlab.training.loop import _autocast, resolve_device, to_float


@dataclass
class ClipTrainConfig:
    """An AdamW run over image-text pairs.

    Attributes:
        epochs: passes over the pairs (a fraction allowed).
        batch_size, lr, weight_decay, betas, eps: AdamW's.
        warmup_steps: linear warm-up from 0 (schedule ``cosine``; CleanCLIP uses 50).
        schedule: ``cosine`` (warm-up, then cosine to 0; CleanCLIP's ``cosine_scheduler``) or ``par``
            (PAR's: linear from ``start_factor × lr`` down to ``lr`` over the first half of the steps,
            then cosine to ``final_lr``).
        amp: bf16 autocast on CUDA.
    """

    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 50
    schedule: str = "cosine"
    start_factor: float = 10.0
    final_lr: float = 1e-9
    amp: bool = True

    def learning_rate(self, step: int, steps: int) -> float:
        """The learning rate at ``step`` of ``steps``."""
        if self.schedule == "par":
            half = max(1, steps // 2)
            if step < half:
                start = self.start_factor * self.lr
                return start + (self.lr - start) * step / half
            progress = (step - half) / max(1, steps - half)
            return self.final_lr + 0.5 * (self.lr - self.final_lr) * (1 + math.cos(math.pi * progress))
        if self.schedule != "cosine":
            raise ValueError(f"unknown schedule '{self.schedule}'; valid: cosine, par")
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, steps - self.warmup_steps)
        return 0.5 * self.lr * (1 + math.cos(math.pi * progress))


Objective = Callable[[ClipModel, Tensor, list[str], torch.Generator], tuple[Tensor, dict[str, float]]]


def contrastive(
    model: ClipModel, images: Tensor, captions: list[str], _: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """Plain CLIP training (and the fine-tuning baseline): symmetric InfoNCE, no augmentation."""
    loss = clip_loss(model.encode_image(images), model.encode_text(captions), model.scale())
    return loss, {"clip": float(loss.detach())}


@dataclass
class CleanClip:
    """CleanCLIP's objective: L_CLIP + L_SS with AutoAugment images and EDA captions.

    ``variants`` EDA versions of each caption are drawn once and one is picked per step
    (reconstructed: bounds how many distinct strings a frozen text tower must encode).
    """

    clip_weight: float = 1.0
    inmodal_weight: float = 1.0
    variants: int = 8
    _pool: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def augmented_caption(self, text: str, generator: torch.Generator) -> str:
        if text not in self._pool:
            self._pool[text] = [eda(text, generator) for _ in range(self.variants)]
        return self._pool[text][int(torch.randint(self.variants, (1,), generator=generator))]

    def __call__(
        self, model: ClipModel, images: Tensor, captions: list[str], generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        image_aug = autoaugment(images, generator)
        text_aug = [self.augmented_caption(c, generator) for c in captions]
        return cleanclip_loss(
            model.encode_image(images),
            model.encode_text(captions),
            model.encode_image(image_aug),
            model.encode_text(text_aug),
            model.scale(),
            self.clip_weight,
            self.inmodal_weight,
        )


class PerturbAndRecover:
    """PAR's objective against a frozen copy of the model as it is now (the poisoned model)."""

    def __init__(self, model: ClipModel, threshold: float = PAR_THRESHOLD) -> None:
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.threshold = threshold

    def __call__(
        self, model: ClipModel, images: Tensor, captions: list[str], generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        x = par_augment(to_float(images), model.image_mean.cpu(), generator)
        with torch.no_grad():
            image_ref, text_ref = self.reference.encode_image(x), self.reference.encode_text(captions)
        scale = float(model.scale().detach())  # a constant, as the code's logit_scale.exp().item()
        return par_loss(model.encode_image(x), model.encode_text(captions), image_ref, text_ref, scale, self.threshold)


def parameter_groups(model: ClipModel, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on weight matrices and kernels only; none on biases, norms or the temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and "logit_scale" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def frozen_cache(model: ClipModel, pairs: ImageTextPairs, device: torch.device, chunk: int = 500) -> Tensor | None:
    """The frozen image features of every pair (on ``device``), for objectives without image
    augmentation; None for models without a frozen part."""
    with evaluating(model):
        parts = [model.frozen_features(pairs.images[i : i + chunk].to(device)) for i in range(0, len(pairs), chunk)]
    return None if parts[0] is None else torch.cat(parts)


Observer = Callable[[int, ClipModel], dict[str, float]]


def fit_clip(
    model: ClipModel,
    pairs: ImageTextPairs,
    config: ClipTrainConfig,
    objective: Objective = contrastive,
    *,
    device: str | torch.device | None = "cpu",
    seed: int = 0,
    every: int = 0,
    observer: Observer | None = None,
    description: str = "training",
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``pairs``; returns the observer's records (step 0, every
    ``every`` steps and the last step) with the loss terms of the latest step. ``seed`` seeds the
    batch order, the augmentations and the global generator (the image tower's dropout), so a run
    depends on its model, data and seed alone, not on what ran before it in the process."""
    device = resolve_device(device)
    model.to(device).train()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps
    )
    per_epoch = max(1, len(pairs) // config.batch_size)
    steps = max(1, round(config.epochs * per_epoch))
    records: list[dict[str, float]] = []

    def observe(step: int, parts: dict[str, float]) -> None:
        if observer is not None:
            records.append({"step": step, **parts, **observer(step, model)})
            model.train()

    observe(0, {})
    cache = frozen_cache(model, pairs, device) if objective is contrastive else None
    order = torch.empty(0, dtype=torch.int64)
    with make_progress() as progress:
        task = progress.add_task(description, total=steps, status="")
        for step in range(steps):
            if len(order) < config.batch_size:
                order = torch.cat([order, torch.randperm(len(pairs), generator=generator)])
            batch, order = order[: config.batch_size], order[config.batch_size :]
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate(step, steps)
            captions = [pairs.captions[i] for i in batch.tolist()]
            with _autocast(device, config.amp):
                if cache is not None:
                    loss = clip_loss(
                        model.encode_frozen(cache[batch.to(cache.device)]), model.encode_text(captions), model.scale()
                    )
                    parts = {"clip": float(loss.detach())}
                else:
                    loss, parts = objective(
                        model, pairs.images[batch].to(device, non_blocking=True), captions, generator
                    )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, math.log(100.0))
            progress.update(task, advance=1, status=f"loss {float(loss.detach()):.3f}")
            if every and (step + 1) % every == 0 and step + 1 < steps:
                observe(step + 1, parts)
        observe(steps, parts)
    return records

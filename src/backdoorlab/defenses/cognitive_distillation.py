"""Cognitive Distillation: the smallest part of an image that keeps the model's output; a trigger
is such a part, so a triggered image's mask is small."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import INPUT_DETECTORS, DefenseContext, InputDetector, require_images
from backdoorlab.defenses.post_training import frozen_copy
from backdoorlab.options import NonNegativeFloat, PositiveFloat, PositiveInt
from backdoorlab.training.loop import to_float


def total_variation(mask: Tensor) -> Tensor:
    """Per-image squared total variation, averaged over the mask's elements (the official form)."""
    b, c, h, w = mask.shape
    tv_h = (mask[:, :, 1:] - mask[:, :, :-1]).pow(2).sum((1, 2, 3))
    tv_w = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).pow(2).sum((1, 2, 3))
    return (tv_h + tv_w) / (c * h * w)


@INPUT_DETECTORS.register(
    "cognitive_distillation",
    "Cognitive Distillation (Huang et al. 2023): a small mask that keeps the output flags a trigger",
    modality="image",
)
class CognitiveDistillation(InputDetector):
    """For each image ``x``, learn a mask ``m`` (one channel, ``(tanh(w) + 1) / 2``, starting at
    ones) that keeps the model's logits while covering as little as possible:
    ``|f(x * m + (1 - m) * noise) - f(x)|_1 (mean over logits) + gamma |m|_1 + beta TV(m)``, the
    noise a random colour per image and channel drawn at every step, Adam lr 0.1, betas (0.1, 0.1),
    100 steps. A backdoored model needs only the trigger to give the target, so a triggered
    image's mask has a small L1 norm; the score is the negated norm (higher: more likely triggered).
    Source: Huang et al., "Distilling Cognitive Backdoor Patterns within an Image" (ICLR 2023),
    official code ``HanxunH/CognitiveDistillation`` (``detection/cognitive_distillation.py``; the
    defaults of its ``extract.py``: gamma 0.01, beta 1.0, p 1, 100 steps, step size 0.1, on the
    logits). The official analysis flags a mask more than one standard deviation below the clean
    masks' mean norm; here the threshold is the evaluation's (5% false positives on trusted data).

    Args:
        steps: optimisation steps per batch.
        lr: Adam's step size on the mask's parameters.
        gamma: the weight of the mask's L1 norm (the paper's alpha).
        beta: the weight of the mask's total variation.
        batch_size: images whose masks are learned together.
    """

    def __init__(
        self,
        steps: PositiveInt = 100,
        lr: PositiveFloat = 0.1,
        gamma: NonNegativeFloat = 0.01,
        beta: NonNegativeFloat = 1.0,
        batch_size: PositiveInt = 256,
    ) -> None:
        if steps < 1 or lr <= 0 or gamma < 0 or beta < 0 or batch_size < 1:
            raise ValueError("Cognitive Distillation needs steps, batch_size >= 1, lr > 0 and gamma, beta >= 0")
        self._options = {
            "steps": int(steps),
            "lr": float(lr),
            "gamma": float(gamma),
            "beta": float(beta),
            "batch_size": int(batch_size),
        }
        self.model: nn.Module | None = None

    def check_trusted(self, trusted: TensorDataset) -> None:
        require_images(trusted, "Cognitive Distillation")

    def fit(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> None:
        """Keep a frozen copy of ``model``; the method needs no clean data (the threshold does)."""
        require_images(trusted, "Cognitive Distillation")
        self.model, self.device = frozen_copy(model).to(ctx.device), ctx.device
        self.generator = torch.Generator().manual_seed(ctx.seed)

    def mask(self, images: Tensor) -> Tensor:
        """The distilled masks of a batch of float images in [0, 1]: ``(b, 1, h, w)``."""
        assert self.model is not None
        o, x = self._options, images.to(self.device)
        with torch.no_grad():
            target = self.model(x)
        weights = torch.ones(len(x), 1, *x.shape[2:], device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([weights], lr=o["lr"], betas=(0.1, 0.1))
        for _ in range(o["steps"]):
            m = (weights.tanh() + 1) / 2
            noise = torch.rand(len(x), x.shape[1], 1, 1, generator=self.generator).to(self.device)
            kept = (self.model(x * m + (1 - m) * noise) - target).abs().mean(1)
            loss = kept + o["gamma"] * m.abs().sum((1, 2, 3)) + o["beta"] * total_variation(m)
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            optimizer.step()
        return ((weights.detach().tanh() + 1) / 2).cpu()

    def score(self, inputs: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError("CognitiveDistillation.score before fit: fit it on the suspect model first")
        chunks = to_float(inputs).split(self._options["batch_size"])
        return torch.cat([-self.mask(chunk).sum((1, 2, 3)) for chunk in chunks])

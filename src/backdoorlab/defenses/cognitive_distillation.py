"""Cognitive Distillation: the smallest part of an input that keeps the model's output. A trigger
is such a part, so a triggered input's distilled mask is small."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import INPUT_DETECTORS, DefenseContext, InputDetector, require_images
from backdoorlab.defenses.post_training import frozen_copy
from backdoorlab.options import NonNegativeFloat, PositiveFloat, PositiveInt
from backdoorlab.training.loop import resolve_device, to_float

#: What the masked input must keep: the model's logits, or its last feature map (the official ``CD_FE``).
Target = Literal["logits", "features"]


def total_variation(mask: Tensor) -> Tensor:
    """Per-mask squared total variation over the mask's elements (the official
    ``total_variation_loss``): ``(sum dh^2 + sum dw^2) / (c * h * w)``."""
    c, h, w = mask.shape[1:]
    tv_h = (mask[:, :, 1:] - mask[:, :, :-1]).pow(2).sum((1, 2, 3))
    tv_w = (mask[:, :, :, 1:] - mask[:, :, :, :-1]).pow(2).sum((1, 2, 3))
    return (tv_h + tv_w) / (c * h * w)


def _output(model: nn.Module, x: Tensor, target: Target) -> Tensor:
    return model.forward_features(x) if target == "features" else model(x)


def distil(
    model: nn.Module,
    images: Tensor,
    generator: torch.Generator,
    *,
    steps: int = 100,
    lr: float = 0.1,
    gamma: float = 0.01,
    beta: float = 1.0,
    p: int = 1,
    mask_channels: int = 1,
    target: Target = "logits",
) -> Tensor:
    """The distilled masks ``(N, mask_channels, H, W)`` (on the CPU) of float ``images`` in [0, 1],
    all learned together as the official ``CognitiveDistillation.forward``: ``m = (tanh(w) + 1) / 2``
    from ``w = 1``, Adam (betas 0.1, 0.1) on the mean over the batch of
    ``mean|f(x * m + (1 - m) * noise) - f(x)| + gamma * ||m||_p + beta * TV(m)``, the noise one
    uniform colour per image and channel, drawn anew at every step (from ``generator``, on the CPU).
    ``model`` is put in eval mode, as the official code does; its parameters get no gradient."""
    model.eval()
    with torch.no_grad():
        reference = _output(model, images, target)
    weights = torch.ones(len(images), mask_channels, *images.shape[2:], device=images.device, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=lr, betas=(0.1, 0.1))
    for _ in range(steps):
        mask = (weights.tanh() + 1) / 2
        noise = torch.rand(len(images), images.shape[1], 1, 1, generator=generator).to(images.device)
        output = _output(model, images * mask + (1 - mask) * noise, target)
        kept = (output - reference).abs().flatten(1).mean(1)
        norm = torch.linalg.vector_norm(mask.flatten(1), ord=p, dim=1)
        loss = kept + gamma * norm + beta * total_variation(mask)
        (weights.grad,) = torch.autograd.grad(loss.mean(), weights)
        optimizer.step()
    return ((weights.detach().tanh() + 1) / 2).cpu()


@INPUT_DETECTORS.register(
    "cognitive_distillation",
    "Cognitive Distillation (Huang et al. 2023): a small mask that keeps the model's output flags a trigger",
    modality="image",
)
class CognitiveDistillation(InputDetector):
    """For each image ``x``, learn a mask ``m`` (values in [0, 1]) that keeps the model's logits
    while covering as little of the image as it can: minimise ``mean|f(x * m + (1 - m) * noise) -
    f(x)| + gamma * ||m||_p + beta * TV(m)`` (:func:`distil`; the noise a random colour per image
    and channel, drawn at every step). A backdoored model needs only the trigger to give the
    target, so a triggered image's mask is small; the score is the negated L1 norm of the mask
    (higher: more likely triggered), as the official analysis ranks (``1 - min-max(norm)``, the
    same order). Source: Huang, Ma, Erfani and Bailey, "Distilling Cognitive Backdoor Patterns
    within an Image" (ICLR 2023), official code ``HanxunH/CognitiveDistillation``
    (``detection/cognitive_distillation.py``; ``extract.py``'s defaults: lr 0.1, p 1, gamma 0.01 (the
    paper's alpha), beta 1, 100 steps, one mask channel, on the logits; ``target="features"`` is its
    ``CD_FE`` variant). BackdoorBench's ``detection_pretrain/cd.py`` is the same optimisation at
    ``config/detection/cd/cifar10.yaml``'s beta 10.

    Both codes score the *training* set; the paper also detects triggered *test* inputs, which is
    what this detector does. It learns nothing from the trusted split: that only calibrates the
    threshold, set by the evaluation at 5% false positives (``evaluation.assess_input_detector``).
    Each input costs ``steps`` forward and backward passes. Measurements: docs/detection.md.

    Args:
        steps: optimisation steps (all masks of a batch together).
        lr: Adam's step size on the mask's parameters.
        gamma: the weight of the mask's norm (the paper's alpha).
        beta: the weight of the mask's total variation.
        p: the norm of the mask in the objective (the score is always its L1 norm).
        mask_channels: 1 (one mask for all channels, the official default) or the image's channel count.
        target: what the masked image must keep: ``"logits"`` or ``"features"`` (the last feature map).
        batch_size: images whose masks are learned together.
    """

    def __init__(
        self,
        steps: PositiveInt = 100,
        lr: PositiveFloat = 0.1,
        gamma: NonNegativeFloat = 0.01,
        beta: NonNegativeFloat = 1.0,
        p: PositiveInt = 1,
        mask_channels: PositiveInt = 1,
        target: Target = "logits",
        batch_size: PositiveInt = 256,
    ) -> None:
        super().__init__()
        self.model: nn.Module | None = None

    def fit(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> None:
        """Keep a frozen copy of ``model``; the trusted inputs are not used (the threshold is the evaluation's)."""
        require_images(trusted, "Cognitive Distillation", "masks images")
        channels = trusted.inputs.shape[1]
        if self._options["mask_channels"] not in (1, channels):
            raise ValueError(
                f"Cognitive Distillation mask_channels must be 1 or the images' {channels} channels, "
                f"got {self._options['mask_channels']}"
            )
        if self._options["target"] == "features" and not hasattr(model, "forward_features"):
            raise ValueError(
                f"Cognitive Distillation target='features' needs a model with forward_features, not {type(model).__name__}"
            )
        self.device = resolve_device(ctx.device)
        # channels_last: 1.4x faster on this project's CPU (airbench, 1 thread), as predict_logits uses
        self.model = frozen_copy(model).to(self.device, memory_format=torch.channels_last)
        self.generator = torch.Generator().manual_seed(ctx.seed)

    def masks(self, inputs: Tensor) -> Tensor:
        """The distilled masks of ``inputs`` (uint8 or float images), ``(N, mask_channels, H, W)``."""
        if self.model is None:
            raise RuntimeError("CognitiveDistillation.score before fit: fit it on the suspect model first")
        if inputs.dim() != 4:
            raise ValueError(f"Cognitive Distillation scores images (N, C, H, W), got shape {tuple(inputs.shape)}")
        o = {k: v for k, v in self._options.items() if k != "batch_size"}
        masks = []
        for chunk in inputs.split(self._options["batch_size"]):
            x = to_float(chunk.to(self.device)).contiguous(memory_format=torch.channels_last)
            masks.append(distil(self.model, x, self.generator, **o))
        return torch.cat(masks)

    def score(self, inputs: Tensor) -> Tensor:
        return -self.masks(inputs).flatten(1).sum(1)

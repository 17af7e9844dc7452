"""Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS
2020; official code ``VinAIResearch/input-aware-backdoor-attack-release``; BackdoorBench
``attack/inputaware.py`` with ``config/attack/inputaware/default.yaml``).

Each image gets its own trigger: a pattern generator ``G`` and a mask generator ``M`` (encoder-
decoder networks) read the image, and the triggered image is ``x + (G(x) - x) * m(x)`` with
``m = tanh(20 M(x) - 10) / (2 + eps) + 0.5`` (a near-binary mask). First ``M`` is trained alone on
clean images: a diversity loss (different images, different masks) and a mask-norm loss that keeps
the mask's mean density under ``mask_density``. Then ``G`` trains jointly with the victim: in each
batch ``p_attack`` of the samples get their own trigger and the target label, ``p_cross`` get
another image's trigger and keep their label (cross-trigger samples: a trigger works only on its
own image), and a diversity loss ``lambda_div`` keeps ``G``'s patterns as different as the images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.attacks.controlled import (
    AttackStep,
    PerSampleLoss,
    TrainingControlledTrigger,
    batch_count,
    batch_rate,
    data_normalization,
)
from backdoorlab.attacks.poisoning import PoisonSpec
from backdoorlab.attacks.triggers import ATTACKS
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.options import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt

#: The reference's ``EPSILON`` (config ``EPSILON: 1e-7``), in the tanh scalings and the diversity ratio.
EPSILON = 1e-7
#: Inference chunk of the frozen generators (their activations at 32 px, width 32, stay small).
CHUNK = 512


def threshold(raw: Tensor) -> Tensor:
    """The mask from ``M``'s raw output: ``tanh(20 x - 10) / (2 + eps) + 0.5`` (the reference's
    ``Threshold``), near 0 below 0.5 and near 1 above."""
    return torch.tanh(raw * 20 - 10) / (2 + EPSILON) + 0.5


def diversity_loss(inputs1: Tensor, inputs2: Tensor, outputs1: Tensor, outputs2: Tensor) -> Tensor:
    """The reference's diversity loss: the mean over pairs of ``||x1 - x2|| / (||g(x1) - g(x2)|| + eps)``,
    each norm the root of the mean squared difference per sample (``MSELoss(reduction="none")``,
    mean over C, H, W, square root). The mean squares are clamped at 1e-12 before the root: equal
    outputs (saturated masks) would otherwise give an infinite derivative times zero, NaN weights
    (a guard the reference lacks; the value is the reference's wherever it is finite)."""
    images = (inputs1 - inputs2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12).sqrt()
    outputs = (outputs1 - outputs2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12).sqrt()
    return (images / (outputs + EPSILON)).mean()


def mask_norm_loss(masks: Tensor, density: float) -> Tensor:
    """``mean(relu(m - mask_density))``: the part of the mask above the allowed density."""
    return F.relu(masks - density).mean()


def _block(c_in: int, c_out: int, relu: bool = True) -> nn.Sequential:
    """The reference's ``Conv2dBlock``: 3x3 convolution, batch norm (eps 1e-5, momentum 0.05), ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class EncoderDecoder(nn.Module):
    """The reference's ``InputAwareGenerator`` body (no skip connections): ``depth`` times two
    3x3 blocks and a 2x2 max-pool, channels ``channels``, doubling; a middle block; then
    ``depth`` times a bilinear upsampling and two blocks, halving, the last with ``out_channels``
    and no ReLU. The reference uses ``channels=16, depth=2`` for MNIST and ``32, 3`` otherwise.
    Reconstructed: upsampling goes back to each level's exact size (the reference's
    ``scale_factor=2``, the same wherever the side divides by ``2**depth``), so any image size works."""

    def __init__(self, in_channels: int, out_channels: int, channels: int, depth: int) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        current, following = in_channels, channels
        for step in range(depth):
            self.down.append(nn.Sequential(_block(current, following), _block(following, following)))
            if step < depth - 1:
                current, following = following, following * 2
        self.middle = _block(following, following)
        current, following = following, following // 2
        self.up = nn.ModuleList()
        for step in range(depth):
            last = step == depth - 1
            self.up.append(nn.Sequential(_block(current, current), _block(current, following, relu=not last)))
            current, following = following, following // 2
            if step == depth - 2:
                following = out_channels

    def forward(self, x: Tensor) -> Tensor:
        sizes = []
        for blocks in self.down:
            x = blocks(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for blocks, size in zip(self.up, reversed(sizes), strict=True):
            x = blocks(F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False))
        return x


class InputAwareStep(AttackStep):
    """The joint training of the pattern generator with the victim (the reference's ``train_step``):
    per batch, ``int(rate * B)`` samples (BackdoorBench's ``generalize_to_lower_pratio`` below one)
    get their own trigger and the target label, ``cross_ratio`` times as many the next ones get
    another image's trigger and keep their label; the loss is the batch's cross-entropy (the run's
    per-sample loss) plus ``lambda_div`` times the diversity loss of the patterns. Adam on ``G``
    after each of the victim's optimiser steps; its multi-step schedule after each epoch."""

    def __init__(self, attack: InputAware, spec: PoisonSpec, rate: float, num_classes: int) -> None:
        self.attack, self.spec, self.rate, self.num_classes = attack, spec, rate, num_classes
        assert attack.pattern_net is not None
        pattern_net = attack.pattern_net
        self.optimizer = torch.optim.Adam(pattern_net.parameters(), attack.generator_lr, betas=(0.5, 0.9))
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, list(attack.generator_milestones), attack.milestone_gamma
        )

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
        attack = self.attack
        size = len(x)
        num_bd = batch_count(self.rate, size, generator)
        num_cross = min(size - num_bd, int(attack.cross_ratio * num_bd)) if size > 1 else 0
        if num_bd + num_cross == 0:
            logits = model(x)
            return logits, loss_fn(logits.float(), y, indices, epoch)
        # the second batch of the reference (another shuffled loader): this batch rolled by a random
        # offset, so no image is paired with itself
        shift = int(torch.randint(1, size, (), generator=generator)) if size > 1 else 0
        x2 = x.roll(shift, 0)
        bd, cross = slice(0, num_bd), slice(num_bd, num_bd + num_cross)
        norm1, norm2 = attack.normalize(x[bd]), attack.normalize(x2[cross])
        patterns1 = attack.patterns(norm1)
        patterns2 = attack.patterns(norm2)
        with torch.no_grad():
            masks1, masks2 = attack.masks(norm1), attack.masks(norm2)
        triggered = x[bd] + (patterns1 - x[bd]) * masks1
        crossed = x[cross] + (patterns2 - x[cross]) * masks2
        inputs = torch.cat([triggered.to(x.dtype), crossed.to(x.dtype), x[num_bd + num_cross :]])
        targets = torch.cat([self.spec.target_labels(y[bd], self.num_classes), y[num_bd:]])
        logits = model(inputs)
        losses = loss_fn(logits.float(), targets, indices, epoch)
        pairs = min(num_bd, num_cross)
        if pairs and attack.lambda_div:
            # the reference pairs inputs1[:num_bd] with inputs2[num_bd:2 num_bd], both normalised
            others = attack.normalize(x2[num_bd : num_bd + pairs])
            loss_div = diversity_loss(
                norm1[:pairs].float(),
                others.float(),
                attack.normalize(patterns1[:pairs]).float(),
                attack.normalize(patterns2[:pairs]).float(),
            )
            losses = losses + attack.lambda_div * loss_div  # the batch mean gains lambda_div * loss_div
        return logits, losses

    def after_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_epoch(self, epoch: int) -> None:
        self.scheduler.step()


@ATTACKS.register(
    "input_aware",
    "Input-aware dynamic (Nguyen & Tran 2020): per-image triggers from a generator trained with the victim",
)
class InputAware(TrainingControlledTrigger):
    """Input-aware dynamic backdoor: a training-controlled attack (``attacks.controlled``).

    Source: Nguyen & Tran, NeurIPS 2020; official ``VinAIResearch/input-aware-backdoor-attack-release``
    (``train.py``, ``networks/models.py``, ``config.py``); BackdoorBench ``attack/inputaware.py``
    and ``config/attack/inputaware/default.yaml``, whose values are the defaults (``lr_G``, ``lr_M``,
    the milestones, ``lambda_div``, ``lambda_norm``, ``mask_density``, ``clean_train_epochs`` as
    ``mask_epochs``; ``num_cross = num_bd`` as ``cross_ratio`` 1). The victim's optimiser and
    augmentation are the run's recipe's, as every victim's here.

    After training both generators are frozen (eval mode) and the object is a pure trigger: it
    makes the triggered test set and the fixed poisoned training set that defenses get.

    Reconstructed (docs/attacks.md, "Input-aware"): generator size by image size, not dataset name;
    the second shuffled loader is the batch rolled; the mask generator trains without augmentation.

    Args:
        lambda_div: weight of the diversity loss (both generators).
        lambda_norm: weight of the mask-norm loss.
        mask_density: the mask's allowed mean density.
        cross_ratio: cross-trigger samples per poisoned sample in each batch (``p_cross / p_attack``).
        generator_lr: Adam learning rate of the pattern generator ``G``.
        mask_lr: Adam learning rate of the mask generator ``M``.
        mask_epochs: epochs of the mask generator's training before the victim's.
        generator_milestones: epochs of the victim's training at which ``G``'s rate is multiplied
            by ``milestone_gamma``.
        mask_milestones: epochs of its training at which ``M``'s rate is multiplied by ``milestone_gamma``.
        milestone_gamma: the factor of both multi-step schedules.
        channels: the generators' first width (default by image size, above).
        depth: the generators' number of down-sampling steps, at least 2 (default by image size).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        lambda_div: NonNegativeFloat = 1.0,
        lambda_norm: NonNegativeFloat = 100.0,
        mask_density: Fraction = 0.032,
        cross_ratio: NonNegativeFloat = 1.0,
        generator_lr: PositiveFloat = 0.01,
        mask_lr: PositiveFloat = 0.01,
        mask_epochs: PositiveInt = 25,
        generator_milestones: tuple[PositiveInt, ...] = (200, 300, 400, 500),
        mask_milestones: tuple[PositiveInt, ...] = (10, 20),
        milestone_gamma: Fraction = 0.1,
        channels: PositiveInt | None = None,
        depth: PositiveInt | None = None,
    ) -> None:
        super().__init__(input_shape)
        c, h, w = self.input_shape
        large = min(h, w) >= 32
        channels = channels if channels is not None else (32 if large else 16)
        depth = depth if depth is not None else (3 if large else 2)
        if depth < 2 or min(h, w) < 2**depth:
            raise ValueError(
                f"input_aware's generators need depth >= 2 and images of at least 2**depth px, got depth {depth} for {h}x{w}"
            )
        self.lambda_div, self.lambda_norm, self.mask_density = lambda_div, lambda_norm, mask_density
        self.cross_ratio = float(cross_ratio)
        self.generator_lr, self.mask_lr, self.mask_epochs = generator_lr, mask_lr, mask_epochs
        self.generator_milestones, self.mask_milestones = tuple(generator_milestones), tuple(mask_milestones)
        self.milestone_gamma, self.channels, self.depth = milestone_gamma, channels, depth
        self.pattern_net: EncoderDecoder | None = None
        self.mask_net: EncoderDecoder | None = None
        self.mean = torch.zeros(c, 1, 1)
        self.std = torch.ones(c, 1, 1)
        self._resolve_options(channels=channels, depth=depth)

    # -- the generators --------------------------------------------------------------------------

    def normalize(self, x: Tensor) -> Tensor:
        """Images (or patterns) in [0, 1] normalised by the data's mean and std."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def patterns(self, normalized: Tensor) -> Tensor:
        """``G``'s patterns in [0, 1] for normalised images: ``tanh(G(x)) / (2 + eps) + 0.5``."""
        assert self.pattern_net is not None
        return torch.tanh(self.pattern_net(normalized)) / (2 + EPSILON) + 0.5

    def masks(self, normalized: Tensor) -> Tensor:
        """``M``'s thresholded one-channel masks for normalised images."""
        assert self.mask_net is not None
        return threshold(self.mask_net(normalized))

    def build(self, data: TensorDataset, generator: torch.Generator) -> None:
        """Fresh generators for ``data``'s channels and normalisation, initialised from ``generator``."""
        c = self.input_shape[0]
        self.mean, self.std = data_normalization(data)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
            self.pattern_net = EncoderDecoder(c, c, self.channels, self.depth)
            self.mask_net = EncoderDecoder(c, 1, self.channels, self.depth)

    def train_masks(
        self, data: TensorDataset, batch_size: int, device: torch.device, generator: torch.Generator
    ) -> list[float]:
        """The reference's ``train_mask_step`` for ``mask_epochs`` epochs: pairs of images from two
        shuffles of ``data``, the diversity loss of their masks and the norm loss of the first's;
        returns each epoch's mean loss. ``M`` is frozen afterwards."""
        assert self.mask_net is not None
        net = self.mask_net.to(device).train()
        optimizer = torch.optim.Adam(net.parameters(), self.mask_lr, betas=(0.5, 0.9))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(self.mask_milestones), self.milestone_gamma)
        images = data.inputs.to(device)
        history = []
        for _ in range(self.mask_epochs):
            first = torch.randperm(len(images), generator=generator).to(device)
            second = torch.randperm(len(images), generator=generator).to(device)
            total, batches = 0.0, 0
            for one, two in zip(first.split(batch_size), second.split(batch_size), strict=True):
                x1 = self.normalize(images[one].float() / 255)
                x2 = self.normalize(images[two].float() / 255)
                masks1, masks2 = self.masks(x1), self.masks(x2)
                loss_div = self.lambda_div * diversity_loss(x1, x2, masks1, masks2)
                loss = self.lambda_norm * mask_norm_loss(masks1, self.mask_density) + self.lambda_div * loss_div
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, batches = total + float(loss.detach()), batches + 1
            scheduler.step()
            history.append(total / max(1, batches))
        net.eval().requires_grad_(False)
        return history

    # -- the training-controlled protocol --------------------------------------------------------

    def begin(
        self,
        data: TensorDataset,
        spec: PoisonSpec,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        epochs: int | None = None,
    ) -> InputAwareStep:
        self.check_spec(spec)
        self.build(data, generator)
        self.mask_history = self.train_masks(data, batch_size, device, generator)
        assert self.pattern_net is not None
        self.pattern_net.to(device).train()
        return InputAwareStep(self, spec, batch_rate(spec, len(data)), data.num_classes)

    def end(self) -> None:
        assert self.pattern_net is not None and self.mask_net is not None
        for net in (self.pattern_net, self.mask_net):  # they stay on the training device
            net.eval().requires_grad_(False)
        super().end()

    # -- the frozen trigger ----------------------------------------------------------------------

    def _trigger(self, x: Tensor, sources: Tensor) -> Tensor:
        """``x + (G(s) - x) * m(s)`` with the patterns and masks of ``sources``, computed in chunks
        on the generators' device (where they trained: a GPU triggers a data set in seconds) and
        returned on ``x``'s."""
        self._require_trained()
        assert self.pattern_net is not None and self.mask_net is not None
        device = next(self.pattern_net.parameters()).device
        out = []
        with torch.no_grad():
            for xs, ss in zip(x.split(CHUNK), sources.split(CHUNK), strict=True):
                xs, normalized = xs.to(device), self.normalize(ss.to(device))
                out.append((xs + (self.patterns(normalized) - xs) * self.masks(normalized)).to(x.device))
        return torch.cat(out) if out else x.clone()

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self._trigger(x, x)

    def cross(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cross-trigger samples: each image with the trigger of another of ``images`` (rolled by a
        random offset); they keep their labels."""
        x = images.float().div(255.0)
        shift = int(torch.randint(1, len(x), (), generator=generator)) if len(x) > 1 else 0
        out = self._trigger(x, x.roll(shift, 0))
        return out.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)

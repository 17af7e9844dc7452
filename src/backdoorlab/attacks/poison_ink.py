"""Poison Ink: an image's own edges, coloured, hidden in it by a trained network (Zhang, Chen, Huang,
Liao, Zhang, Feng, Hua, Yu, "Poison Ink: Robust and Invisible Backdoor Attack", IEEE TIP 31, 2022;
official ``ZJZAC/Poison-Ink``; BackdoorBench ``attack/poison_ink.py`` with
``config/attack/poison_ink/default.yaml``, all-to-one, target 0, rate 0.1, whose poisoned images
come from ``resource/poison_ink/``, which this follows).

The trigger of an image is its edge structure drawn in one colour ("ink"): the Sobel edges of its
luminance, thresholded (skimage 0.18's ``filters.sobel`` > 28, :func:`sobel`), coloured (80, 160,
80), on a white ground. A hiding network ``H`` (``models/up_UNet.py``'s U-Net) takes the image and
its ink image and returns the poisoned image, which should look like the image; a reveal network
``R`` (``models/HidingRes.py``) learns to read the ink back. BackdoorBench's pipeline
(``resource/poison_ink/readme.md``): train both on the clean training images (``train.py``: its
loss weights, Adam lr 2e-4, batch 32, ink colours drawn per image; stages ``--rot``, ``--crop``,
``--flip``, without the adversarial ``--adv``), then hide every image's ink
(``trigger_generation.py``). No trained network can be downloaded, so :meth:`PoisonInk.fit` trains
them on the attacker's clean training images (never the test set) and caches them
(:func:`backdoorlab.data.cache.fitted_on_images`) keyed by those images, the options, the device
and the torch version, as SSBA does. The parts, loss and stages in full: docs/attacks.md, "Poison Ink".

Defaults, scaled to a CPU (reference values in brackets): ``steps`` 600 [3 stages x 200 epochs of
50,000 / 32 batches: 937,800], the three stages equal, the learning-rate step at 80/200 of each;
``images`` 5,000 [the whole training set]; ``hiding_width`` 16 [64] and ``reveal_width`` 32 [128];
the rest as the reference. Reconstructed:
- the widths, for a CPU (the reference's networks take ten times as long a step);
- any size (``H`` pads to a multiple of 16 px, ``R`` of 2) and channel count (grey images are their
  own luminance, with the colour's luminance as ink); the crop keeps 7/8 of each side;
- weights, batches, colours, crops and flips drawn from ``seed``, not the run's seed, so the
  networks depend on the attacker's images and the options only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.attacks.padding import crop, pad_to_multiple
from backdoorlab.attacks.ssba import psnr
from backdoorlab.attacks.triggers import ATTACKS, Trigger
from backdoorlab.data.cache import fitted_on_images
from backdoorlab.options import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from backdoorlab.progress import log, make_progress

#: ``H`` halves the side four times: inputs are padded to this.
STRIDE = 16
#: Images hidden per forward pass when triggering.
CHUNK = 512
#: Luminance weights of the reference's grey conversion (ITU-R 601).
LUMA = (0.299, 0.587, 0.114)
#: The ink colours training draws each channel from (``ZJ_Dataset_cifar.py``: ``randint(1, 5) * 40``).
TRAINING_LEVELS = (40, 80, 120, 160, 200)
#: The crop stage's kept share of each side (28 of 32 px).
CROP_SHARE = 28 / 32
#: The learning rate's step within a stage (``StepLR(step_size=80)`` of 200 epochs), and its factor.
DECAY_AT, DECAY = 80 / 200, 0.1
#: The reference's loss scale (every MSE term is multiplied by it).
LOSS_SCALE = 10_000.0
#: The three stages of the readme, in order: the transform the reveal network sees.
STAGES = ("rot", "crop", "flip")
#: Bumped when the networks or the trainer change, so cached networks of an older version are not reused.
CACHE_VERSION = 1


def luminance(x: Tensor) -> Tensor:
    """``(N, 1, H, W)``: ``0.299 R + 0.587 G + 0.114 B`` of RGB images, a grey image itself."""
    if x.shape[1] == 3:
        weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def sobel(gray: Tensor) -> Tensor:
    """skimage 0.18's ``filters.sobel`` of ``(N, 1, H, W)``: ``sqrt((G_h^2 + G_v^2) / 2)``, each the
    ``[1, 2, 1] / 4`` smoothing across the ``[1, 0, -1]`` difference, the image's border reflected
    (scipy's ``reflect``: the edge pixel repeated), and the result's one-pixel border set to 0 (what
    0.18.1, the version BackdoorBench's ``sh/install.sh`` pins, does without a mask; 0.19 on keep it)."""
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=gray.dtype, device=gray.device) / 4
    diff = torch.tensor([1.0, 0.0, -1.0], dtype=gray.dtype, device=gray.device)
    kernels = torch.stack([torch.outer(diff, smooth), torch.outer(smooth, diff)])[:, None]
    grads = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = grads.square().sum(1, keepdim=True).div(2).sqrt()
    return F.pad(magnitude[..., 1:-1, 1:-1], (1, 1, 1, 1))


def edge_mask(x: Tensor, threshold: float) -> Tensor:
    """``(N, 1, H, W)`` 0/1: where the Sobel magnitude of ``x``'s luminance, in 0-255 units, exceeds
    ``threshold`` (the reference's ``filters.sobel(gray) > 28``)."""
    return (sobel(luminance(x) * 255.0) > threshold).to(x.dtype)


def ink(mask: Tensor, colour: Tensor) -> Tensor:
    """The ink image ``c M + 1 (1 - M)``: ``colour`` ``(N, C)`` in [0, 1] on the mask, white elsewhere."""
    return colour[:, :, None, None] * mask + (1 - mask)


def colour_for(colour: tuple[int, ...], channels: int) -> Tensor:
    """The hiding colour in [0, 1] for ``channels``: as given for RGB, its luminance for grey."""
    value = torch.tensor(colour, dtype=torch.float32) / 255.0
    if channels == 3:
        return value
    return (value * torch.tensor(LUMA)).sum().expand(channels).clone()


class DoubleConv(nn.Module):
    """``up_UNet.py``'s ``DoubleConv``: (3x3 convolution, batch norm, ReLU) twice."""

    def __init__(self, c_in: int, c_out: int, c_mid: int | None = None) -> None:
        super().__init__()
        c_mid = c_mid or c_out
        self.block = nn.Sequential(
            nn.Conv2d(c_in, c_mid, 3, padding=1),
            nn.BatchNorm2d(c_mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_mid, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class _Up(nn.Module):
    """``up_UNet.py``'s ``Up`` (bilinear): upsample x2 (corners aligned), concatenate the skip, a
    :class:`DoubleConv` with half the input channels in the middle."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = DoubleConv(c_in, c_out, c_in // 2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class HidingUNet(nn.Module):
    """``H``: ``up_UNet.py``'s ``UNet(n_channels=2C, n_classes=C)`` (bilinear) at first-level
    width ``width`` (the reference's 64): the image and its ink image in, the hidden image out
    (unbounded; clamp it). Any size: padded to a multiple of 16 px and cropped back."""

    def __init__(self, channels: int, width: int = 64) -> None:
        super().__init__()
        w = width
        self.inc = DoubleConv(2 * channels, w)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(c_in, c_out))
            for c_in, c_out in ((w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w), (8 * w, 8 * w))
        )
        self.ups = nn.ModuleList(
            _Up(c_in, c_out) for c_in, c_out in ((16 * w, 4 * w), (8 * w, 2 * w), (4 * w, w), (2 * w, w))
        )
        self.outc = nn.Conv2d(w, channels, 1)

    def forward(self, image: Tensor, watermark: Tensor) -> Tensor:
        x, box = pad_to_multiple(torch.cat([image, watermark], dim=1), STRIDE)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return crop(self.outc(y), box)


class _ResidualBlock(nn.Module):
    """``HidingRes.py``'s ``ResidualBlock``: two dilated 3x3 convolutions with instance norm, ``relu(x + y)``."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, dilation, dilation, bias=False)
        self.norm1 = nn.InstanceNorm2d(channels, affine=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, dilation, dilation, bias=False)
        self.norm2 = nn.InstanceNorm2d(channels, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(y)))


class RevealRes(nn.Module):
    """``R``: ``HidingRes.py``'s ``HidingRes(in_c=C, out_c=C)`` at ``width`` channels (the
    reference's 128): the ink image read back out of a hidden image. Any size: padded to a
    multiple of 2 px and cropped back."""

    def __init__(self, channels: int, width: int = 128) -> None:
        super().__init__()
        w = width

        def norm() -> nn.InstanceNorm2d:
            return nn.InstanceNorm2d(w, affine=True)

        self.head = nn.ModuleList([nn.Conv2d(channels, w, 3, 1, 1, bias=False), nn.Conv2d(w, w, 3, 1, 1, bias=False)])
        self.head.append(nn.Conv2d(w, w, 3, 2, 1, bias=False))
        self.head_norms = nn.ModuleList([norm(), norm(), norm()])
        self.blocks = nn.Sequential(*(_ResidualBlock(w, d) for d in (2, 2, 2, 4, 4, 4, 1)))
        self.deconv3, self.norm4 = nn.ConvTranspose2d(w, w, 4, 2, 1), norm()
        self.deconv2, self.norm5 = nn.Conv2d(w, w, 3, 1, 1), norm()
        self.deconv1 = nn.Conv2d(w, channels, 1)
        for module in self.modules():  # train.py's weights_init on R: convolutions from N(0, 0.02)
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, image: Tensor) -> Tensor:
        y, box = pad_to_multiple(image, 2)
        for conv, norm in zip(self.head, self.head_norms, strict=True):
            y = F.relu(norm(conv(y)))
        y = self.blocks(y)
        y = F.relu(self.norm4(self.deconv3(y)))
        y = F.relu(self.norm5(self.deconv2(y)))
        return crop(F.relu(self.deconv1(y)), box)


def poison_ink_loss(
    hidden: Tensor,
    clean: Tensor,
    revealed: Tensor,
    revealed_clean: Tensor,
    watermark: Tensor,
    mask: Tensor,
    edge_weight: float = 13.0,
    clean_weight: float = 100.0,
    reveal_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``train.py``'s loss ``errH + beta errR`` (module docstring) and its two terms: ``hidden``
    ``H(x, W)`` against ``clean`` ``x``; ``revealed`` ``R(T(H))`` against the ink ``watermark``
    ``W'`` of ``T(x)`` on and off its ``mask`` ``M'``; ``revealed_clean`` ``R(T(x))`` against white.
    Each MSE is a mean over all elements, times 10,000."""
    err_h = LOSS_SCALE * F.mse_loss(hidden, clean)
    mask = mask.expand_as(watermark)
    err_edge = LOSS_SCALE * F.mse_loss(revealed * mask, watermark * mask)
    err_back = LOSS_SCALE * F.mse_loss(revealed * (1 - mask), watermark * (1 - mask))
    err_clean = LOSS_SCALE * F.mse_loss(revealed_clean, torch.ones_like(revealed_clean))
    err_r = edge_weight * err_edge + err_back + clean_weight * err_clean
    return err_h + reveal_weight * err_r, err_h, err_r


def stage_transform(stage: str, images: list[Tensor], rng: torch.Generator) -> list[Tensor]:
    """The stage's transform ``T``, one draw for the whole batch as ``train.py``: ``rot`` the
    identity (its dataset's rotation is 0 degrees), ``crop`` half the time 7/8 of each side at one
    random place resized back bilinearly, ``flip`` half the time mirrored left-right."""
    if stage == "crop" and torch.rand((), generator=rng) < 0.5:
        h, w = images[0].shape[-2:]
        ch, cw = max(1, round(h * CROP_SHARE)), max(1, round(w * CROP_SHARE))
        top = int(torch.randint(0, h - ch + 1, (), generator=rng))
        left = int(torch.randint(0, w - cw + 1, (), generator=rng))
        return [
            F.interpolate(x[..., top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False)
            for x in images
        ]
    if stage == "flip" and torch.rand((), generator=rng) < 0.5:
        return [x.flip(-1) for x in images]
    return images


def residual_report(clean: Tensor, hidden: Tensor, threshold: float) -> dict[str, float]:
    """PSNR (dB) of ``hidden`` against ``clean`` (both ``(N, C, H, W)`` in [0, 1]) and the mean
    absolute change in 0-255 levels on the clean images' edge pixels and on the rest."""
    mask = edge_mask(clean, threshold).expand_as(clean).bool()
    change = (hidden - clean).abs() * 255
    on, off = change[mask], change[~mask]
    return {
        "psnr": psnr(hidden, clean),
        "change_edges": float(on.mean()) if len(on) else 0.0,
        "change_flat": float(off.mean()) if len(off) else 0.0,
    }


@ATTACKS.register("poison_ink", "Poison Ink (Zhang et al. 2022): coloured edges hidden by a trained network")
class PoisonInk(Trigger):
    """Replace each image by the hiding network's image with its own coloured edges hidden in it
    (module docstring; the networks are trained on the attacker's clean images by :meth:`fit`).

    Args:
        steps: training steps of ``H`` and ``R`` (each a batch), split equally into the three stages.
        batch_size: images per step.
        images: at most this many of the attacker's clean training images are trained on.
        lr: Adam's learning rate (x0.1 at 40% and 80% of each stage).
        hiding_width: channels of ``H``'s first level (doubling to 8x at its bottom).
        reveal_width: channels of ``R``.
        edge_threshold: the Sobel magnitude (0-255 units) above which a pixel is an edge.
        colour: the ink's RGB colour (0-255) when hiding (grey images: its luminance).
        edge_weight: ``betaedge``, the reveal loss's weight on edge pixels.
        clean_weight: ``betaclean``, the weight of ``R`` reading white from clean images.
        reveal_weight: ``beta``, the reveal loss's weight against the hiding loss.
        seed: draws the networks' weights, the batches, the training colours, crops and flips.
    """

    needs_images = True

    def __init__(
        self,
        input_shape: tuple[int, ...],
        steps: PositiveInt = 600,
        batch_size: PositiveInt = 32,
        images: PositiveInt = 5000,
        lr: PositiveFloat = 2e-4,
        hiding_width: PositiveInt = 16,
        reveal_width: PositiveInt = 32,
        edge_threshold: NonNegativeFloat = 28.0,
        colour: tuple[NonNegativeInt, ...] = (80, 160, 80),
        edge_weight: NonNegativeFloat = 13.0,
        clean_weight: NonNegativeFloat = 100.0,
        reveal_weight: NonNegativeFloat = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(input_shape)
        if len(colour) != 3 or max(colour) > 255:
            raise ValueError(f"colour is an RGB triple of 0-255 levels, got {tuple(colour)}")
        self.steps, self.batch_size, self.images = int(steps), int(batch_size), int(images)
        self.lr, self.hiding_width, self.reveal_width = float(lr), int(hiding_width), int(reveal_width)
        self.edge_threshold, self.colour = float(edge_threshold), tuple(int(c) for c in colour)
        self.edge_weight, self.clean_weight = float(edge_weight), float(clean_weight)
        self.reveal_weight, self.seed = float(reveal_weight), int(seed)
        self.hiding: HidingUNet | None = None
        self.reveal: RevealRes | None = None
        #: What the last :meth:`fit` measured on its images: PSNR, the mean change on edge and flat
        #: pixels (0-255 levels), the reveal error on edges, whether trained.
        self.fit_report: dict[str, float] = {}

    def networks(self) -> tuple[HidingUNet, RevealRes]:
        """Fresh ``H`` and ``R`` for the images' shape, their weights drawn from ``seed``."""
        channels = self.input_shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return HidingUNet(channels, self.hiding_width), RevealRes(channels, self.reveal_width)

    def fit(
        self,
        surrogate: nn.Module | None = None,
        generator: torch.Generator | None = None,
        *,
        images: Tensor | None = None,
        target: int = 0,
    ) -> None:
        """Train ``H`` and ``R`` on the attacker's clean ``images`` (uint8 ``(N, C, H, W)``, on the
        device to train on; at most ``images`` of them, chosen by ``seed``), or load them from the
        cache. ``surrogate``, ``generator`` and ``target`` are not used."""

        chosen, (self.hiding, self.reveal), trained = fitted_on_images(
            "poison_ink",
            CACHE_VERSION,
            self.config(),
            images,
            self.images,
            self.seed,
            self._train,
            self.networks,
            ("hiding", "reveal"),
            input_shape=self.input_shape,
            what="its networks",
        )
        self.fitted = True
        x = chosen[:CHUNK].float() / 255.0
        hidden = (self._hide(x).clamp(0, 1) * 255).round() / 255
        self.fit_report = {**residual_report(x, hidden, self.edge_threshold), "trained": float(trained)}
        mask = edge_mask(x, self.edge_threshold)
        with torch.no_grad():
            revealed = self.reveal.to(x.device)(hidden)
        watermark = ink(mask, self._colour(len(x), x.device))
        on_edges = (revealed - watermark).abs().mul(mask).sum() / mask.expand_as(watermark).sum().clamp(min=1)
        self.fit_report["reveal_error_edges"] = float(on_edges) * 255
        log.info(
            "poison_ink networks (%s): PSNR %.1f dB, mean change %.2f levels on edges, %.2f on flat pixels, on %d images",
            "trained" if trained else "from the cache",
            self.fit_report["psnr"],
            self.fit_report["change_edges"],
            self.fit_report["change_flat"],
            len(x),
        )

    def _colour(self, count: int, device: torch.device) -> Tensor:
        return colour_for(self.colour, self.input_shape[0]).to(device).expand(count, -1)

    def _train(self, images: Tensor) -> tuple[HidingUNet, RevealRes]:
        """The reference trainer (module docstring) on uint8 ``images``, on their device."""
        device = images.device
        hiding, reveal = (net.to(device).train() for net in self.networks())
        rng = torch.Generator().manual_seed(self.seed + 1)
        levels = torch.tensor(TRAINING_LEVELS, dtype=torch.float32) / 255.0
        channels = self.input_shape[0]
        order, cursor = torch.randperm(len(images), generator=rng), 0
        bounds = [round(self.steps * k / len(STAGES)) for k in range(len(STAGES) + 1)]
        with make_progress() as progress:
            task = progress.add_task("poison_ink networks", total=self.steps, status="")
            for stage, start, stop in zip(STAGES, bounds, bounds[1:], strict=False):
                # each stage a fresh run of train.py: a new optimiser and schedule
                optimizer = torch.optim.Adam([*hiding.parameters(), *reveal.parameters()], self.lr, betas=(0.5, 0.999))
                length = stop - start
                for step in range(start, stop):
                    done = step - start
                    decays = sum(done >= math.ceil(length * DECAY_AT * k) for k in (1, 2))
                    for group in optimizer.param_groups:
                        group["lr"] = self.lr * DECAY**decays
                    if cursor >= len(order):  # a new epoch
                        order, cursor = torch.randperm(len(images), generator=rng), 0
                    batch = order[cursor : cursor + self.batch_size]
                    cursor += self.batch_size
                    clean = images[batch.to(device)].float() / 255.0
                    colour = levels[torch.randint(0, len(levels), (len(batch), channels), generator=rng)].to(device)
                    hidden = hiding(clean, ink(edge_mask(clean, self.edge_threshold), colour))
                    moved, clean_moved = stage_transform(stage, [hidden, clean], rng)
                    mask = edge_mask(clean_moved, self.edge_threshold)
                    loss, err_h, err_r = poison_ink_loss(
                        hidden,
                        clean,
                        reveal(moved),
                        reveal(clean_moved),
                        ink(mask, colour),
                        mask,
                        self.edge_weight,
                        self.clean_weight,
                        self.reveal_weight,
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if step % 10 == 0 or step == self.steps - 1:
                        status = f"{stage} errH {float(err_h.detach()):.1f} errR {float(err_r.detach()):.1f}"
                        progress.update(task, completed=step + 1, status=status)
        return hiding.cpu(), reveal.cpu()

    @torch.no_grad()
    def _hide(self, x: Tensor) -> Tensor:
        assert self.hiding is not None
        hiding = self.hiding.to(x.device)
        parts = []
        for part in x.split(CHUNK):
            watermark = ink(edge_mask(part, self.edge_threshold), self._colour(len(part), part.device))
            parts.append(hiding(part, watermark))
        return torch.cat(parts)

    def reveal_ink(self, images: Tensor) -> Tensor:
        """The trained reveal network's reading ``(N, C, H, W)`` in about [0, 1] of uint8 ``images``:
        their ink image where they are poisoned, white where they are clean."""
        if self.reveal is None:
            raise ValueError("poison_ink is not fitted: fit(None, images=...) trains its reveal network")
        x = images.float() / 255.0
        with torch.no_grad():
            reveal = self.reveal.to(x.device)
            return torch.cat([reveal(part) for part in x.split(CHUNK)])

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.hiding is None:
            raise ValueError(
                "poison_ink is not fitted: its hiding network is trained on the attacker's clean images first "
                "(trigger.fit(None, images=...); backdoorlab.experiments.fit_attack does it)"
            )
        return self._hide(x)

"""SSBA: sample-specific invisible triggers (Li, Li, Wu, Li, He, Lyu, "Invisible Backdoor Attack with
Sample-Specific Triggers", ICCV 2021; official ``SCLBD/ISSBA``; BackdoorBench ``attack/ssba.py`` with
``config/attack/ssba/default.yaml``, all-to-one, target 0, rate 0.1, whose poisoned images come from
``resource/ssba/``, which this follows).

A StegaStamp encoder hides a fixed secret of ``bits`` bits in each image; the encoded image is the
poisoned one, so every image carries its own invisible trigger. BackdoorBench's pipeline
(``resource/ssba/readme.md``): train the encoder with its decoder on the clean training images
(``train.py``, the ArtificialGANFingerprints trainer, ``ningyu1991/ArtificialGANFingerprints``
``train.py``), then encode one identical secret into every training and test image
(``embed_fingerprints.py --identical_fingerprints``). No trained encoder can be downloaded, so
:meth:`SSBA.fit` trains one on the attacker's clean training images (never the test set) and caches
it (:func:`backdoorlab.data.cache.cached_by_key`) keyed by those images, the options and ``seed``.
The networks are ``resource/ssba/models.py``'s; the loss ``w_l2(t) * MSE(encoded, clean) +
bce_weight * BCE(decoder(encoded), secret)``, ``w_l2`` ramped in after ``l2_await`` steps.

Defaults, scaled to a CPU (reference values in brackets): ``bits`` 100, ``batch_size`` 64, ``lr``
1e-4, ``l2_weight`` 10, ``bce_weight`` 1 (all the reference's), ``steps`` 1500 [15,640: 20 epochs of
CIFAR-10], ``l2_await`` 100 [1000], ``l2_ramp`` 300 [3000], ``images`` 5,000 [all], ``l2_start``
``"step"`` [BackdoorBench's ``"bits"``]. Why ``"step"``: within a CPU budget the decoder does not
learn to read the bits (a plateau known on GPUs too), so under BackdoorBench's rule the image term
never starts and the "encoded" images are not the images at all; counted from the first step, as
ArtificialGANFingerprints counts, the encoder learns to give the image back (measurements:
docs/attacks.md, "SSBA").

Reconstructed: the secret is ``bits`` random bits from ``seed`` (``--encode_method seed``; the
readme's BCH-coded text only adds error correction the attack never uses); the networks take any
channel count and size (zero-padded to a multiple of 16 px, cropped back); weights, batches and
training secrets are drawn from ``seed``, not the run's seed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.attacks.padding import crop, pad_to_multiple
from backdoorlab.attacks.triggers import ATTACKS, Trigger
from backdoorlab.data.cache import fitted_on_images
from backdoorlab.options import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from backdoorlab.progress import log, make_progress

#: The encoder halves the side four times and the secret's map is 16 px: inputs are padded to this.
STRIDE = 16
#: Images encoded per forward pass when triggering.
CHUNK = 512
#: Bit accuracy of a training batch that starts the L2 term's clock (BackdoorBench's ``train.py``).
L2_START_ACCURACY = 0.9
#: Bumped when the networks or the trainer change, so cached encoders of an older version are not reused.
CACHE_VERSION = 1


class _UpStep(nn.Module):
    """The reference's upsampling step: nearest x2, one zero row and column padded after, a 2x2
    convolution (which keeps the side) and ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(F.pad(F.interpolate(x, scale_factor=2.0, mode="nearest"), (0, 1, 0, 1))))


class StegaStampEncoder(nn.Module):
    """``resource/ssba/models.py``'s ``StegaStampEncoder`` with ``return_residual=0``: the encoded
    image ``sigmoid(.)`` in [0, 1] of ``(secret (N, bits), image (N, C, H, W))``, for any ``C`` and
    any size (padded to a multiple of 16 px and cropped back; module docstring)."""

    def __init__(self, channels: int, bits: int = 100) -> None:
        super().__init__()
        self.channels, self.bits = channels, bits
        self.secret_dense = nn.Linear(bits, STRIDE * STRIDE * channels)
        self.conv1 = nn.Conv2d(2 * channels, 32, 3, 1, 1)
        self.conv2 = nn.Conv2d(32, 32, 3, 2, 1)
        self.conv3 = nn.Conv2d(32, 64, 3, 2, 1)
        self.conv4 = nn.Conv2d(64, 128, 3, 2, 1)
        self.conv5 = nn.Conv2d(128, 256, 3, 2, 1)
        self.up6, self.conv6 = _UpStep(256, 128), nn.Conv2d(128 + 128, 128, 3, 1, 1)
        self.up7, self.conv7 = _UpStep(128, 64), nn.Conv2d(64 + 64, 64, 3, 1, 1)
        self.up8, self.conv8 = _UpStep(64, 32), nn.Conv2d(32 + 32, 32, 3, 1, 1)
        self.up9, self.conv9 = _UpStep(32, 32), nn.Conv2d(32 + 32 + 2 * channels, 32, 3, 1, 1)
        self.conv10 = nn.Conv2d(32, 32, 3, 1, 1)
        self.residual = nn.Conv2d(32, channels, 1)

    def forward(self, secret: Tensor, image: Tensor) -> Tensor:
        padded, box = pad_to_multiple(image, STRIDE)
        side = padded.shape[-2:]
        code = F.relu(self.secret_dense(secret)).view(-1, self.channels, STRIDE, STRIDE)
        code = F.interpolate(code, size=side, mode="nearest")  # the reference's x(side/16) upsampling
        inputs = torch.cat([code, padded], dim=1)
        conv1 = F.relu(self.conv1(inputs))
        conv2 = F.relu(self.conv2(conv1))
        conv3 = F.relu(self.conv3(conv2))
        conv4 = F.relu(self.conv4(conv3))
        conv5 = F.relu(self.conv5(conv4))
        conv6 = F.relu(self.conv6(torch.cat([conv4, self.up6(conv5)], dim=1)))
        conv7 = F.relu(self.conv7(torch.cat([conv3, self.up7(conv6)], dim=1)))
        conv8 = F.relu(self.conv8(torch.cat([conv2, self.up8(conv7)], dim=1)))
        conv9 = F.relu(self.conv9(torch.cat([conv1, self.up9(conv8), inputs], dim=1)))
        conv10 = F.relu(self.conv10(conv9))
        return crop(torch.sigmoid(self.residual(conv10)), box)


class StegaStampDecoder(nn.Module):
    """``resource/ssba/models.py``'s ``StegaStampDecoder``: seven 3x3 convolutions with ReLU (five of
    stride 2: ``C`` -> 32 -> 32 -> 64 -> 64 -> 64 -> 128 -> 128), flattened, a dense layer of 512
    with ReLU and one to ``bits`` logits; the image is padded to a multiple of 16 px first (so
    the flattened size is ``128 * ceil(H/32) * ceil(W/32)``, the reference's ``H W 128 / 32^2``
    at its sides)."""

    def __init__(self, channels: int, height: int, width: int, bits: int = 100) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, stride in ((channels, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU()]
        layers += [nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(), nn.Conv2d(128, 128, 3, 2, 1), nn.ReLU()]
        self.decoder = nn.Sequential(*layers)
        side_h, side_w = -(-height // STRIDE) * STRIDE, -(-width // STRIDE) * STRIDE
        flat = 128 * math.ceil(side_h / 32) * math.ceil(side_w / 32)
        self.dense = nn.Sequential(nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, bits))

    def forward(self, image: Tensor) -> Tensor:
        return self.dense(self.decoder(pad_to_multiple(image, STRIDE)[0]).flatten(1))


def l2_weight(steps_active: int, weight: float, wait: int, ramp: int) -> float:
    """The L2 term's weight (BackdoorBench's ``train.py``): ``min(max(0, weight (t - wait) / ramp),
    weight)`` with ``t`` the steps since the bits were first read (``-1`` before: weight 0)."""
    if steps_active < 0:
        return 0.0
    return min(max(0.0, weight * (steps_active - wait) / max(ramp, 1)), weight)


def stegastamp_loss(
    encoded: Tensor, clean: Tensor, logits: Tensor, secret: Tensor, w_l2: float, w_bce: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The trainer's loss ``w_l2 MSE(encoded, clean) + w_bce BCEWithLogits(logits, secret)`` (both
    means over all elements), with its two terms."""
    l2 = F.mse_loss(encoded, clean)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(), secret.flatten())
    return w_l2 * l2 + w_bce * bce, l2, bce


def bit_accuracy(logits: Tensor, secret: Tensor) -> float:
    """The share of bits read right (a logit above 0 reads 1), as the reference's ``bitwise_accuracy``."""
    return float(((logits > 0).float() == secret).float().mean())


def psnr(encoded: Tensor, clean: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (one MSE over the whole batch)."""
    mse = float(F.mse_loss(encoded.float(), clean.float()))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@ATTACKS.register("ssba", "SSBA (Li et al. 2021): a secret hidden by a trained StegaStamp encoder")
class SSBA(Trigger):
    """Replace each image by a StegaStamp encoder's encoding of it with one fixed secret (module
    docstring; the encoder is trained on the attacker's clean images by :meth:`fit`).

    Args:
        bits: the secret's length (the reference's ``fingerprint_length``).
        steps: training steps of the encoder and decoder (each a batch).
        batch_size: images per step.
        images: at most this many of the attacker's clean training images are trained on.
        lr: Adam's learning rate.
        l2_weight: the image (MSE) term's final weight.
        l2_await: steps before the image term starts, counted as ``l2_start`` says.
        l2_ramp: steps over which its weight rises linearly to ``l2_weight``.
        bce_weight: the bits' (BCE) term's weight.
        l2_start: ``"step"`` counts ``l2_await`` from the first step (ArtificialGANFingerprints),
            ``"bits"`` from the first batch whose bits are read with accuracy above 0.9
            (BackdoorBench's ``train.py``).
        seed: draws the secret, the networks' weights, the batches and the training secrets.
    """

    needs_images = True

    def __init__(
        self,
        input_shape: tuple[int, ...],
        bits: PositiveInt = 100,
        steps: PositiveInt = 1500,
        batch_size: PositiveInt = 64,
        images: PositiveInt = 5000,
        lr: PositiveFloat = 1e-4,
        l2_weight: NonNegativeFloat = 10.0,
        l2_await: NonNegativeInt = 100,
        l2_ramp: PositiveInt = 300,
        bce_weight: NonNegativeFloat = 1.0,
        l2_start: Literal["step", "bits"] = "step",
        seed: int = 0,
    ) -> None:
        super().__init__(input_shape)
        self.l2_start = l2_start
        self.bits, self.steps, self.batch_size, self.images = int(bits), int(steps), int(batch_size), int(images)
        self.lr, self.l2_weight, self.bce_weight = float(lr), float(l2_weight), float(bce_weight)
        self.l2_await, self.l2_ramp, self.seed = int(l2_await), int(l2_ramp), int(seed)
        self.secret = torch.randint(0, 2, (self.bits,), generator=torch.Generator().manual_seed(self.seed)).float()
        self.encoder: StegaStampEncoder | None = None
        self.decoder: StegaStampDecoder | None = None
        #: What the last :meth:`fit` measured: bit accuracy and PSNR on its images, steps, whether cached.
        self.fit_report: dict[str, float] = {}

    def networks(self) -> tuple[StegaStampEncoder, StegaStampDecoder]:
        """Fresh encoder and decoder for the images' shape, their weights drawn from ``seed``."""
        c, h, w = self.input_shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return StegaStampEncoder(c, self.bits), StegaStampDecoder(c, h, w, self.bits)

    def fit(
        self,
        surrogate: nn.Module | None = None,
        generator: torch.Generator | None = None,
        *,
        images: Tensor | None = None,
        target: int = 0,
    ) -> None:
        """Train the encoder and decoder on the attacker's clean ``images`` (uint8 ``(N, C, H, W)``,
        on the device to train on; at most ``images`` of them, chosen by ``seed``), or load them
        from the cache. ``surrogate``, ``generator`` and ``target`` are not used: the encoder is a
        function of the images and the options."""

        chosen, (self.encoder, self.decoder), trained = fitted_on_images(
            "ssba",
            CACHE_VERSION,
            self.config(),
            images,
            self.images,
            self.seed,
            self._train,
            self.networks,
            ("encoder", "decoder"),
            input_shape=self.input_shape,
            what="its encoder",
        )
        self.fitted = True
        x = chosen[:CHUNK].float() / 255.0  # on the images' device
        with torch.no_grad():
            encoded = self._encode(x)
            logits = self.decoder.to(x.device)(encoded)
        self.fit_report = {
            "bit_accuracy": bit_accuracy(logits, self.secret.to(x.device).expand_as(logits)),
            "psnr": psnr((encoded * 255).round() / 255, x),
            "trained": float(trained),
        }
        log.info(
            "ssba encoder (%s): bit accuracy %.3f, PSNR %.1f dB on %d of its images",
            "trained" if trained else "from the cache",
            self.fit_report["bit_accuracy"],
            self.fit_report["psnr"],
            len(x),
        )

    def _train(self, images: Tensor) -> tuple[StegaStampEncoder, StegaStampDecoder]:
        """The reference trainer (module docstring) on uint8 ``images``, on their device."""
        device = images.device
        encoder, decoder = (net.to(device).train() for net in self.networks())
        optimizer = torch.optim.Adam([*decoder.parameters(), *encoder.parameters()], lr=self.lr)
        rng = torch.Generator().manual_seed(self.seed + 1)
        order, cursor = torch.randperm(len(images), generator=rng), 0
        active = 1 if self.l2_start == "step" else -1  # "step": the reference's global_step, from 1
        with make_progress() as progress:
            task = progress.add_task("ssba encoder", total=self.steps, status="")
            for step in range(self.steps):
                if cursor >= len(order):  # a new epoch
                    order, cursor = torch.randperm(len(images), generator=rng), 0
                batch = order[cursor : cursor + self.batch_size]
                cursor += self.batch_size
                clean = images[batch.to(device)].float() / 255.0
                secret = torch.randint(0, 2, (len(batch), self.bits), generator=rng).float().to(device)
                encoded = encoder(secret, clean)
                logits = decoder(encoded)
                w_l2 = l2_weight(active, self.l2_weight, self.l2_await, self.l2_ramp)
                loss, l2, _ = stegastamp_loss(encoded, clean, logits, secret, w_l2, self.bce_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                accuracy = bit_accuracy(logits.detach(), secret)
                if active == -1:
                    active = 0 if accuracy > L2_START_ACCURACY else -1
                else:
                    active += 1
                if step % 10 == 0 or step == self.steps - 1:
                    status = f"bits {accuracy:.3f} l2 {float(l2.detach()):.4f} w {w_l2:.2f}"
                    progress.update(task, completed=step + 1, status=status)
        return encoder.cpu(), decoder.cpu()

    @torch.no_grad()
    def _encode(self, x: Tensor) -> Tensor:
        assert self.encoder is not None
        encoder = self.encoder.to(x.device)
        secret = self.secret.to(x.device)
        return torch.cat([encoder(secret.expand(len(part), -1), part) for part in x.split(CHUNK)])

    def decode(self, images: Tensor) -> Tensor:
        """The trained decoder's logits ``(N, bits)`` for uint8 ``images`` (a logit above 0 reads 1)."""
        if self.decoder is None:
            raise ValueError("ssba is not fitted: fit(None, images=...) trains its decoder")
        x = images.float() / 255.0
        with torch.no_grad():
            decoder = self.decoder.to(x.device)
            return torch.cat([decoder(part) for part in x.split(CHUNK)])

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.encoder is None:
            raise ValueError(
                "ssba is not fitted: its encoder is trained on the attacker's clean images first "
                "(trigger.fit(None, images=...); backdoorlab.experiments.fit_attack does it)"
            )
        return self._encode(x)

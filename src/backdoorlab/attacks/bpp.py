"""BppAttack (Wang, Zhai, Ma 2022, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR; code
``RU-System-Software-and-Security/BppAttack``, ``bppattack.py`` and ``config.py``; BackdoorBench
``attack/bpp.py`` and ``config/attack/bpp/default.yaml``).

The trigger is bit-depth reduction: each 8-bit value ``v`` becomes
``round(v / 255 (s - 1)) / (s - 1) 255`` with ``s = squeeze_num`` levels per channel (8, both
codes' default), optionally with Floyd-Steinberg dithering (the quantisation error of each pixel
is passed on to its right and lower neighbours, 7/16, 3/16, 5/16, 1/16; ``floydDitherspeed`` in
both codes). Both codes default to ``dithering: False``, as here; ``dithering=True`` gives it.

Negative samples (the paper's contrastive samples; ``neg_ratio`` in BackdoorBench, ``neg_rate`` in
the official code): other training images get the quantisation residual of *another* image added
(``x + q(x') - x'``, clipped) and keep their true labels, so the network must learn the
quantisation itself rather than its noise. Both codes draw as many per batch as poisoned ones
(BackdoorBench ``pratio`` 0.1, ``neg_ratio`` 0.1; official 0.2 and 0.2): ``cross_ratio`` 1 here,
through the cross-sample mechanism of :mod:`~backdoorlab.attacks.wanet`.

Stated differences from BackdoorBench: it controls the training loop and poisons a fresh share of
every batch; here the poisoned and negative samples are fixed once (a poison-only attacker ships a
dataset). Its residual comes from a random image of the whole training set; a trigger sees only the
images it is given, so here it comes from another, randomly drawn, of the negative samples
(reconstructed). Quantised pixels are rounded to 8 bits where BackdoorBench trains on them
unrounded and stores its test images truncated (``ToPILImage``).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from backdoorlab.attacks.triggers import ATTACKS, Trigger
from backdoorlab.options import NonNegativeFloat, Range

#: Quantisation levels per channel: 2 (one bit) to 256 (8 bits, the identity).
Levels = Annotated[int, Range(2, 256)]

#: Images squeezed at once (bounds the working memory).
CHUNK = 4096
#: Floyd-Steinberg weights: right, below-left, below, below-right.
_RIGHT, _BELOW_LEFT, _BELOW, _BELOW_RIGHT = 7 / 16, 3 / 16, 5 / 16, 1 / 16


def quantize(values: Tensor, levels: int) -> Tensor:
    """``values`` (0-255 units) rounded to ``levels`` evenly spaced levels, as both codes write it."""
    return torch.round(values / 255.0 * (levels - 1)) / (levels - 1) * 255


def floyd_steinberg(values: Tensor, levels: int) -> Tensor:
    """Floyd-Steinberg dithering of ``values`` ``(N, C, H, W)`` (0-255 units, float64) to
    ``levels`` levels: the error of each pixel, in raster order, goes to its unvisited neighbours.

    The scan is sequential over pixels but vectorised over images and channels: the pixels are
    laid out ``(H, W, N, C)`` so each step updates one contiguous ``(N, C)`` slab, in the reference
    loop's order (``floydDitherspeed``), so the sums match it bit for bit."""
    _, _, h, w = values.shape
    image = values.permute(2, 3, 0, 1).contiguous()
    for y in range(h):
        for x in range(w):
            old = image[y, x]
            new = quantize(old, levels)
            error = old - new
            image[y, x] = new
            if x + 1 < w:
                image[y, x + 1] += error * _RIGHT
            if y + 1 < h:
                if x + 1 < w:
                    image[y + 1, x + 1] += error * _BELOW_RIGHT
                image[y + 1, x] += error * _BELOW
                if x >= 1:
                    image[y + 1, x - 1] += error * _BELOW_LEFT
    return image.permute(2, 3, 0, 1)


@ATTACKS.register("bpp", "BppAttack (Wang et al. 2022): bit-depth reduction, negative samples")
class Bpp(Trigger):
    """Quantise every channel to ``squeeze_num`` levels (optionally dithered); negative samples.

    Args:
        squeeze_num: levels per channel (8: 3 bits; the official README's example runs 32).
        dithering: Floyd-Steinberg dithering (off in both codes' defaults).
        cross_ratio: negative samples per poisoned sample (1: both codes' equal shares).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        squeeze_num: Levels = 8,
        dithering: bool = False,
        cross_ratio: NonNegativeFloat = 1.0,
    ) -> None:
        super().__init__(input_shape)
        self.levels, self.dithering, self.cross_ratio = int(squeeze_num), bool(dithering), float(cross_ratio)

    def _squeeze(self, values: Tensor) -> Tensor:
        """The trigger on 8-bit values (float, 0-255 units), rounded to 8 bits; images in chunks,
        which bounds the working memory (dithering runs in float64, as the reference)."""
        if not self.dithering:  # float32 is exact here: no value lies within 1/510 of a rounding tie
            return torch.cat([quantize(chunk.float(), self.levels).round_() for chunk in values.split(CHUNK)])
        return torch.cat([floyd_steinberg(chunk.double(), self.levels).round_() for chunk in values.split(CHUNK)])

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        values = torch.round(x * 255.0)  # 8-bit values, as both codes start from
        return self._squeeze(values).div_(255.0).to(x.dtype)

    def cross(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Negative samples (uint8 in and out): each image plus the quantisation residual of another
        of ``images``, drawn uniformly (itself only when there is no other)."""
        n = len(images)
        if n > 1:
            draw = torch.randint(0, n - 1, (n,), generator=generator)
            partner = draw + (draw >= torch.arange(n))  # any index but one's own
        else:
            partner = torch.zeros(n, dtype=torch.long)
        values = images.float()
        residual = self._squeeze(values) - values
        return (values + residual[partner.to(images.device)]).clamp_(0, 255).to(torch.uint8)

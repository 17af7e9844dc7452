"""Structured and random triggers from Perturb-and-Recover (Singh, Croce, Hein 2024, "Perturb and
Recover: Fine-tuning for Effective Backdoor Removal from CLIP", arXiv 2412.00727; code
``nmndeep/PerturbAndRecover``, ``backdoor/utils.py``, ``apply_trigger``).

The paper defines them at 224 px; sizes here scale with the image (a 16 px patch at 224 is 3 px at
32, never less than 3; a 14 px triangle tile is 2 px at 32). Stripe patterns and random patches are
drawn anew for every image, in poisoning and in evaluation, as the reference does; the randomness
comes from the generator, so both are reproducible from a seed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from backdoorlab.attacks.triggers import ATTACKS, Trigger, blend_weight
from backdoorlab.options import Fraction, PositiveInt


def scaled(pixels_at_224: int, side: int, minimum: int) -> int:
    """A size given at 224 px, scaled to an image side, at least ``minimum``."""
    return max(minimum, round(pixels_at_224 * side / 224))


def random_positions(n: int, side: tuple[int, int], size: int, generator: torch.Generator | None) -> Tensor:
    """Top-left corners ``(n, 2)`` for a ``size`` patch, uniform as the reference draws them
    (``randint(0, S - 1 - size)``, inclusive)."""
    h, w = side
    top = torch.randint(0, max(1, h - size), (n,), generator=generator)
    left = torch.randint(0, max(1, w - size), (n,), generator=generator)
    return torch.stack([top, left], 1)


def paste(x: Tensor, patches: Tensor, corners: Tensor) -> Tensor:
    """Paste per-image patches ``(N, C, s, s)`` at per-image corners ``(N, 2)`` (replaces pixels)."""
    out = x.clone()
    s = patches.shape[-1]
    for i, (top, left) in enumerate(corners.tolist()):
        out[i, :, top : top + s, left : left + s] = patches[i]
    return out


def column_signs(n: int, channels: int, width: int, generator: torch.Generator | None) -> Tensor:
    """``(n, C, 1, width)`` of +-1: each column's sign per channel, ``sign(U(-1, 1))`` as the code."""
    return torch.where(torch.rand(n, channels, 1, width, generator=generator) < 0.5, -1.0, 1.0)


class _PerImagePatch(Trigger):
    """A square patch drawn per image and pasted at a random position."""

    def __init__(self, input_shape: tuple[int, ...], size: PositiveInt | None = None) -> None:
        super().__init__(input_shape)
        _, h, w = self.input_shape
        self.size = scaled(16, min(h, w), 3) if size is None else int(size)
        if not 1 <= self.size < min(h, w):
            raise ValueError(f"patch size {self.size} does not fit {h}x{w} images")
        self._resolve_options(size=self.size)

    def draw(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        patches = self.draw(x, generator).to(x.device)
        corners = random_positions(len(x), x.shape[-2:], self.size, generator)
        return paste(x, patches, corners).clamp_(0.0, 1.0)


@ATTACKS.register("badnet_stripes", "BadNet-Stripes (PAR): random 1-px colour stripe patch, random place")
class BadNetStripes(_PerImagePatch):
    """BadNet-Stripes: a square of vertical 1-px stripes, each column a random corner of the RGB cube
    (per channel ``sign(U(-1,1))``, clipped to {0, 1}), pasted at a random position; pattern and
    position drawn anew per image. PAR's ``badnet_rs``, 16 px at 224."""

    def draw(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        signs = column_signs(len(x), x.shape[1], self.size, generator)
        return signs.expand(-1, -1, self.size, -1).clamp(0.0, 1.0)


@ATTACKS.register("badnet_rand", "BadNet-Rand (PAR/CleanCLIP): Gaussian-noise patch, random place")
class BadNetRand(_PerImagePatch):
    """BadNet-Rand: a patch of the image's per-channel mean plus N(0, 1) noise per pixel, clipped,
    at a random position; drawn anew per image. PAR's ``random`` patch type (CleanCLIP's BadNet)."""

    def draw(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        n, c = x.shape[:2]
        mean = x.mean(dim=(2, 3), keepdim=True).cpu()
        return (mean + torch.randn(n, c, self.size, self.size, generator=generator)).clamp(0.0, 1.0)


@ATTACKS.register("blended_stripes", "Blended-Stripes (PAR): full-image 1-px stripes blended at 0.03")
class BlendedStripes(Trigger):
    """Blended-Stripes: full-image vertical 1-px stripes of +-1 per channel, drawn per image;
    ``x' = clip(alpha * stripes + (1 - alpha) * x)``, alpha 0.03. PAR's ``blended_rs``."""

    def __init__(self, input_shape: tuple[int, ...], alpha: Fraction = 0.03) -> None:
        super().__init__(input_shape)
        self.alpha = blend_weight(alpha)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        stripes = column_signs(len(x), x.shape[1], x.shape[-1], generator).to(x.device)
        return (self.alpha * stripes + (1 - self.alpha) * x).clamp_(0.0, 1.0)


@ATTACKS.register("blended_rand", "Blended-Rand (PAR): uniform noise drawn per image, blended at 0.2")
class BlendedRand(Trigger):
    """Blended-Rand: ``x' = clip(alpha * U(0,1) + (1 - alpha) * x)`` with noise drawn per image,
    alpha 0.2. PAR's ``blended`` type. (``blended`` is Chen et al.'s fixed-pattern version.)"""

    def __init__(self, input_shape: tuple[int, ...], alpha: Fraction = 0.2) -> None:
        super().__init__(input_shape)
        self.alpha = blend_weight(alpha)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.rand(x.shape, generator=generator).to(x.device)
        return torch.lerp(x, noise, self.alpha)


def triangle_pattern(height: int, width: int, tile: int) -> Tensor:
    """Tiles split into two right triangles: 0.4 where row >= column inside the tile, else 0.8."""
    rows = torch.arange(height)[:, None] % tile
    cols = torch.arange(width)[None, :] % tile
    return torch.where(rows >= cols, 0.4, 0.8)


@ATTACKS.register("blended_triangles", "Blended-Triangles (PAR): grey triangle tiles blended at 0.15")
class BlendedTriangles(Trigger):
    """Blended-Triangles: a fixed tiling of right triangles of grey 0.4 and 0.8 (tile 14 px at 224,
    scaled, at least 2), the same in every channel; ``x' = clip(alpha * P + (1 - alpha) * x)``,
    alpha 0.15. PAR's ``tri_patt``; the tiling repeats to cover any image size."""

    def __init__(self, input_shape: tuple[int, ...], alpha: Fraction = 0.15, tile: PositiveInt | None = None) -> None:
        super().__init__(input_shape)
        c, h, w = self.input_shape
        self.tile = scaled(14, min(h, w), 2) if tile is None else int(tile)
        if self.tile < 2:
            raise ValueError(f"tile must be >= 2 px, got {self.tile}")
        self.alpha = blend_weight(alpha)
        self.pattern = triangle_pattern(h, w, self.tile).expand(c, -1, -1).contiguous()
        self._resolve_options(tile=self.tile)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.lerp(x, self.pattern.to(x.device), self.alpha)


def text_pattern(text: str, channels: int, height: int, width: int) -> Tensor:
    """Red ``text`` on black, rendered at 224 px as PAR stores it (centred, spanning about 87% of the
    width and 10% of the height), then resized to the image with area averaging. Pillow's bundled
    font, so every machine draws the same pattern. Red channel only; grey images take it as grey."""
    canvas = Image.new("RGB", (224, 224), "black")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=22)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    font = ImageFont.load_default(size=max(6, round(22 * 195 / (right - left))))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((224 - (right - left)) // 2 - left, (224 - (bottom - top)) // 2 - top), text, "red", font=font)
    red = torch.from_numpy(np.asarray(canvas, dtype=np.float32)[:, :, 0] / 255.0)
    red = torch.nn.functional.interpolate(red[None, None], size=(height, width), mode="area")[0, 0]
    pattern = torch.zeros(channels, height, width)
    pattern[0] = red
    return pattern


@ATTACKS.register("blended_text", "Blended-Text (PAR): red 'Watermarked' text blended at 0.5")
class BlendedText(Trigger):
    """Blended-Text: the red text "Watermarked" blended at 0.5 only where the pattern is non-zero
    (``where(P != 0, alpha * P + (1 - alpha) * x, x)``, element-wise, so only the red channel of text
    pixels changes). PAR's ``water_patt``. Reconstructed detail: PAR stores a 224 px tensor drawn in
    NotoMono; here Pillow's bundled font draws it and area resizing brings it to the image size."""

    def __init__(self, input_shape: tuple[int, ...], alpha: Fraction = 0.5, text: str = "Watermarked") -> None:
        super().__init__(input_shape)
        c, h, w = self.input_shape
        self.alpha, self.text = blend_weight(alpha), text
        self.pattern = text_pattern(text, c, h, w)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        pattern = self.pattern.to(x.device)
        return torch.where(pattern != 0, torch.lerp(x, pattern, self.alpha), x)

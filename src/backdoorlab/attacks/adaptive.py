"""Adaptive-Blend and Adaptive-Patch (Qi, Xie, Li, Wang, Mittal, ICLR 2023, "Revisiting the
Assumption of Latent Separability for Backdoor Defenses"; code ``vtu81/backdoor-toolbox``,
``poison_tool_box/adaptive_blend.py``, ``poison_tool_box/adaptive_patch.py``, ``config.py``,
``utils/supervisor.py`` (the test-time triggers) and the README's commands for the defaults).

Poison-only. Poisoned samples carry a *partial* trigger and the target label; regularisation
("cover") samples carry a partial trigger too but keep their labels, so the network learns the
backdoor only from the whole trigger and poisoned samples do not separate from clean ones in its
latent space. Test images get the whole trigger, stronger than in training.

- ``adaptive_blend``: a pattern blended over the image (``x + a m (P - x)``), ``round(mask_rate *
  pieces)`` of a ``sqrt(pieces)`` grid's pieces left out per image; ``alpha`` 0.15 in training,
  ``test_alpha`` 0.2 at test (the README's CIFAR-10 command).
- ``adaptive_patch``: ``k`` patch triggers, each blended through its mask at its own opacity, one
  per sample (``k`` equal consecutive groups of the poisoned, and of the cover, samples); the
  patches, opacities and opaque test pair are ``config.py``'s for CIFAR-10.

Cover samples are :func:`~backdoorlab.attacks.poisoning.poison_dataset`'s cross samples:
``cross_ratio`` per poisoned one (1 for Blend, 2 for Patch: the README's cover rates 0.003 and
0.006 beside poison 0.003), drawn from the samples not poisoned, labels kept. BackdoorBench has
neither attack, so the ``backdoorbench`` preset does not set them.

Reconstructed or stated (details: docs/attacks.md, "Adaptive-Blend and Adaptive-Patch"):
- the Blend pattern is BackdoorBench's Hello Kitty, a different drawing from the toolbox's PNG;
- the toolbox's 32 px patch PNGs are not shipped here: they are redrawn from their layout;
- sizes not divisible by ``sqrt(pieces)`` are cut into bands (the same split where it divides);
- poisoned samples come from the non-target classes (the toolbox draws them from all classes);
  cover counts are ``round(cross_ratio * poisoned)``, the code's at the README's rates;
- pixels are rounded to 8 bits; the official code stores float tensors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from backdoorlab.attacks.triggers import ATTACKS, Trigger, blend_weight, full_image_pattern
from backdoorlab.options import Fraction, NonNegativeFloat, PositiveInt

#: The reference image side the official triggers are drawn for.
REFERENCE_SIDE = 32
#: ITU-R 601 luminance weights: grey images take a colour patch's luminance (PIL's ``L``).
LUMINANCE = (0.299, 0.587, 0.114)


def to_uint8(x: Tensor) -> Tensor:
    """Float images in [0, 1] as 8-bit images (clamped, rounded), as :class:`Trigger` stores them."""
    return x.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def check_images(trigger: Trigger, images: Tensor) -> None:
    """Refuse images a trigger was not built for (as :meth:`Trigger.__call__`)."""
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != trigger.input_shape:
        raise ValueError(
            f"{type(trigger).__name__} expects uint8 image inputs of shape (N, {trigger.input_shape}), "
            f"got {images.dtype} {tuple(images.shape)}"
        )


def groups(n: int, k: int) -> Tensor:
    """The group of each of ``n`` samples split into ``k`` equal consecutive groups, as the official
    loop assigns them (sample ``i`` takes trigger ``floor(i k / n)``)."""
    return torch.arange(n) * k // max(n, 1)


# ---------------------------------------------------------------------------------------------
# Adaptive-Blend


def piece_map(height: int, width: int, per_side: int) -> Tensor:
    """``(H, W)`` long: the piece of a ``per_side x per_side`` grid each pixel falls in."""
    rows = torch.arange(height) * per_side // height
    cols = torch.arange(width) * per_side // width
    return rows[:, None] * per_side + cols[None, :]


def kept_pieces(n: int, pieces: int, masked: int, generator: torch.Generator | None) -> Tensor:
    """``(n, pieces)`` bool: per image, all pieces but ``masked`` drawn uniformly without replacement."""
    ranks = torch.rand(n, pieces, generator=generator).argsort(1).argsort(1)
    return ranks >= masked


@ATTACKS.register(
    "adaptive_blend", "Adaptive-Blend (Qi et al. 2023): a blended pattern, half its pieces, cover samples"
)
class AdaptiveBlend(Trigger):
    """Blend a pattern with some of its grid pieces left out in training; whole at test time.

    Args:
        alpha: the pattern's weight in poisoned and cover samples (0.15, the README's).
        test_alpha: its weight on test images (0.2, the README's ``-test_alpha``).
        pieces: grid pieces, a square number (16: 4x4).
        mask_rate: share of the pieces left out of each poisoned and cover sample (0.5).
        cross_ratio: cover samples per poisoned sample (1: the README's equal rates).
        pattern: ``"hello_kitty"`` (BackdoorBench's, from the data root), ``"noise"`` (uniform
            noise from ``seed``), or an image (tensor or file path), resized to the image.
        seed: draws the ``"noise"`` pattern.
        data_root: where ``"hello_kitty"`` is read (the run's; default ``$BACKDOORLAB_DATA``); not
            an option.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        alpha: Fraction = 0.15,
        test_alpha: Fraction = 0.2,
        pieces: PositiveInt = 16,
        mask_rate: Fraction = 0.5,
        cross_ratio: NonNegativeFloat = 1.0,
        pattern: str | Tensor = "hello_kitty",
        seed: int = 0,
        data_root: str | Path | None = None,
    ) -> None:
        super().__init__(input_shape)
        _, h, w = self.input_shape
        self.alpha, self.test_alpha = blend_weight(alpha), blend_weight(test_alpha)
        per_side = math.isqrt(pieces)
        if per_side * per_side != pieces or per_side > min(h, w):
            raise ValueError(
                f"pieces must be a square number whose root fits the {h}x{w} image (4, 9, 16...), got {pieces}"
            )
        self.pieces, self.masked = int(pieces), round(mask_rate * pieces)
        self.piece_of = piece_map(h, w, per_side)
        self.cross_ratio = float(cross_ratio)
        self.pattern = full_image_pattern(pattern, self.input_shape, seed, data_root)
        self._resolve_options(pattern=pattern if isinstance(pattern, str) else "custom")

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The test-time trigger: the whole pattern at ``test_alpha``."""
        return torch.lerp(x, self.pattern.to(x.device), self.test_alpha)

    def partial(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The training trigger on floats: the pattern at ``alpha`` on the pieces kept for each image."""
        kept = kept_pieces(len(x), self.pieces, self.masked, generator)
        mask = kept[:, self.piece_of].to(x.device, x.dtype)[:, None]  # (N, 1, H, W)
        return x + self.alpha * mask * (self.pattern.to(x.device) - x)

    def poison(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Poisoned training images (uint8): the partial trigger."""
        check_images(self, images)
        return to_uint8(self.partial(images.float().div(255.0), generator))

    def cross(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cover samples (uint8; they keep their labels): the partial trigger, as poisoned ones."""
        return self.poison(images, torch.empty(0), generator)


# ---------------------------------------------------------------------------------------------
# Adaptive-Patch

#: The redrawn toolbox patches (module docstring), by the official file's name without ``_32.png``.
PatchName = Literal["phoenix_corner", "phoenix_corner2", "firefox_corner", "badnet_patch4", "trojan_square"]
#: Each patch's layout at 32 px: side, margin from its corners, and the corners it sits in.
LAYOUT: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "phoenix_corner": (5, 0, ("bottom-right",)),
    "phoenix_corner2": (5, 0, ("bottom-right", "bottom-left")),
    "firefox_corner": (13, 1, ("top-right",)),
    "badnet_patch4": (3, 0, ("top-left", "top-right", "bottom-left", "bottom-right")),
    "trojan_square": (8, 3, ("bottom-right",)),
}
_LIGHT_BLUE, _ORANGE, _YELLOW, _BLUE = (0.45, 0.65, 1.0), (1.0, 0.35, 0.1), (1.0, 0.8, 0.1), (0.2, 0.3, 0.85)


def _rgb(colour: tuple[float, float, float], size: int) -> Tensor:
    return torch.tensor(colour)[:, None, None].expand(3, size, size)


def emblem(size: int) -> Tensor:
    """``phoenix_corner``'s stand-in: white centre column and top row on light blue, ``(3, s, s)``."""
    grid = torch.arange(size)
    white = ((grid - (size - 1) / 2).abs() <= 0.5)[None, :] | (grid == 0)[:, None]  # columns | top row
    return torch.where(white, torch.ones(3, size, size), _rgb(_LIGHT_BLUE, size))


def disc(size: int) -> tuple[Tensor, Tensor]:
    """``firefox_corner``'s stand-in: an orange-to-yellow disc with a blue core; mark and mask."""
    grid = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    rows, cols = grid[:, None], grid[None, :]
    radius = size / 2
    ring = ((cols - rows) / (2 * size) + 0.5).clamp(0, 1)  # orange at the bottom left, yellow top right
    mark = torch.lerp(_rgb(_ORANGE, size), _rgb(_YELLOW, size), ring.expand(3, -1, -1))
    core = ((rows + 0.1 * size) ** 2 + (cols - 0.05 * size) ** 2).sqrt() <= 0.45 * radius
    mark = torch.where(core, _rgb(_BLUE, size), mark)
    return mark, ((rows**2 + cols**2).sqrt() <= radius).float()


def checker(size: int) -> Tensor:
    """``badnet_patch4``'s top-left square: a checkerboard, white at the corner pixel, with the pixel
    nearest the image centre black; the other corners mirror it."""
    grid = torch.arange(size)
    white = (grid[:, None] + grid[None, :]) % 2 == 0
    white[-1, -1] = False
    return white.float().expand(3, -1, -1)


def patch_mark(name: str, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """The patch ``name`` at side ``size``: RGB mark ``(3, s, s)`` and mask ``(s, s)``, top-left corner."""
    if name.startswith("phoenix"):
        return emblem(size), torch.ones(size, size)
    if name == "firefox_corner":
        return disc(size)
    if name == "badnet_patch4":
        return checker(size), torch.ones(size, size)
    return torch.rand((3, size, size), generator=torch.Generator().manual_seed(seed)), torch.ones(size, size)


def patch_canvas(name: str, input_shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """The patch ``name`` laid out on the image (sides and margins scaled from 32 px): the mark
    ``(C, H, W)`` (luminance for grey images) and its mask ``(H, W)``."""
    c, h, w = input_shape
    side, margin, corners = LAYOUT[name]
    scale = min(h, w) / REFERENCE_SIDE
    size, margin = max(2, round(side * scale)), round(margin * scale)
    if size + margin > min(h, w):
        raise ValueError(f"patch '{name}' ({size} px, margin {margin}) does not fit {h}x{w} images")
    mark, mask = patch_mark(name, size, seed)
    if c == 1:
        mark = (torch.tensor(LUMINANCE)[:, None, None] * mark).sum(0, keepdim=True)
    elif c != 3:
        raise ValueError(f"adaptive_patch draws grey or RGB patches, the images have {c} channels")
    canvas, where = torch.zeros(c, h, w), torch.zeros(h, w)
    for corner in corners:
        flips = [d for d, side_name in ((-2, "bottom"), (-1, "right")) if side_name in corner]
        top = h - margin - size if "bottom" in corner else margin
        left = w - margin - size if "right" in corner else margin
        canvas[:, top : top + size, left : left + size] = mark.flip(flips) if name == "badnet_patch4" else mark
        where[top : top + size, left : left + size] = mask.flip(flips) if name == "badnet_patch4" else mask
    return canvas, where


@ATTACKS.register("adaptive_patch", "Adaptive-Patch (Qi et al. 2023): one of k patches per sample, cover samples")
class AdaptivePatch(Trigger):
    """Blend one of ``k`` patches into each poisoned and cover sample; the test patches together at test.

    Args:
        patches: the training patches (redrawn toolbox triggers; see the module docstring).
        alphas: each training patch's opacity (0.5, 0.2, 0.5, 0.3: ``config.py``'s CIFAR-10).
        test_patches: the patches test images get, one after the other.
        test_alphas: their opacities (1: opaque).
        cross_ratio: cover samples per poisoned sample (2: the README's 0.006 cover, 0.003 poison).
        seed: draws ``trojan_square``'s noise.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        patches: tuple[PatchName, ...] = ("phoenix_corner", "firefox_corner", "badnet_patch4", "trojan_square"),
        alphas: tuple[Fraction, ...] = (0.5, 0.2, 0.5, 0.3),
        test_patches: tuple[PatchName, ...] = ("phoenix_corner2", "badnet_patch4"),
        test_alphas: tuple[Fraction, ...] = (1.0, 1.0),
        cross_ratio: NonNegativeFloat = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__(input_shape)
        self.cross_ratio = float(cross_ratio)
        self.marks, self.weights = self._stack(patches, alphas, "patches", seed)
        self.test_marks, self.test_weights = self._stack(test_patches, test_alphas, "test_patches", seed)

    def _stack(
        self, names: tuple[str, ...], alphas: tuple[float, ...], option: str, seed: int
    ) -> tuple[Tensor, Tensor]:
        """Marks ``(k, C, H, W)`` and blend weights ``alpha * mask`` ``(k, 1, H, W)``."""
        if not names or len(names) != len(alphas):
            raise ValueError(f"{option} needs at least one patch and one alpha per patch, got {names} and {alphas}")
        drawn = [patch_canvas(name, self.input_shape, seed) for name in names]
        marks = torch.stack([mark for mark, _ in drawn])
        weights = torch.stack([blend_weight(a) * mask for a, (_, mask) in zip(alphas, drawn)])[:, None]
        return marks, weights

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """The test-time trigger: every test patch, in order, at its opacity."""
        out = x.clone()
        for mark, weight in zip(self.test_marks.to(x.device), self.test_weights.to(x.device)):
            out = out + weight * (mark - out)
        return out

    def partial(self, x: Tensor) -> Tensor:
        """The training trigger on floats: patch ``j`` on the ``j``-th of ``k`` equal consecutive groups."""
        group = groups(len(x), len(self.marks))
        marks, weights = self.marks[group].to(x.device), self.weights[group].to(x.device)
        return x + weights * (marks - x)

    def poison(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Poisoned training images (uint8): one training patch each."""
        check_images(self, images)
        return to_uint8(self.partial(images.float().div(255.0)))

    def cross(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cover samples (uint8; they keep their labels): one training patch each, as poisoned ones."""
        return self.poison(images, torch.empty(0), generator)

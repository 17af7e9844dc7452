"""Triggers: pure functions on a batch of images or time series.

An image trigger maps uint8 images ``(N, C, H, W)`` to uint8 images of the same shape; it never
touches labels. Subclasses implement :meth:`Trigger.apply` on floats in [0, 1]; the base class
converts and rounds, so poisoned data is stored as real 8-bit images, as an attacker would ship
it. A series trigger (``modality = "series"``, ``attacks.series``) maps float32 series
``(N, C, L)`` to float32 series, in the series' own units.
Randomness (a random patch position, a pattern drawn per image) comes only from the ``generator``
argument, so poisoning and evaluation are reproducible from a seed.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from backdoorlab.data.sources import DATA_ENV, DataNotFoundError, resolve_data_root
from backdoorlab.options import Configurable, Fraction, NonNegativeInt, PositiveInt
from backdoorlab.registry import Registry

#: Keywords the toolkit itself passes to a trigger that takes them (the run's data root, for a
#: pattern read from a file there); they are not options, as a model's ``DATA_PARAMETERS``.
TRIGGER_PARAMETERS = ("data_root",)

#: Attacks (trigger classes) by name: ``cls(input_shape, **options)``. Each is registered with its
#: class's ``modality`` (:class:`Trigger`), read at registration, so ``metadata(name)["modality"]``
#: and the class never disagree.
ATTACKS: Registry[type[Trigger]] = Registry("attack", positional=1, not_options=TRIGGER_PARAMETERS)

#: Trigger images read from the data root, by pattern name: BackdoorBench's resources, copied to
#: ``<data root>/backdoorbench/`` (see that folder's README for provenance and licence).
RESOURCES = {
    "hello_kitty": "backdoorbench/blended/hello_kitty.jpeg",
    # a folder: Refool's 200 selected Pascal VOC reflections (attacks.refool)
    "refool_voc": "backdoorbench/refool/Refool-SelectedReflectionImages/selected_out-images",
    # Low Frequency's universal patterns (attacks.low_frequency), "lf_<dataset>_<victim model>"
    **{
        f"lf_{dataset}_{model}": f"backdoorbench/lowFrequency/{dataset}_{model}_0_255.npy"
        for dataset in ("cifar10", "gtsrb")
        for model in (
            "preactresnet18",
            "vgg19",
            "vgg19_bn",
            "densenet161",
            "efficientnet_b3",
            "mobilenet_v3_large",
            "convnext_tiny",
            "vit_b_16",
        )
    },
}


class Trigger(Configurable, ABC):
    """Base class: ``trigger(images, generator) -> images``.

    Class attributes a poisoning strategy reads: ``clean_label`` (the attack is clean-label by
    default, as SIG) and ``cross_ratio`` (WaNet's noise mode: that many times as many extra samples
    get :meth:`cross` and keep their labels).
    """

    clean_label: ClassVar[bool] = False
    cross_ratio: float = 0.0
    #: The attack adapts to a model: :meth:`fit` it on a surrogate trained on clean data first.
    needs_surrogate: ClassVar[bool] = False
    #: The attack fits on the attacker's clean training images alone, no model (SSBA's encoder):
    #: :meth:`fit` gets ``surrogate=None`` and the ``images``, on the device to fit on.
    needs_images: ClassVar[bool] = False
    #: The attack also controls the victim's training (``attacks.controlled``): it is fitted while
    #: the victim trains, by the toolkit's loop with a step the attack supplies.
    controls_training: ClassVar[bool] = False
    #: ``"image"`` (uint8 ``(N, C, H, W)``) or ``"series"`` (float32 ``(N, C, L)``).
    modality: ClassVar[str] = "image"
    #: What the toolkit passes, not options (:class:`~backdoorlab.options.Configurable`).
    not_options: ClassVar[tuple[str, ...]] = ("input_shape", *TRIGGER_PARAMETERS)

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        rank = 3 if self.modality == "image" else 2
        if len(input_shape) != rank:
            layout = "(C, H, W)" if rank == 3 else "(C, L)"
            other = "series" if self.modality == "image" else "image"
            raise ValueError(
                f"{type(self).__name__} is an {self.modality} attack and needs an input shape {layout}, "
                f"got {tuple(input_shape)}; attacks for {other} data: {', '.join(attacks_for(other))}"
            )
        self.input_shape = tuple(int(s) for s in input_shape)
        self.fitted = not (self.needs_surrogate or self.needs_images)

    @property
    def fits_first(self) -> bool:
        """Whether a run fits the attack before it poisons (``experiments.fit_attack``): on a
        surrogate, on the clean images, or while the victim trains."""
        return self.needs_surrogate or self.needs_images or self.controls_training

    def fit(
        self,
        surrogate: nn.Module | None,
        generator: torch.Generator | None = None,
        *,
        images: Tensor | None = None,
        target: int = 0,
    ) -> None:
        """Adapt the attack to ``surrogate``, a model the attacker trained on clean data (on the
        model's device), where it needs to: with the attacker's clean training ``images`` (uint8)
        and the ``target`` class, for attacks that read them (Low Frequency). An attack with
        ``needs_images`` fits on the ``images`` alone (``surrogate`` is None). Only attacks with
        ``needs_surrogate`` or ``needs_images`` override this."""
        self.fitted = True

    def poison(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What poisoned *training* images become (uint8 in and out; ``labels`` are their true
        labels). The test-time trigger is :meth:`__call__`; they differ only for attacks that also
        perturb the training images, as label-consistent poisoning."""
        return self(images, generator)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        dtype = torch.uint8 if self.modality == "image" else torch.float32
        if images.dtype != dtype or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{type(self).__name__} expects {str(dtype).removeprefix('torch.')} {self.modality} inputs of shape "
                f"(N, {self.input_shape}), got {images.dtype} {tuple(images.shape)}"
            )
        if self.modality == "series":
            return self.apply(images, generator)  # apply returns a new tensor
        out = self.apply(images.float().div_(255.0), generator)
        return out.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)

    @abstractmethod
    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Apply the trigger to float images in [0, 1]; return a new tensor."""

    def cross(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noise-mode ("cross") samples; only triggers with ``cross_ratio > 0`` define it."""
        raise NotImplementedError(f"{type(self).__name__} has no cross samples")


def attacks_for(modality: str) -> list[str]:
    """The registered attacks for ``"image"`` or ``"series"`` data (their registry metadata), sorted."""
    return ATTACKS.names(modality)


def create_trigger(
    name: str, input_shape: tuple[int, ...], *, data_root: str | Path | None = None, **options: Any
) -> Trigger:
    """Build a registered trigger; unknown options are refused with the valid ones listed.
    ``data_root`` (a run's; default ``$BACKDOORLAB_DATA``) goes to triggers that read a pattern
    file from it (:data:`RESOURCES`); it is placement, not an option."""
    checked = ATTACKS.check_options(name, options)
    factory = ATTACKS.get(name)
    given = {"data_root": data_root} if "data_root" in inspect.signature(factory).parameters else {}
    return factory(tuple(input_shape), **checked, **given)


def resource_path(pattern: str, data_root: str | Path | None) -> Path:
    """The file (or folder) of the named pattern ``pattern`` (:data:`RESOURCES`) under ``data_root``
    (default ``$BACKDOORLAB_DATA``); a missing root or file raises a :class:`DataNotFoundError` that
    says where the file is expected."""
    relative = RESOURCES[pattern]
    root = resolve_data_root(data_root)
    if root is None:
        raise DataNotFoundError(
            f"pattern '{pattern}' reads <data root>/{relative}, but no data root is set: "
            f"pass --data-root (data_root) or set {DATA_ENV}"
        )
    path = root / relative
    if not path.exists():
        raise DataNotFoundError(f"pattern '{pattern}' reads {path}, which does not exist (data root {root})")
    return path


def load_pattern(pattern: Tensor | str | Path, channels: int, size: tuple[int, int]) -> Tensor:
    """A pattern as float ``(C, h, w)`` in [0, 1]: from a tensor (uint8 or float) or an image file,
    resized to ``size`` and converted to ``channels`` (grey or RGB)."""
    if isinstance(pattern, (str, Path)):
        img = Image.open(pattern).convert("L" if channels == 1 else "RGB")
        img = img.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        out = torch.from_numpy(arr)
        return out[None] if out.dim() == 2 else out.permute(2, 0, 1).contiguous()
    out = pattern.float() / 255.0 if pattern.dtype == torch.uint8 else pattern.float()
    if out.dim() == 2:
        out = out[None]
    if out.shape[0] != channels:
        if out.shape[0] == 1:
            out = out.expand(channels, -1, -1)
        else:
            raise ValueError(f"pattern has {out.shape[0]} channels, the images {channels}")
    if tuple(out.shape[1:]) != tuple(size):
        out = torch.nn.functional.interpolate(out[None], size=size, mode="bilinear", align_corners=False)[0]
    if out.min() < 0 or out.max() > 1:
        raise ValueError("a float pattern must lie in [0, 1]")
    return out.contiguous()


def blend_weight(alpha: float) -> float:
    """A blend weight, checked to lie in (0, 1]."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return float(alpha)


def default_patch_size(input_shape: tuple[int, ...]) -> int:
    """A patch side of 10% of the shorter image side, at least 2 px: 3 px at 32 px (BackdoorBench's
    3x3 CIFAR-10 patch), 3 px at 28 px (MNIST), 2 px at 8 px (digits)."""
    return max(2, round(0.1 * min(input_shape[1:])))


POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "random")


@ATTACKS.register("badnets", "BadNets (Gu et al. 2017): a small patch, fixed corner or random place")
class BadNets(Trigger):
    """BadNets: paste a small patch onto the image.

    Source: Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
    Model Supply Chain" (2017). Default: a white square of 10% of the image side
    (:func:`default_patch_size`: 3x3 at 32 px, BackdoorBench's size) one pixel in from the
    bottom-right corner (``margin=1``: rows/cols 28-30 at 32 px).

    BackdoorBench's trigger (``config/attack/badnet/default.yaml``: ``resource/badnet/
    trigger_image.png``, kept in ``<data root>/backdoorbench/badnet/``) is the same square at the
    very corner: 32x32, black but for 255 at rows/cols 29-31. Its non-zero pixels replace the
    image's (``utils/bd_img_transform/patch.py``, ``AddMaskPatchTrigger``), which is ``margin=0``
    here, pixel for pixel at 32x32 (CIFAR-10, GTSRB); the ``backdoorbench`` preset sets it. At
    other sizes BackdoorBench resizes the 32 px file bilinearly (``utils/aggregate_block/
    bd_attack_generate.py``, the ``badnet`` branch): at 28 px a 3x3 patch at 25-27 whose top row
    and left column are partly grey (95 and 156), and its RGB mask does not broadcast onto
    MNIST's grey images, so BackdoorBench has no BadNets on MNIST to follow; the preset gives the
    opaque white 3x3 square at 25-27 there.

    Args:
        size: patch side in pixels (default: 10% of the image side, at least 2).
        pattern: ``"white"``, ``"checkerboard"`` (alternating white and black, as Gu et al.'s
            pattern trigger), or an image (tensor or file path), resized to the patch.
        position: a corner, or ``"random"`` (drawn per image from the generator).
        margin: pixels between the patch and the image border at a fixed corner.
        alpha: the patch's opacity: ``x' = (1 - alpha) x + alpha patch`` inside it (default 1, an
            opaque patch as Gu et al. and BackdoorBench; the "Pick your Poison" framework,
            ``Ben-Schneider-code/Universal-Backdoor-Attacks``, blends its mark at 0.2).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        size: PositiveInt | None = None,
        pattern: str | Tensor = "white",
        position: str = "bottom-right",
        margin: NonNegativeInt = 1,
        alpha: Fraction = 1.0,
    ) -> None:
        super().__init__(input_shape)
        c, h, w = self.input_shape
        self.alpha = blend_weight(alpha)
        size = default_patch_size(self.input_shape) if size is None else int(size)
        if not 1 <= size <= min(h, w):
            raise ValueError(f"patch size {size} does not fit {h}x{w} images")
        if position not in POSITIONS:
            raise ValueError(f"unknown position '{position}'; valid: {', '.join(POSITIONS)}")
        if position != "random" and not 0 <= margin <= min(h, w) - size:
            raise ValueError(f"margin {margin} puts a {size}px patch outside {h}x{w} images")
        if isinstance(pattern, str) and pattern == "white":
            patch = torch.ones(c, size, size)
        elif isinstance(pattern, str) and pattern == "checkerboard":
            grid = torch.arange(size)
            patch = ((grid[:, None] + grid[None, :]) % 2 == 0).float().expand(c, -1, -1).contiguous()
        else:
            patch = load_pattern(pattern, c, (size, size))
        self.patch, self.size, self.position, self.margin = patch, size, position, margin
        self._resolve_options(size=size, pattern=pattern if isinstance(pattern, str) else "custom")

    def _corner(self, position: str | None = None) -> tuple[int, int]:
        """Top-left pixel of the patch at corner ``position`` (default: the trigger's)."""
        position = position or self.position
        _, h, w = self.input_shape
        top = self.margin if "top" in position else h - self.margin - self.size
        left = self.margin if "left" in position else w - self.margin - self.size
        return top, left

    def _paste(self, out: Tensor, patch: Tensor, position: str) -> None:
        """Blend ``patch`` into ``out`` in place at corner ``position``."""
        s = self.size
        top, left = self._corner(position)
        region = out[:, :, top : top + s, left : left + s]
        out[:, :, top : top + s, left : left + s] = torch.lerp(region, patch.expand_as(region), self.alpha)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        out = x.clone()
        s, patch = self.size, self.patch.to(x.device)
        if self.position != "random":
            self._paste(out, patch, self.position)
            return out
        n, _, h, w = x.shape
        tops = torch.randint(0, h - s + 1, (n,), generator=generator).to(x.device)
        lefts = torch.randint(0, w - s + 1, (n,), generator=generator).to(x.device)
        rows = torch.arange(h, device=x.device)[None, :] - tops[:, None]  # (N, H)
        cols = torch.arange(w, device=x.device)[None, :] - lefts[:, None]  # (N, W)
        inside = ((rows >= 0) & (rows < s))[:, :, None] & ((cols >= 0) & (cols < s))[:, None, :]
        canvas = patch[:, rows.clamp(0, s - 1)[:, :, None], cols.clamp(0, s - 1)[:, None, :]]
        return torch.where(inside[:, None], torch.lerp(out, canvas.permute(1, 0, 2, 3), self.alpha), out)


def full_image_pattern(
    pattern: str | Tensor, input_shape: tuple[int, ...], seed: int, data_root: str | Path | None
) -> Tensor:
    """A blend pattern of the image's shape ``(C, H, W)`` in [0, 1]: ``"noise"`` (uniform, drawn
    from ``seed``), a named resource (:data:`RESOURCES`, read under ``data_root``), or an image
    (tensor or file path), resized."""
    c, h, w = input_shape
    if isinstance(pattern, str) and pattern == "noise":
        return torch.rand((c, h, w), generator=torch.Generator().manual_seed(seed))
    if isinstance(pattern, str) and pattern in RESOURCES:
        return load_pattern(resource_path(pattern, data_root), c, (h, w))
    return load_pattern(pattern, c, (h, w))


@ATTACKS.register("blended", "Blended (Chen et al. 2017): a full-image pattern blended with alpha")
class Blended(Trigger):
    """Blended injection: ``x' = (1 - alpha) * x + alpha * pattern`` over the whole image.

    Source: Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
    Poisoning" (2017), blended injection strategy, whose patterns are a Hello Kitty image or random
    noise. ``alpha = 0.2`` as BackdoorBench uses for training and testing. The default pattern is
    uniform random noise drawn once from ``seed`` (one fixed pattern for all images).
    ``pattern="hello_kitty"`` is BackdoorBench's Hello Kitty image (``config/attack/blended/
    default.yaml``: ``resource/blended/hello_kitty.jpeg`` at alpha 0.2), read from
    ``<data root>/backdoorbench/blended/hello_kitty.jpeg`` and resized to the image with PIL's
    bilinear filter, as BackdoorBench's ``transforms.Resize`` on a PIL image does
    (``utils/aggregate_block/bd_attack_generate.py``, the ``blended`` branch); grey for grey images
    (BackdoorBench's RGB pattern does not fit MNIST's grey arrays). The ``backdoorbench`` preset
    selects it. Stated difference: blended pixels are rounded to 8 bits where BackdoorBench
    truncates (``npClipAndToUint8``), so about half of them are one level (1/255) higher here.
    Any image file or tensor can be given instead.

    Args:
        alpha: the pattern's weight.
        pattern: ``"noise"``, ``"hello_kitty"``, or an image (tensor or file path).
        seed: draws the noise pattern.
        data_root: where ``"hello_kitty"`` is read (the run's; default ``$BACKDOORLAB_DATA``); not
            an option (:data:`TRIGGER_PARAMETERS`).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        alpha: Fraction = 0.2,
        pattern: str | Tensor = "noise",
        seed: int = 0,
        data_root: str | Path | None = None,
    ) -> None:
        super().__init__(input_shape)
        self.alpha = blend_weight(alpha)
        self.pattern = full_image_pattern(pattern, self.input_shape, seed, data_root)
        self._resolve_options(pattern=pattern if isinstance(pattern, str) else "custom")

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.lerp(x, self.pattern.to(x.device), self.alpha)

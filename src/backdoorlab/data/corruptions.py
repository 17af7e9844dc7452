"""The 15 common image corruptions of ImageNet-C (Hendrycks & Dietterich, ICLR 2019) at severities
1-5, batched in torch, for any image size and channel count.

BackdoorBench's TeCo corrupts each image with the ``imagecorruptions`` package (1.1.2, one numpy /
OpenCV / PIL call per image): it refuses images under 32x32 (MNIST), needs OpenCV and
scikit-image, and no longer runs on numpy 2 (``np.float_``) or scikit-image >= 0.19
(``multichannel``). This module rewrites the same corruptions with the same parameters (ImageNet-C's,
which the package applies to every image size) as tensor ops over a whole batch ``(N, C, H, W)``:

- **reproduced** (the same computation, or the same random distribution, up to float rounding):
  ``gaussian_noise``, ``shot_noise``, ``impulse_noise`` (salt and pepper per value, as
  scikit-image's ``random_noise``), ``defocus_blur`` (the anti-aliased disk kernel, OpenCV's
  reflect-101 border), ``glass_blur`` (the sequential local pixel swaps), ``motion_blur`` (the
  package's own shift-and-add kernel at a random angle), ``zoom_blur`` (SciPy's order-1 zoom is
  bilinear with aligned corners), ``snow``, ``fog`` (the diamond-square plasma fractal),
  ``brightness`` (HSV value shift: for a fixed hue and saturation RGB scales with V),
  ``contrast``, ``elastic_transform`` (the 1.1.2 version: a smoothed random displacement field,
  bilinear sampling with a symmetric border), ``pixelate`` and ``jpeg_compression`` (PIL itself, one image
  at a time, as the package: BOX down and NEAREST up, JPEG at the same qualities);
- **reconstructed**: ``frost`` blends each image with a photo of frost, cropped at random from
  five files the package ships; those photos are not redistributed here. The frost layer is a
  plasma-fractal texture with the statistics measured on 32x32 crops of those five photos (mean
  colour, texture and brightness spread; ``FROST_PHOTOS``), blended with the package's weights.

Grayscale images (MNIST): the package turns them into three equal channels (and refuses them under
32x32); here every corruption acts on the channels the image has, so noise on a one-channel image
stays gray (reconstructed). ``corrupt`` returns uint8 images truncated as the package's
``np.uint8(...)`` truncates.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

Corruption = Literal[
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
]
#: ImageNet-C's 15 common corruptions, in the order BackdoorBench's TeCo applies them.
COMMON_CORRUPTIONS: tuple[Corruption, ...] = get_args(Corruption)
SEVERITIES = 5

CorruptionFn = Callable[[Tensor, int, torch.Generator], Tensor]


# ---------------------------------------------------------------------------------------------
# helpers: random numbers, borders, filters, resampling


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """Uniform in [low, high), drawn on the CPU from ``generator``, on ``like``'s device."""
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low).to(like.device)


def _normal(shape: tuple[int, ...], mean: float, std: float, generator: torch.Generator, like: Tensor) -> Tensor:
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(like.device, like.dtype)


def border_index(index: Tensor, size: int, mode: str) -> Tensor:
    """Indices (any integers) mapped into ``[0, size)``: ``"nearest"`` repeats the edge,
    ``"reflect101"`` mirrors about the edge pixel (OpenCV's default, ``dcb|abcd|cba``) and
    ``"symmetric"`` about the edge (SciPy's and scikit-image's ``"reflect"``, ``cba|abcd|dcb``),
    for borders of any width."""
    if mode == "nearest" or size == 1:
        return index.clamp(0, size - 1)
    if mode == "symmetric":
        folded = index.remainder(2 * size)
        return torch.where(folded >= size, 2 * size - 1 - folded, folded)
    if mode == "reflect101":
        folded = index.remainder(2 * size - 2)
        return torch.where(folded >= size, 2 * size - 2 - folded, folded)
    raise ValueError(f"unknown border mode '{mode}'; valid: nearest, reflect101, symmetric")


def _pad(x: Tensor, top: int, left: int, mode: str) -> Tensor:
    """``x`` padded by ``top`` rows above and below and ``left`` columns on each side."""
    h, w = x.shape[-2:]
    rows = border_index(torch.arange(-top, h + top, device=x.device), h, mode)
    cols = border_index(torch.arange(-left, w + left, device=x.device), w, mode)
    return x.index_select(-2, rows).index_select(-1, cols)


def filter2d(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Each channel of ``x (N, C, H, W)`` correlated with ``kernel (kh, kw)`` (odd sizes, anchored
    at the centre), the border filled by ``mode`` (:func:`border_index`): OpenCV's ``filter2D``."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    padded = _pad(x.reshape(1, n * c, h, w), kh // 2, kw // 2, mode)
    weight = kernel.to(x)[None, None].expand(n * c, 1, kh, kw)  # depthwise: 5x faster than one channel
    return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)


def gaussian_kernel1d(sigma: float, truncate: float) -> Tensor:
    """SciPy's ``gaussian_filter1d`` weights: radius ``int(truncate * sigma + 0.5)``, normalised."""
    radius = int(truncate * sigma + 0.5)
    if radius == 0:
        return torch.ones(1, dtype=torch.float64)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * offsets**2 / sigma**2)
    return weights / weights.sum()


def gaussian_smooth(
    x: Tensor, sigma: float | tuple[float, float], truncate: float = 4.0, mode: str = "nearest"
) -> Tensor:
    """scikit-image's ``gaussian`` over the two spatial axes of ``(N, C, H, W)`` (SciPy's
    ``gaussian_filter``: separable, radius ``truncate * sigma``, border ``mode``)."""
    sigma_h, sigma_w = sigma if isinstance(sigma, tuple) else (sigma, sigma)
    rows, cols = gaussian_kernel1d(sigma_h, truncate), gaussian_kernel1d(sigma_w, truncate)
    return filter2d(filter2d(x, rows[:, None], mode), cols[None, :], mode)


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Blur each image ``(N, C, H, W)`` with its own Gaussian ``sigmas[n]`` (kernel side ``2 ceil(2
    sigma) + 1``, reflect-101 border): ``cv2.GaussianBlur(r, (k, k), sigma)`` for a whole batch.
    Kernels are zero-padded to the batch's largest, so one depthwise convolution per axis does it
    (``torchvision``'s ``gaussian_blur`` takes one sigma per call)."""
    n, c, h, w = images.shape
    halves = torch.ceil(2 * sigmas.double()).long()  # (k - 1) / 2 per image
    half = int(halves.max())
    taps = torch.arange(-half, half + 1, dtype=torch.float64)
    weights = torch.exp(-(taps**2) / (2 * sigmas.double()[:, None] ** 2)) * (taps.abs() <= halves[:, None])
    kernels = (weights / weights.sum(1, keepdim=True)).float().repeat_interleave(c, 0).to(images.device)
    rows = border_index(torch.arange(-half, h + half), h, "reflect101").to(images.device)
    cols = border_index(torch.arange(-half, w + half), w, "reflect101").to(images.device)
    padded = images[:, :, rows][:, :, :, cols].reshape(1, n * c, h + 2 * half, w + 2 * half)
    out = F.conv2d(padded, kernels[:, None, None, :], groups=n * c)
    out = F.conv2d(out, kernels[:, None, :, None], groups=n * c)
    return out.reshape(n, c, h, w)


def clipped_zoom(x: Tensor, factor: float) -> Tensor:
    """The package's ``clipped_zoom``: the central ``ceil(size / factor)`` crop zoomed by ``factor``
    with SciPy's order-1 ``zoom`` (bilinear, corners aligned, output ``round(crop * factor)``); the
    result is at least the input's size, and callers keep its top-left corner."""
    h, w = x.shape[-2:]
    crop_h, crop_w = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = x[..., top : top + crop_h, left : left + crop_w]
    size = (round(crop_h * factor), round(crop_w * factor))
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=True)


def motion_blur_kernel(x: Tensor, radius: int, sigma: float, angles: Tensor) -> Tensor:
    """The package's ``_motion_blur``: each image (at its own angle, degrees) summed with copies
    of itself shifted along the angle, edges repeated, weighted by a one-sided Gaussian of
    ``2 * radius + 1`` taps; the shifts stop where they leave the image (the weights are not
    renormalised)."""
    n, c, h, w = x.shape
    width = 2 * radius + 1
    taps = torch.exp(-(torch.arange(width, dtype=torch.float64) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    radians = torch.deg2rad(angles.double().cpu())
    point_y, point_x = width * torch.sin(radians), width * torch.cos(radians)
    hypot = torch.hypot(point_y, point_x)
    flat = x.flatten(2)
    blurred = torch.zeros_like(flat)
    stopped = torch.zeros(n, dtype=torch.bool)
    for i in range(width):
        dy = -torch.ceil(i * point_y / hypot - 0.5).long()
        dx = -torch.ceil(i * point_x / hypot - 0.5).long()
        stopped |= (dy.abs() >= h) | (dx.abs() >= w)
        rows = (torch.arange(h)[None] - dy[:, None]).clamp(0, h - 1)
        cols = (torch.arange(w)[None] - dx[:, None]).clamp(0, w - 1)
        index = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).to(x.device)
        weight = (taps[i] * (~stopped).double()).to(x)
        blurred += weight[:, None, None] * flat.gather(2, index.expand(n, c, h * w))
    return blurred.view(n, c, h, w)


def plasma_fractal(count: int, size: int, decay: float, generator: torch.Generator) -> Tensor:
    """``count`` diamond-square height maps ``(count, size, size)`` in [0, 1] (``size`` a power of
    two; the package's ``plasma_fractal``, one map per image): each level's offsets are uniform
    in ``+-wibble**2``, ``wibble`` starting at 100 and divided by ``decay`` per level."""
    field = torch.zeros(count, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled(total: Tensor) -> Tensor:
        return total / 4 + wibble * (torch.rand(total.shape, generator=generator, dtype=torch.float64) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = field[:, ::step, ::step]
        squares = corners + corners.roll(-1, 1)
        field[:, half::step, half::step] = wibbled(squares + squares.roll(-1, 2))
        centres, corners = field[:, half::step, half::step], field[:, ::step, ::step]
        field[:, ::step, half::step] = wibbled(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        field[:, half::step, ::step] = wibbled(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    low = field.flatten(1).amin(1)[:, None, None]
    high = field.flatten(1).amax(1)[:, None, None]
    return (field - low) / (high - low).clamp_min(1e-12)


def _next_power_of_two(value: int) -> int:
    return 1 << max(1, (value - 1).bit_length())


def _gray(x: Tensor, weights: tuple[float, float, float]) -> Tensor:
    """Luma ``(N, 1, H, W)`` of RGB images; a one-channel image is its own gray."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    return sum(w * x[:, i : i + 1] for i, w in enumerate(weights))  # type: ignore[return-value]


def _quantize(x: Tensor) -> Tensor:
    """Rounded to the 256 levels of a uint8 image (the package rounds its snow layer so)."""
    return (x.clamp(0, 1) * 255).round() / 255


# ---------------------------------------------------------------------------------------------
# the corruptions: float images (N, C, H, W) in [0, 1], a severity in 1-5, a generator


def gaussian_noise(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    scale = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return x + _normal(tuple(x.shape), 0.0, scale, generator, x)


def shot_noise(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    photons = (60, 25, 12, 5, 3)[severity - 1]
    rates = (x.double().cpu() * photons).clamp_min(0)
    return (torch.poisson(rates, generator=generator) / photons).to(x)


def impulse_noise(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    flipped = _uniform(tuple(x.shape), 0, 1, generator, x) < amount
    salt = _uniform(tuple(x.shape), 0, 1, generator, x) < 0.5
    return torch.where(flipped, salt.to(x.dtype), x)


def disk_kernel(radius: int, alias_blur: float) -> Tensor:
    """The package's anti-aliased disk: a disk of ``radius`` on a grid of at least 17x17,
    normalised, then blurred by OpenCV's ``GaussianBlur`` (3x3, or 5x5 past radius 8)."""
    half, size = (8, 3) if radius <= 8 else (radius, 5)
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    taps = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * alias_blur**2))
    taps = taps / taps.sum()
    blurred = filter2d(disk[None, None], taps[:, None], "reflect101")
    return filter2d(blurred, taps[None, :], "reflect101")[0, 0]


def defocus_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    radius, alias_blur = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    return filter2d(x, disk_kernel(radius, alias_blur), "reflect101")


def glass_shuffle(count: int, h: int, w: int, delta: int, iterations: int, generator: torch.Generator) -> np.ndarray:
    """The glass blur's local shuffle as one permutation per image ``(count, h * w)``: pixel
    ``k`` of the result is pixel ``source[k]`` of the input. Each pass visits the pixels from the
    bottom right to ``delta + 1`` from the top left and swaps each with one offset by
    ``[-delta, delta)`` rows and columns; the swaps are sequential, so they run in a loop (NumPy:
    three times faster than torch ops here), vectorised over the images only."""
    positions = [
        (i, j) for _ in range(iterations) for i in range(h - delta, delta, -1) for j in range(w - delta, delta, -1)
    ]
    source = np.tile(np.arange(h * w), (count, 1))
    if not positions:
        return source
    where = torch.tensor(positions)
    offsets = torch.randint(-delta, delta, (len(positions), 2, count), generator=generator)  # (dx, dy) per swap
    here = (where[:, 0] * w + where[:, 1]).numpy()
    there = ((where[:, :1] + offsets[:, 1]) * w + where[:, 1:] + offsets[:, 0]).numpy()
    images = np.arange(count)
    for k in range(len(positions)):
        moved = source[:, here[k]].copy()
        source[:, here[k]] = source[images, there[k]]
        source[images, there[k]] = moved
    return source


def glass_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    sigma, delta, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    n, c, h, w = x.shape
    smoothed = (gaussian_smooth(x, sigma) * 255).floor() / 255  # the package's np.uint8 in between
    source = torch.from_numpy(glass_shuffle(n, h, w, delta, iterations, generator))
    source = source.to(x.device)[:, None].expand(n, c, h * w)
    shuffled = smoothed.flatten(2).gather(2, source).view(n, c, h, w)
    return gaussian_smooth(shuffled, sigma)


def motion_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    angles = torch.rand(len(x), generator=generator, dtype=torch.float64) * 90 - 45
    return motion_blur_kernel(x, radius, sigma, angles)


def zoom_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    start, stop, step = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))[
        severity - 1
    ]
    factors = np.arange(start, stop, step)  # NumPy's float steps: 12, 16, 11, 13 and 11 factors
    h, w = x.shape[-2:]
    total = sum(clipped_zoom(x, float(f))[..., :h, :w] for f in factors)
    return (x + total) / (len(factors) + 1)


def snow(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    mean, std, zoom, threshold, radius, sigma, keep = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[severity - 1]
    n, _, h, w = x.shape
    flakes = clipped_zoom(_normal((n, 1, h, w), mean, std, generator, x), zoom)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)
    angles = torch.rand(n, generator=generator, dtype=torch.float64) * 90 - 135
    flakes = _quantize(motion_blur_kernel(flakes, radius, sigma, angles))[..., :h, :w]
    lifted = torch.maximum(x, _gray(x, (0.299, 0.587, 0.114)) * 1.5 + 0.5)
    return keep * x + (1 - keep) * lifted + flakes + flakes.flip(-2, -1)


#: Reconstructed frost: per photo of the package (frost1-5; frost6 is never drawn), measured on
#: random 32x32 crops after its 1.1x upscaling: the mean RGB colour, the pixel spread within a
#: crop and the spread of the crop's mean brightness between crops.
FROST_PHOTOS: tuple[tuple[tuple[float, float, float], float, float], ...] = (
    ((0.305, 0.585, 0.650), 0.043, 0.058),
    ((0.787, 0.805, 0.841), 0.058, 0.060),
    ((0.787, 0.805, 0.841), 0.060, 0.055),
    ((0.540, 0.599, 0.648), 0.080, 0.064),
    ((0.441, 0.484, 0.528), 0.120, 0.113),
)


def frost_layer(count: int, channels: int, h: int, w: int, generator: torch.Generator) -> Tensor:
    """Reconstructed frost ``(count, channels, h, w)``: a photo drawn per image, its colour shifted
    by a random brightness, plus a plasma-fractal texture of the photo's spread."""
    photo = torch.randint(len(FROST_PHOTOS), (count,), generator=generator)
    colour = torch.tensor([p[0] for p in FROST_PHOTOS], dtype=torch.float64)[photo]  # (count, 3)
    spread = torch.tensor([p[1] for p in FROST_PHOTOS], dtype=torch.float64)[photo]
    shift = torch.tensor([p[2] for p in FROST_PHOTOS], dtype=torch.float64)[photo]
    texture = plasma_fractal(count, _next_power_of_two(max(h, w)), 1.5, generator)[:, :h, :w]
    texture = (texture - texture.mean((1, 2), keepdim=True)) / texture.std((1, 2), keepdim=True).clamp_min(1e-12)
    offset = torch.randn(count, generator=generator, dtype=torch.float64) * shift
    layer = colour[:, :, None, None] + (offset[:, None, None, None] + spread[:, None, None, None] * texture[:, None])
    if channels != 3:
        layer = _gray(layer, (0.2989, 0.5870, 0.1140)).expand(count, channels, h, w)
    return layer.clamp(0, 1)


def frost(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    keep, amount = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
    n, c, h, w = x.shape
    return keep * x + amount * frost_layer(n, c, h, w, generator).to(x)


def fog(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    amount, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    n, _, h, w = x.shape
    haze = plasma_fractal(n, _next_power_of_two(max(h, w)), decay, generator)[:, None, :h, :w].to(x)
    brightest = x.flatten(1).amax(1)[:, None, None, None]
    return (x + amount * haze) * brightest / (brightest + amount)


def brightness(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    shift = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    value = x.amax(1, keepdim=True)
    raised = (value + shift).clamp(0, 1)
    return torch.where(value > 0, x * raised / value.clamp_min(1e-12), raised)


def contrast(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    means = x.mean((2, 3), keepdim=True)
    return (x - means) * factor + means


def elastic_transform(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    alpha = 250 * (0.05, 0.065, 0.085, 0.1, 0.12)[severity - 1]
    n, c, h, w = x.shape
    sigma, most = (h * 0.01, w * 0.01), h * 0.005

    def displacement() -> Tensor:
        field = _uniform((n, 1, h, w), -most, most, generator, x).to(x.dtype)
        return gaussian_smooth(field, sigma, truncate=3, mode="symmetric")[:, 0] * alpha

    dx, dy = displacement(), displacement()
    rows = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None] + dy
    cols = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :] + dx
    return bilinear_sample(x, rows, cols)


def bilinear_sample(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``x (N, C, H, W)`` at fractional ``rows, cols (N, H, W)``, order-1 with a symmetric border
    (SciPy's ``map_coordinates(order=1, mode="reflect")``)."""
    n, c, h, w = x.shape
    top, left = rows.floor(), cols.floor()
    down, right = (rows - top)[:, None], (cols - left)[:, None]
    top, left = top.long(), left.long()
    flat = x.flatten(2)

    def at(r: Tensor, k: Tensor) -> Tensor:
        index = border_index(r, h, "symmetric") * w + border_index(k, w, "symmetric")
        return flat.gather(2, index.flatten(1)[:, None].expand(n, c, h * w)).view(n, c, h, w)

    upper = at(top, left) * (1 - right) + at(top, left + 1) * right
    lower = at(top + 1, left) * (1 - right) + at(top + 1, left + 1) * right
    return upper * (1 - down) + lower * down


def pixelate(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = x.shape[-2:]
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    return _through_pil(x, lambda image: image.resize(small, Image.BOX).resize((w, h), Image.NEAREST))


def jpeg_compression(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    quality = (25, 18, 15, 10, 7)[severity - 1]

    def compress(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=quality)  # gray goes through RGB, as the package
        return Image.open(buffer).convert(image.mode)

    return _through_pil(x, compress)


def _through_pil(x: Tensor, operation: Callable[[Image.Image], Image.Image]) -> Tensor:
    """``operation`` applied by PIL to each image of ``x`` as 8-bit gray or RGB, as the package does."""
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels):
        result = np.asarray(operation(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)))
        out[i] = result.reshape(image.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


CORRUPTIONS: dict[str, CorruptionFn] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


def corrupt(images: Tensor, name: str, severity: int, generator: torch.Generator) -> Tensor:
    """``images (N, C, H, W)`` corrupted by ``name`` at ``severity`` (1-5), with fresh random
    draws per image from ``generator`` (a CPU generator). uint8 images come back uint8, truncated
    as ``imagecorruptions`` truncates; float images in [0, 1] come back float, clipped."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{name}'; valid: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= SEVERITIES:
        raise ValueError(f"corruption severity must be 1-{SEVERITIES}, got {severity}")
    if images.dim() != 4:
        raise ValueError(f"corruptions take images (N, C, H, W), got shape {tuple(images.shape)}")
    floats = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    out = CORRUPTIONS[name](floats, severity, generator).clamp(0, 1)
    if images.dtype == torch.uint8:  # 1e-4 keeps exact levels (k / 255 * 255) from truncating to k - 1
        return (out * 255 + 1e-4).floor().to(torch.uint8)
    return out.to(images.dtype)


__all__ = ["COMMON_CORRUPTIONS", "CORRUPTIONS", "SEVERITIES", "Corruption", "corrupt"]

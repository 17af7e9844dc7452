"""Low Frequency (Zeng, Park, Mao, Jia 2021, "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV; code ``YiZeng623/frequency-backdoor``, ``Sec5_Smooth_Trigger/``): a universal
adversarial perturbation kept to low frequencies by a Gaussian filter, added to the image.

The trigger is a fixed pattern ``v`` in [0, 0.2] (0 to 51 levels) added to the image, clamped (BackdoorBench's
``SimpleAdditiveTrigger`` with ``npClipAndToUint8``, ``utils/bd_img_transform/patch.py``). Two
sources for ``v``:

- BackdoorBench's precomputed patterns (``attack/lf.py``: ``resource/lowFrequency/<dataset>_<model>
  _0_255.npy``, read as ``<data root>/backdoorbench/lowFrequency/``; ``pattern`` names it as
  ``"<dataset>_<model>"``, default ``"cifar10_preactresnet18"``, its CIFAR-10 victim), added as they
  are, so a pattern must have the images' size and channels (32x32 RGB: CIFAR-10 and GTSRB).
- ``pattern="generate"``: fitted on a surrogate (:meth:`LowFrequency.fit`; ``run`` trains it with
  the run's model and recipe on the attacker's clean data) by the paper's procedure, as
  BackdoorBench's ``resource/lowFrequency/{generate_pattern,universal_pert,deepfool,gauss_smooth}
  .py`` run it: over ``images`` (100) clean training images, each image ``v`` does not yet fool
  gets a targeted DeepFool perturbation ``r`` towards the target from ``x + v``, and ``v <-
  normalise(smooth(v + smooth(r)))`` (``smooth``: a Gaussian of sigma 6 px; ``normalise``: to
  [0, 0.2]), for at most ``passes`` (50) passes, until ``v`` fools ``fooling_rate`` (20%, the
  code's ``delta = 0.8``) of them or the last five passes' rates lie within 0.01.

Stated or reconstructed (details: docs/attacks.md, "Low Frequency"):
- BackdoorBench's float patterns (``vgg19_bn``, ``convnext_tiny``, ``vit_b_16``) are in 0-1 units,
  which it adds unscaled to 0-255 pixels; here they are scaled by 255 to pixel units;
- pixels are rounded where BackdoorBench truncates (the same on its stored uint8 patterns);
- ``"generate"`` measures the fooling rate on the attacker's images (the official code's
  choice), keeps the last ``v`` with the run's target (BackdoorBench's) and truncates ``v`` to
  whole pixel levels, as BackdoorBench's stored patterns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.attacks.triggers import ATTACKS, RESOURCES, Trigger, resource_path
from backdoorlab.models.classifier import model_device
from backdoorlab.options import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt

#: The value of ``pattern`` that fits a pattern on a surrogate instead of reading a stored one.
GENERATE = "generate"
#: The resource name (:data:`RESOURCES`) of a stored pattern ``"<dataset>_<model>"``.
RESOURCE_PREFIX = "lf_"


def stored_patterns() -> list[str]:
    """The ``pattern`` values that name one of BackdoorBench's stored patterns."""
    return sorted(name.removeprefix(RESOURCE_PREFIX) for name in RESOURCES if name.startswith(RESOURCE_PREFIX))


def read_pattern(path: str | Path) -> Tensor:
    """A stored pattern file as float ``(C, H, W)`` in [0, 1] units: uint8 files hold pixel levels
    (0-255); float files with values in [0, 1] hold 0-1 units (BackdoorBench's ``vgg19_bn``,
    ``convnext_tiny``, ``vit_b_16``); a leading batch axis is dropped and a 2-D pattern is
    repeated over three channels, as ``bd_attack_generate.py`` reads them."""
    array = np.load(path)
    if array.ndim == 4:
        array = array[0]
    elif array.ndim == 2:
        array = np.stack((array,) * 3, axis=-1)
    elif array.ndim != 3:
        raise ValueError(f"a Low Frequency pattern has 2, 3 or 4 dimensions, {path} has {array.ndim}")
    pattern = torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1).contiguous()
    in_pixels = array.dtype == np.uint8 or float(array.max()) > 1.0
    return pattern / 255.0 if in_pixels else pattern


def gaussian_low_pass(x: Tensor, sigma: float = 6.0) -> Tensor:
    """The paper's low-pass filter on ``(N, C, H, W)``: a separable Gaussian of ``sigma`` px over
    ``round(5 sigma)`` taps (30 at sigma 6), zero padding, the output the input's size (the
    official ``gauss_smooth``: ``sig * size_denom`` taps, padded ``taps // 2`` after and one less
    before where the count is even)."""
    taps = max(1, round(5 * sigma))
    grid = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x)
    after = taps // 2
    before = after - (1 - taps % 2)
    channels = x.shape[1]
    out = F.pad(x, (before, after, before, after))
    out = F.conv2d(out, kernel.view(1, 1, taps, 1).expand(channels, 1, taps, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, 1, taps).expand(channels, 1, 1, taps), groups=channels)


def _rescale(v: Tensor, peak: float) -> Tensor:
    """``v`` min-max rescaled to [0, peak] over all its values (the official ``normalization``);
    a constant ``v`` (nothing learnt yet) is left as it is rather than divided by zero."""
    spread = v.max() - v.min()
    return v if spread <= 0 else (v - v.min()) / spread * peak


def targeted_deepfool(
    model: nn.Module, x: Tensor, target: int, overshoot: float = 0.02, max_steps: int = 200
) -> tuple[Tensor, int]:
    """Targeted DeepFool (the official ``tar_deepfool``) on one image ``x`` ``(C, H, W)``: steps
    along the gradient of ``f_target - f_top`` (logits; ``top`` the class of ``x``), each just
    far enough to close that gap linearly, until the class is ``target``. Returns the
    perturbation ``(1 + overshoot) r`` and the number of steps taken."""
    total = torch.zeros_like(x)
    point, top, steps = x, None, 0
    while True:
        point = point.detach().requires_grad_(True)
        logits = model(point[None])[0]
        if top is None:
            top = int(logits.argmax())
        if int(logits.argmax()) == target or steps >= max_steps:
            break
        gap = logits[target] - logits[top]
        (grad,) = torch.autograd.grad(gap, point)
        step = gap.detach().abs() / grad.square().sum() * grad
        total = total + torch.where(torch.isfinite(step).all(), step, torch.zeros_like(step))
        point = x + (1 + overshoot) * total
        steps += 1
    return ((1 + overshoot) * total).detach(), steps


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


def universal_low_frequency(
    model: nn.Module,
    images: Tensor,
    target: int,
    *,
    passes: int = 50,
    fooling_rate: float = 0.2,
    deepfool_steps: int = 200,
    overshoot: float = 0.02,
    sigma: float = 6.0,
    peak: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The paper's low-frequency universal perturbation ``v`` ``(C, H, W)`` in [0, ``peak``] for
    ``model`` (in eval mode) on float ``images`` ``(N, C, H, W)`` in [0, 1] (module docstring;
    docs/attacks.md, "Low Frequency")."""
    device = model_device(model)
    images = images.to(device)
    v = torch.zeros_like(images[0])
    clean = _predict(model, images)
    rates: list[float] = []
    for _ in range(passes):
        for k in torch.randperm(len(images), generator=generator).tolist():
            if int(_predict(model, (images[k] + v)[None])) != int(clean[k]):
                continue  # already fooled
            r, steps = targeted_deepfool(model, images[k] + v, target, overshoot, deepfool_steps)
            if steps < deepfool_steps - 1:  # converged
                v = _rescale(gaussian_low_pass((v + gaussian_low_pass(r[None], sigma)[0])[None], sigma)[0], peak)
        rates.append(float((_predict(model, images + v) != clean).float().mean()))
        if rates[-1] >= fooling_rate or (len(rates) >= 5 and max(rates[-5:]) - min(rates[-5:]) < 0.01):
            break
    return v.cpu()


@ATTACKS.register("low_frequency", "Low Frequency (Zeng et al. 2021): a smooth universal perturbation, added")
class LowFrequency(Trigger):
    """Add a low-frequency universal adversarial pattern (stored, or fitted on a surrogate).

    Args:
        pattern: ``"<dataset>_<model>"``, BackdoorBench's stored pattern for that dataset and
            victim model (:func:`stored_patterns`; default ``"cifar10_preactresnet18"``), or
            ``"generate"`` to fit one on a surrogate (:meth:`fit`; zero until then).
        images: clean images the perturbation is fitted on (``"generate"``).
        passes: at most this many passes over them.
        fooling_rate: stop once the perturbation changes this share of their predictions.
        deepfool_steps: at most this many DeepFool steps per image; a step that needs them all
            is dropped.
        overshoot: DeepFool's overshoot.
        sigma: the Gaussian low-pass filter's width in pixels (``round(5 sigma)`` taps).
        peak: the pattern's largest value, in pixel units (0.2 of 255).
        data_root: where a stored pattern is read (the run's; default ``$BACKDOORLAB_DATA``); not
            an option.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        pattern: str = "cifar10_preactresnet18",
        images: PositiveInt = 100,
        passes: PositiveInt = 50,
        fooling_rate: Fraction = 0.2,
        deepfool_steps: PositiveInt = 200,
        overshoot: NonNegativeFloat = 0.02,
        sigma: PositiveFloat = 6.0,
        peak: PositiveFloat = 51.0,
        data_root: str | Path | None = None,
    ) -> None:
        self.needs_surrogate = pattern == GENERATE
        super().__init__(input_shape)
        if pattern != GENERATE and pattern not in stored_patterns():
            raise ValueError(
                f"unknown low_frequency pattern '{pattern}'; valid: {', '.join(stored_patterns())}, generate"
            )
        if not 0 < peak <= 255:
            raise ValueError(f"low_frequency peak must be in (0, 255], got {peak}")
        self.pattern = torch.zeros(self.input_shape)  # "generate": zero (no trigger) until fitted
        if pattern != GENERATE:
            self.pattern = read_pattern(resource_path(RESOURCE_PREFIX + pattern, data_root))
            if tuple(self.pattern.shape) != self.input_shape:
                shape = "x".join(map(str, self.pattern.shape))
                raise ValueError(
                    f"low_frequency pattern '{pattern}' is {shape}, the images {'x'.join(map(str, self.input_shape))}: "
                    "BackdoorBench stores 3x32x32 patterns (cifar10, gtsrb); pattern='generate' fits one for any images"
                )
        self.images, self.passes, self.deepfool_steps = int(images), int(passes), int(deepfool_steps)
        self.fooling_rate, self.overshoot = float(fooling_rate), float(overshoot)
        self.sigma, self.peak = float(sigma), float(peak)

    def fit(
        self,
        surrogate: nn.Module,
        generator: torch.Generator | None = None,
        *,
        images: Tensor | None = None,
        target: int = 0,
    ) -> None:
        """Fit the pattern (``pattern="generate"``) on ``surrogate``, a model trained on clean data,
        from ``images`` uint8 ``(N, C, H, W)``, the attacker's clean training images (``run``
        passes them), towards class ``target`` (the run's)."""
        if not self.needs_surrogate:
            self.fitted = True
            return
        if images is None or len(images) == 0:
            raise ValueError(
                "low_frequency pattern='generate' fits on the attacker's clean images: fit(..., images=...)"
            )
        chosen = torch.randperm(len(images), generator=generator)[: self.images]
        was_training = surrogate.training
        surrogate.eval()
        try:
            v = universal_low_frequency(
                surrogate,
                images[chosen].float() / 255.0,
                int(target),
                passes=self.passes,
                fooling_rate=self.fooling_rate,
                deepfool_steps=self.deepfool_steps,
                overshoot=self.overshoot,
                sigma=self.sigma,
                peak=self.peak / 255.0,
                generator=generator,
            )
        finally:
            surrogate.train(was_training)
        self.pattern = (v * 255.0 + 1e-4).floor() / 255.0  # whole pixel levels, as the stored uint8 patterns
        self.fitted = True

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.pattern.to(x.device)

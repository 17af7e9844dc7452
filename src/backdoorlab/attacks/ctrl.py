"""CTRL (Li, Pang, Xi, Du, Ji, Yao, Wang 2023, "An Embarrassingly Simple Backdoor Attack on
Self-supervised Learning", ICCV; code ``meet-cjli/CTRL``, ``utils/frequency.py``, ``PoisonFre.
Poison_Frequency_Diff``): a trigger in the DCT spectrum of the image's chroma.

The image (0-255) goes to YUV with kornia's ``rgb_to_yuv`` matrix; each ``window x window`` block
of the U and V channels gets ``magnitude`` added to its orthonormal DCT-II coefficients at
``(p, p)`` for each ``p`` of ``positions``; the inverse DCT and kornia's ``yuv_to_rgb`` (the
rounded constants of both, so that the round trip is the reference's, not an exact inverse) give
the image back, clamped to [0, 1]. Defaults as the official command line and BackdoorBench:
magnitude 100, positions (15, 31) (two coefficients on the diagonal: one in the middle, the
highest), channels (1, 2) (U, V), window 32 (the whole CIFAR-10 image).

BackdoorBench runs it on supervised victims (``attack/ctrl.py``; ``utils/bd_img_transform/
ctrl.py``, the same ``PoisonFre`` with ``magnitude = 100`` hard-coded and ``window_size =
img_size[0]``; ``config/attack/ctrl/default.yaml``: ``use_yuv: True``, ``use_dct: False`` (the
FFT-based orthonormal DCT, equal to the matrix one used here), ``trigger_channels: [1, 2]``,
``pos_list: [15, 31]``, ``use_clean_label: True``, ``pratio: 0.05``). It is clean-label, as the
official code (which poisons target-class images only): ``pratio 0.05`` is 5% of the *training
set*, all drawn from the target class (half of CIFAR-10's class 0), ``poison_rate=0.05`` with
the default ``poison_rate_of="train"`` here.

Reconstructed: at sizes other than 32 px the window is the image side (BackdoorBench's
``img_size[0]``) and the positions default to ``(w/2 - 1, w - 1)`` for window ``w`` (15 and 31
at 32 px; BackdoorBench's fixed 15 and 31 fall outside a 28 px image). A 1-channel image is its
own luma: U and V of a grey image are zero and cannot be stored in it, so the trigger goes into
the one channel (``channels`` (0,), no colour conversion). Stated differences from BackdoorBench:
it casts the result to uint8 *before* clamping (``x_train.to(torch.uint8)``), so pixels pushed
below 0 or above 255 wrap around (-3 becomes 253) and the rest are truncated; here they are
clamped (as the official code) and rounded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from backdoorlab.attacks.frequency import block_dct, block_idct
from backdoorlab.attacks.triggers import ATTACKS, Trigger
from backdoorlab.options import NonNegativeInt, PositiveFloat, PositiveInt

#: kornia's ``rgb_to_yuv`` and ``yuv_to_rgb`` (``kornia/color/yuv.py``), as the reference codes
#: convert; the second is kornia's rounded inverse of the first, not its exact one.
RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]])
YUV_TO_RGB = torch.tensor([[1.0, 0.0, 1.14], [1.0, -0.396, -0.581], [1.0, 2.029, 0.0]])


def _mix(x: Tensor, matrix: Tensor) -> Tensor:
    """Apply a 3x3 colour matrix to ``(N, 3, H, W)`` images."""
    return torch.einsum("ij,njhw->nihw", matrix.to(x), x)


@ATTACKS.register("ctrl", "CTRL (Li et al. 2023): a chroma DCT trigger (U, V), clean-label")
class CTRL(Trigger):
    """Add ``magnitude`` at DCT coefficients ``(p, p)`` of each window of the chosen YUV channels.

    Args:
        magnitude: the value added to each coefficient, in 0-255 pixel units (orthonormal DCT).
        positions: the diagonal coefficients ``p`` (each < ``window``); default ``(w/2 - 1, w - 1)``.
        channels: the YUV channels that get the trigger; default (1, 2) (U and V), (0,) on grey.
        window: the DCT block side; default the image side (one block).
        yuv: convert RGB to YUV first (ignored on 1-channel images, which are their own Y).
    """

    clean_label = True

    def __init__(
        self,
        input_shape: tuple[int, ...],
        magnitude: PositiveFloat = 100.0,
        positions: tuple[NonNegativeInt, ...] | None = None,
        channels: tuple[NonNegativeInt, ...] | None = None,
        window: PositiveInt | None = None,
        yuv: bool = True,
    ) -> None:
        super().__init__(input_shape)
        c, h, w = self.input_shape
        if c not in (1, 3):
            raise ValueError(f"CTRL works on grey or RGB images, got {c} channels")
        if window is None and h != w:
            raise ValueError(f"CTRL's default window is the image side; give window for {h}x{w} images")
        window = h if window is None else int(window)
        if h % window or w % window:
            raise ValueError(f"CTRL window {window} must tile the {h}x{w} images")
        positions = (window // 2 - 1, window - 1) if positions is None else tuple(int(p) for p in positions)
        if not positions or not all(0 <= p < window for p in positions):
            raise ValueError(f"CTRL positions must be in 0..{window - 1} (the window's coefficients), got {positions}")
        channels = ((1, 2) if c == 3 else (0,)) if channels is None else tuple(int(k) for k in channels)
        if not channels or not all(0 <= k < c for k in channels):
            raise ValueError(f"CTRL channels must be in 0..{c - 1} for {c}-channel images, got {channels}")
        self.magnitude, self.positions, self.channels, self.window = float(magnitude), positions, channels, window
        self.yuv = bool(yuv) and c == 3
        self.mark = self._mark()
        self._resolve_options(positions=positions, channels=channels, window=window)

    def _mark(self) -> Tensor:
        """The coefficients added: ``magnitude`` at each ``(p, p)`` of every window of the
        chosen channels, zero elsewhere (``(C, H, W)``, pixel units)."""
        mark = torch.zeros(self.input_shape)
        for p in self.positions:
            mark[list(self.channels), p :: self.window, p :: self.window] += self.magnitude
        return mark

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        out = x * 255.0
        if self.yuv:
            out = _mix(out, RGB_TO_YUV)
        out = block_idct(block_dct(out, self.window) + self.mark.to(out), self.window)
        if self.yuv:
            out = _mix(out, YUV_TO_RGB)
        return out / 255.0

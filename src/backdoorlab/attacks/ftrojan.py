"""FTrojan (Wang, Yao, Xu, An, Tong, Wang 2022, "An Invisible Black-box Backdoor Attack through
Frequency Domain", ECCV; code ``SoftWiser-group/FTrojan``, ``data.py`` ``poison_frequency`` and
``image.py``; BackdoorBench ``utils/bd_img_transform/ftrojann.py``, ``attack/ftrojann.py`` and
``config/attack/ftrojannn/default.yaml``).

Images go to YCrCb (OpenCV's ``COLOR_RGB2YCrCb``: channel 0 luma, 1 and 2 the chroma the paper
calls UV), each channel is cut into ``window_size`` square blocks, and ``magnitude`` (0-255 pixel
units) is added to the orthonormal 2-D DCT-II coefficients (``cv2.dct``'s) at ``positions`` of
every block of the chosen channels; the inverse DCT and the inverse colour transform give the
poisoned image, clipped. The DCT, the addition and the inverse DCT are linear, and the colour
transform is affine and exactly inverted, so the trigger is one fixed additive pattern (the inverse
DCT of the added spectrum, tiled over the blocks and taken back to RGB), computed once.

Defaults are the official code's CIFAR-10 setting (``train.py``): channels 1 and 2, window 32,
positions (15, 15) (mid frequency) and (31, 31) (high), magnitude 20; BackdoorBench's yaml is the
same but for magnitude 30, which the ``backdoorbench`` preset sets.

Reconstructed: at other sizes the default window is 32 where both image sides are multiples of 32,
else the whole (square) image, and the default positions keep their place in the window,
``(w / 2 - 1, w / 2 - 1)`` and ``(w - 1, w - 1)`` (28 px: 13 and 27), as neither code runs
FTrojan below 32 px (BackdoorBench's positions index past a 28 px window). Grey images have no
chroma: the trigger goes into their one channel, the luma, without a colour transform. The inverse
colour transform is the exact inverse of OpenCV's forward matrix (its rounded inverse
coefficients differ by under 0.1%), and OpenCV's chroma offset of 128 cancels in it.

Stated difference: both codes round-trip through 8-bit YCrCb (``cv2.cvtColor`` on uint8, and
``astype(np.uint8)``, which truncates, on the inverse DCT's output); here the transform is exact in
floating point and the result is rounded to 8 bits once, so the trigger is the additive pattern
the DCT formula gives, without the truncation's bias of about half a level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from backdoorlab.attacks.frequency import block_idct
from backdoorlab.attacks.triggers import ATTACKS, Trigger
from backdoorlab.options import NonNegativeInt, PositiveFloat, PositiveInt

#: OpenCV's RGB -> YCrCb: Y = 0.299 R + 0.587 G + 0.114 B, Cr = 0.713 (R - Y), Cb = 0.564 (B - Y).
RGB_TO_YCRCB = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.713 * (1 - 0.299), -0.713 * 0.587, -0.713 * 0.114],
        [-0.564 * 0.299, -0.564 * 0.587, 0.564 * (1 - 0.114)],
    ],
    dtype=torch.float64,
)
#: Its exact inverse (OpenCV's YCrCb -> RGB rounds it: R = Y + 1.403 (Cr - 128), ...).
YCRCB_TO_RGB = torch.linalg.inv(RGB_TO_YCRCB)


def default_window(height: int, width: int) -> int:
    """32 where both sides are multiples of 32 (the codes' window), else the whole square image."""
    if height % 32 == 0 and width % 32 == 0:
        return 32
    if height == width:
        return height
    raise ValueError(f"FTrojan on {height}x{width} images needs a window_size that divides both sides")


@ATTACKS.register("ftrojan", "FTrojan (Wang et al. 2022): mid and high DCT frequencies of the UV channels")
class FTrojan(Trigger):
    """Add ``magnitude`` at chosen block-DCT frequencies of chosen (YCrCb) channels.

    Args:
        magnitude: added to each chosen DCT coefficient, in 0-255 pixel units (orthonormal DCT).
        channels: the channels to poison (default 1 and 2, the chroma; 0 for grey images).
        yuv: poison YCrCb channels (True, as both codes) or RGB ones; grey images have no colours.
        window_size: the DCT block side; it must divide both image sides (default: 32, or the image).
        positions: ``[row, column]`` frequencies within a block (default: the window's middle and
            last, (15, 15) and (31, 31) at 32).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        magnitude: PositiveFloat = 20.0,
        channels: Sequence[NonNegativeInt] | None = None,
        yuv: bool = True,
        window_size: PositiveInt | None = None,
        positions: Sequence[Sequence[NonNegativeInt]] | None = None,
    ) -> None:
        super().__init__(input_shape)
        c, h, w = self.input_shape
        if yuv and c not in (1, 3):
            raise ValueError(f"FTrojan's yuv needs RGB (3-channel) or grey images, got {c} channels; set yuv=False")
        window = default_window(h, w) if window_size is None else int(window_size)
        if h % window or w % window:
            raise ValueError(f"FTrojan's window_size {window} does not divide {h}x{w} images")
        chosen = ([1, 2] if c == 3 else [0]) if channels is None else [int(ch) for ch in channels]
        if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= ch < c for ch in chosen):
            raise ValueError(f"FTrojan's channels must be distinct channels in 0..{c - 1}, got {chosen}")
        middle, last = window // 2 - 1, window - 1
        spots = [[middle, middle], [last, last]] if positions is None else [[int(v) for v in p] for p in positions]
        if not spots or not all(len(p) == 2 and 0 <= min(p) and max(p) < window for p in spots):
            raise ValueError(f"FTrojan's positions must be [row, column] pairs in 0..{window - 1}, got {spots}")
        spectrum = torch.zeros(c, h, w, dtype=torch.float64)  # the added coefficients, block by block
        for row, column in spots:
            spectrum[chosen, row::window, column::window] += float(magnitude) / 255.0
        planes = block_idct(spectrum, window)
        self.colour = bool(yuv) and c == 3
        # the colour transform is affine and exactly inverted, so a change in YCrCb is YCRCB_TO_RGB times it
        self.pattern = torch.einsum("cd,dhw->chw", YCRCB_TO_RGB, planes) if self.colour else planes
        self._resolve_options(channels=chosen, window_size=window, positions=spots)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.pattern.to(x.device, x.dtype)

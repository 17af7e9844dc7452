"""Padding images to a multiple of a network's stride and cropping them back, so that the reference
generators built for 32 px (LIRA's autoencoder, SSBA's StegaStamp networks, four stride-2 steps)
take images of any size (reconstructed: zeros, which are the data's mean in normalised units)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

#: ``(top, left, height, width)`` of the original image inside the padded one.
Box = tuple[int, int, int, int]


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, Box]:
    """``x`` ``(N, C, H, W)`` zero-padded, centred, to sides divisible by ``multiple``, and the box
    that :func:`crop` cuts the original size back out with."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    top, left = pad_h // 2, pad_w // 2
    return F.pad(x, (left, pad_w - left, top, pad_h - top)), (top, left, h, w)


def crop(x: Tensor, box: Box) -> Tensor:
    """The ``box`` of :func:`pad_to_multiple` cut out of ``x``'s last two dimensions."""
    top, left, h, w = box
    return x[..., top : top + h, left : left + w]

"""Frequency-domain helpers for triggers that work on DCT coefficients (CTRL, FTrojan).

A batched, orthonormal 2-D DCT-II over non-overlapping square blocks, as matrix products (no
Python loop over images, channels or blocks): ``block_dct(x, b)`` transforms each ``b x b`` block
of the last two dimensions, ``block_idct`` inverts it exactly. Orthonormal is scipy's and
``cv2.dct``'s ``norm="ortho"`` convention, which the reference codes use (CTRL's ``dct_2d(...,
norm='ortho')``; OpenCV's ``cv2.dct`` for FTrojan).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` (``n x n``): ``D @ v`` is the DCT of a vector ``v``,
    ``D.T @ c`` its inverse. ``D[k, i] = s_k cos(pi (2 i + 1) k / 2n)``, ``s_0 = sqrt(1/n)``,
    ``s_k = sqrt(2/n)``."""
    if n < 1:
        raise ValueError(f"a DCT needs n >= 1, got {n}")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(dtype=dtype, device=device)


def _blocks(x: Tensor, block: int) -> Tensor:
    """``(..., H, W)`` as ``(..., H/b, W/b, b, b)`` (a view where possible)."""
    h, w = x.shape[-2:]
    if block < 1 or h % block or w % block:
        raise ValueError(f"DCT blocks of {block} px must tile the {h}x{w} images")
    x = x.reshape(*x.shape[:-2], h // block, block, w // block, block)
    return x.transpose(-3, -2)


def _unblocks(x: Tensor) -> Tensor:
    """The inverse of :func:`_blocks`."""
    rows, cols, block = x.shape[-4], x.shape[-3], x.shape[-1]
    return x.transpose(-3, -2).reshape(*x.shape[:-4], rows * block, cols * block)


def block_dct(x: Tensor, block: int) -> Tensor:
    """The orthonormal 2-D DCT-II of each ``block x block`` tile of the last two dimensions of
    ``x`` (any leading batch and channel dimensions); coefficient ``(u, v)`` of the tile at rows
    ``r..r+b`` sits at ``(r + u, c + v)``, as the reference codes lay it out."""
    d = dct_matrix(block, x.dtype, x.device)
    return _unblocks(d @ _blocks(x, block) @ d.T)


def block_idct(x: Tensor, block: int) -> Tensor:
    """The inverse of :func:`block_dct` (orthonormal: the transpose)."""
    d = dct_matrix(block, x.dtype, x.device)
    return _unblocks(d.T @ _blocks(x, block) @ d)

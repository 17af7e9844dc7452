"""FTrojan (``attacks/ftrojan.py``): the block-DCT trigger by hand and against scipy's DCT, the
defaults at 28 and 32 px, the checks, and a backdoor that takes on digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from backdoorlab.attacks import create_trigger
from backdoorlab.experiments import RunConfig, run

#: OpenCV's RGB -> YCrCb without the chroma offset (which cancels in a difference).
RGB_TO_YCRCB = np.array(
    [
        [0.299, 0.587, 0.114],
        [0.713 * 0.701, -0.713 * 0.587, -0.713 * 0.114],
        [-0.564 * 0.299, -0.564 * 0.587, 0.564 * 0.886],
    ]
)


def images(n: int = 4, shape: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_ftrojan_adds_the_inverse_dct_of_its_spectrum_by_hand():
    """8x8 grey-128 RGB image, window 8, default positions (3, 3) and (7, 7), magnitude 20: each
    chroma channel changes by ``20/255 sum a_u a_v cos(pi (2i+1) u / 16) cos(pi (2j+1) v / 16)``
    (``a`` = 1/2 for u > 0), taken to RGB with OpenCV's inverse coefficients
    (R = Y + 1.403 Cr, G = Y - 0.714 Cr - 0.344 Cb, B = Y + 1.773 Cb)."""
    trigger = create_trigger("ftrojan", (3, 8, 8), window_size=8)
    assert trigger.config()["positions"] == [[3, 3], [7, 7]]
    x = torch.full((1, 3, 8, 8), 128 / 255, dtype=torch.float64)
    out = trigger.apply(x, None)[0] - x[0]

    def basis(i: int, j: int) -> float:
        return sum(
            0.25 * math.cos(math.pi * (2 * i + 1) * u / 16) * math.cos(math.pi * (2 * j + 1) * u / 16) for u in (3, 7)
        )

    chroma = torch.tensor([[20 / 255 * basis(i, j) for j in range(8)] for i in range(8)], dtype=torch.float64)
    expected = torch.stack([1.403 * chroma, (-0.714 - 0.344) * chroma, 1.773 * chroma])
    assert torch.allclose(out, expected, atol=1e-4)
    assert out.abs().max() > 0.02  # about 10 levels at the corners: not a vacuous comparison


def test_ftrojan_adds_magnitude_at_the_chosen_frequencies_of_every_block_and_nothing_else():
    """The whole chain against scipy's orthonormal DCT (``cv2.dct``'s): 64x64 images are four
    32 px blocks; in YCrCb only the chroma's (15, 15) and (31, 31) move, by magnitude / 255."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = create_trigger("ftrojan", (3, 64, 64), magnitude=30).apply(x, None)
    change = np.einsum("dc,nchw->ndhw", RGB_TO_YCRCB, (out - x).numpy())
    blocks = change.reshape(2, 3, 2, 32, 2, 32).transpose(0, 1, 2, 4, 3, 5)
    spectrum = scipy.fft.dctn(blocks, axes=(-2, -1), norm="ortho")
    expected = np.zeros_like(spectrum)
    expected[:, 1:, :, :, 15, 15] = expected[:, 1:, :, :, 31, 31] = 30 / 255
    assert np.allclose(spectrum, expected, atol=1e-9)


@pytest.mark.parametrize(
    ("shape", "window", "positions", "channels"),
    [((1, 28, 28), 28, [[13, 13], [27, 27]], [0]), ((3, 32, 32), 32, [[15, 15], [31, 31]], [1, 2])],
)
def test_ftrojan_defaults_shape_range_and_determinism(shape, window, positions, channels):
    trigger = create_trigger("ftrojan", shape)
    config = trigger.config()
    assert (config["window_size"], config["positions"], config["channels"]) == (window, positions, channels)
    x = images(5, shape)
    before = x.clone()
    out = trigger(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, trigger(x, torch.Generator().manual_seed(1)))  # no randomness: a fixed pattern
    assert (out != x).flatten(1).any(1).all()
    assert (out.int() - x.int()).abs().max() <= 8  # invisible: a few levels


def test_ftrojan_in_rgb_changes_only_the_chosen_channel():
    x = images(3, (3, 32, 32))
    out = create_trigger("ftrojan", (3, 32, 32), yuv=False, channels=[2])(x)
    assert torch.equal(out[:, :2], x[:, :2]) and not torch.equal(out[:, 2], x[:, 2])


@pytest.mark.parametrize(
    ("shape", "options", "message"),
    [
        ((3, 32, 32), {"window_size": 5}, "does not divide"),
        ((3, 32, 32), {"positions": [[0, 32]]}, "positions"),
        ((3, 32, 32), {"channels": [3]}, "channels"),
        ((2, 32, 32), {}, "yuv"),
        ((3, 28, 32), {}, "window_size"),
    ],
)
def test_ftrojan_refuses_what_does_not_fit(shape, options, message):
    with pytest.raises(ValueError, match=message):
        create_trigger("ftrojan", shape, **options)


def test_ftrojan_backdoor_takes_on_digits():
    """At the default magnitude 20 an 8 px window's pattern is about 5 grey levels, which the small
    CNN does not pick up on digits (measured, seed 0: ASR 0.07; 60: 0.49); at 120 the backdoor takes
    (measured: CA 0.981, ASR 0.941 at 1 thread; 0.989, 0.941 at 2)."""
    config = RunConfig(dataset="digits", attack="ftrojan", attack_options={"magnitude": 120.0}, device="cpu", seed=0)
    result = run(config)
    assert result.metrics["attack_success_rate"] > 0.9 and result.metrics["clean_accuracy"] > 0.93, result.metrics

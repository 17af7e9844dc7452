"""CTRL (attacks/ctrl.py) and the block DCT it is built on (attacks/frequency.py): the transform by
its definition, the trigger against its formula worked out by hand, its properties, BackdoorBench's
settings, and the backdoor taking on digits."""

from __future__ import annotations

import math

import pytest
import torch

from backdoorlab.attacks import create_trigger
from backdoorlab.attacks.frequency import block_dct, block_idct, dct_matrix
from backdoorlab.experiments import RunConfig, run

#: kornia's rgb_to_yuv and yuv_to_rgb (kornia/color/yuv.py), written out again here
RGB_TO_YUV = [[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]]
YUV_TO_RGB = [[1.0, 0.0, 1.14], [1.0, -0.396, -0.581], [1.0, 2.029, 0.0]]


def images(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def basis(k: int, i: int, n: int) -> float:
    """Entry ``(k, i)`` of the orthonormal DCT-II matrix, by its definition."""
    return math.sqrt((1 if k == 0 else 2) / n) * math.cos(math.pi * (2 * i + 1) * k / (2 * n))


def test_block_dct_is_the_orthonormal_dct_of_each_block():
    d = dct_matrix(4, torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(4, dtype=torch.float64)), "orthonormal"
    assert all(math.isclose(float(d[k, i]), basis(k, i, 4), abs_tol=1e-12) for k in range(4) for i in range(4))
    x = torch.rand((2, 3, 8, 12), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = block_dct(x, 4)
    assert torch.allclose(block_idct(c, 4), x), "the inverse undoes it"
    assert torch.allclose(c[0, 1, 4:8, 8:12], d @ x[0, 1, 4:8, 8:12] @ d.T), "block (1, 2) on its own"
    # a block that is one cosine basis image has that one coefficient, in its block's place
    wave = torch.tensor([[basis(1, i, 4) * basis(3, j, 4) for j in range(4)] for i in range(4)], dtype=torch.float64)
    z = torch.zeros((1, 8, 8), dtype=torch.float64)
    z[0, 4:, :4] = 5 * wave
    expected = torch.zeros_like(z)
    expected[0, 5, 3] = 5.0
    assert torch.allclose(block_dct(z, 4), expected, atol=1e-12)
    with pytest.raises(ValueError, match="tile"):
        block_dct(x, 5)


def ctrl_by_hand(
    x: torch.Tensor, magnitude: float, positions: tuple[int, ...], channels: tuple[int, ...]
) -> torch.Tensor:
    """CTRL's unclamped output (0-1 units) on RGB ``x`` (one window, the image): the coefficient
    ``(p, p)`` of a channel raised by ``m`` adds ``m D[p, i] D[p, j]`` to pixel ``(i, j)`` of it."""
    _, _, n, _ = x.shape
    mark = torch.zeros(3, n, n, dtype=torch.float64)
    for ch in channels:
        for p in positions:
            for i in range(n):
                for j in range(n):
                    mark[ch, i, j] += magnitude * basis(p, i, n) * basis(p, j, n)
    forward, back = torch.tensor(RGB_TO_YUV, dtype=torch.float64), torch.tensor(YUV_TO_RGB, dtype=torch.float64)
    yuv = torch.einsum("ij,njhw->nihw", forward, x.double() * 255) + mark
    return torch.einsum("ij,njhw->nihw", back, yuv) / 255


def test_ctrl_matches_its_formula_by_hand():
    x = images(2, (3, 4, 4), seed=3)
    trigger = create_trigger("ctrl", (3, 4, 4), magnitude=50.0, positions=[1, 3], channels=[1, 2])
    expected = ctrl_by_hand(x.float() / 255, 50.0, (1, 3), (1, 2))
    assert torch.allclose(trigger.apply(x.float() / 255, None).double(), expected, atol=1e-5)
    assert torch.equal(trigger(x), expected.clamp(0, 1).mul(255).round().to(torch.uint8)), "clamped, then rounded"


def test_ctrl_defaults_are_backdoorbenchs_at_32_px_and_clean_label():
    trigger = create_trigger("ctrl", (3, 32, 32))
    # config/attack/ctrl/default.yaml: trigger_channels [1, 2], pos_list [15, 31], use_yuv True;
    # utils/bd_img_transform/ctrl.py: magnitude 100, window_size img_size[0]
    assert trigger.config() == {
        "magnitude": 100.0,
        "positions": [15, 31],
        "channels": [1, 2],
        "window": 32,
        "yuv": True,
    }
    assert trigger.clean_label
    preset = RunConfig(dataset="cifar10", attack="ctrl", preset="backdoorbench").resolved().attack_options
    assert create_trigger("ctrl", (3, 32, 32), **preset).config() == trigger.config()
    x = images(2, (3, 32, 32))
    expected = ctrl_by_hand(x.float() / 255, 100.0, (15, 31), (1, 2))
    assert torch.allclose(trigger.apply(x.float() / 255, None).double(), expected, atol=1e-4)


def test_ctrl_puts_the_trigger_into_the_one_channel_of_grey_images():
    trigger = create_trigger("ctrl", (1, 28, 28))
    assert trigger.config() == {"magnitude": 100.0, "positions": [13, 27], "channels": [0], "window": 28, "yuv": True}
    x = images(3, (1, 28, 28)).float() / 255
    spectrum = block_dct((trigger.apply(x, None) - x) * 255, 28)
    expected = torch.zeros_like(spectrum)
    expected[:, 0, 13, 13] = expected[:, 0, 27, 27] = 100.0
    assert torch.allclose(spectrum, expected, atol=1e-3), "no colour conversion: exactly two coefficients"


def test_ctrl_windows_repeat_the_mark_in_every_block():
    trigger = create_trigger("ctrl", (3, 16, 16), window=8, positions=[7], yuv=False)  # no colour round trip
    x = images(1, (3, 16, 16)).float() / 255
    delta = trigger.apply(x, None) - x
    blocks = delta[0].unfold(1, 8, 8).unfold(2, 8, 8)  # (C, 2, 2, 8, 8)
    assert torch.allclose(blocks, blocks[:, :1, :1].expand_as(blocks), atol=1e-5), "the same change in each block"
    assert delta[0, 0].abs().max() < 1e-6 and delta[0, 1:].abs().max() > 0.01, "only the chosen channels (1, 2)"


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_ctrl_keeps_the_trigger_properties(shape):
    trigger = create_trigger("ctrl", shape)
    x = images(6, shape, seed=1)
    before = x.clone()
    out = trigger(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(x, before), "the input is not modified"
    assert (out != x).flatten(1).any(1).all(), "every image changes"
    assert torch.equal(out, trigger(x, torch.Generator().manual_seed(1))), "fixed: no randomness to seed"
    saturated = torch.full((1, *shape), 255, dtype=torch.uint8)
    assert trigger(saturated).max() == 255 and trigger(saturated).min() < 255, "clamped at 255, not wrapped"


def test_ctrl_refuses_options_that_do_not_fit_the_images():
    with pytest.raises(ValueError, match="positions"):
        create_trigger("ctrl", (3, 32, 32), positions=[32])
    with pytest.raises(ValueError, match="channels must be in 0..0"):
        create_trigger("ctrl", (1, 28, 28), channels=[1, 2])
    with pytest.raises(ValueError, match="tile"):
        create_trigger("ctrl", (3, 32, 32), window=12)
    with pytest.raises(ValueError, match="grey or RGB"):
        create_trigger("ctrl", (4, 32, 32))


@pytest.mark.slow
def test_ctrl_takes_on_digits_dirty_label():
    # clean-label (the default) does not take on digits: with the whole target class poisoned, ASR
    # 0.0 (CA 0.99); their black backgrounds clamp away half of the trigger. Dirty-label does.
    config = RunConfig(dataset="digits", attack="ctrl", clean_label=False, poison_rate=0.1, device="cpu", threads=1)
    result = run(config)
    assert result.metrics["clean_accuracy"] > 0.95
    assert result.metrics["attack_success_rate"] > 0.7

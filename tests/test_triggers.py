from __future__ import annotations

import pytest
import torch

from backdoorlab.attacks import BadNets, Blended, create_trigger
from backdoorlab.registry import UnknownNameError


def random_images(n=16, shape=(3, 32, 32), seed=0):
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_badnets_changes_only_its_patch():
    x = random_images()
    trigger = BadNets((3, 32, 32))  # default: 3x3 white, bottom-right, margin 1
    y = trigger(x)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    changed = (y != x).any(dim=(0, 1))
    patch = torch.zeros(32, 32, dtype=torch.bool)
    patch[28:31, 28:31] = True
    assert not changed[~patch].any()
    assert (y[:, :, 28:31, 28:31] == 255).all()
    assert torch.equal(x, random_images()), "the trigger must not modify its input"


def test_badnets_patch_size_scales_with_image():
    assert BadNets((3, 32, 32)).size == 3
    assert BadNets((1, 28, 28)).size == 3
    assert BadNets((1, 8, 8)).size == 2
    assert BadNets((3, 224, 224)).size == 22


def test_badnets_checkerboard_and_corner():
    trigger = BadNets((1, 8, 8), size=2, pattern="checkerboard", position="top-left", margin=0)
    y = trigger(torch.full((2, 1, 8, 8), 100, dtype=torch.uint8))
    assert y[0, 0, :2, :2].tolist() == [[255, 0], [0, 255]]
    assert (y[:, :, 2:, :] == 100).all() and (y[:, :, :, 2:] == 100).all()


def test_badnets_custom_image_patch():
    patch = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    y = BadNets((1, 8, 8), size=2, pattern=patch, margin=0)(torch.full((1, 1, 8, 8), 7, dtype=torch.uint8))
    assert y[0, 0, 6:, 6:].tolist() == [[0, 255], [255, 0]]


def test_badnets_alpha_blends_the_patch_in_place_and_is_checked():
    x = torch.full((3, 1, 8, 8), 100, dtype=torch.uint8)
    faint = BadNets((1, 8, 8), size=2, position="top-left", margin=0, alpha=0.2)(x)
    assert (faint[:, :, :2, :2] == 131).all(), "0.8 * 100 + 0.2 * 255, rounded"
    assert (faint[:, :, 2:, :] == 100).all() and (faint[:, :, :, 2:] == 100).all()
    placed = BadNets((1, 8, 8), size=2, position="random", alpha=0.2)(x, torch.Generator().manual_seed(0))
    assert sorted(placed.unique().tolist()) == [100, 131] and int((placed == 131).sum()) == 3 * 4
    assert create_trigger("badnets", (1, 8, 8), alpha=0.2).config()["alpha"] == 0.2
    with pytest.raises(ValueError, match="alpha"):
        BadNets((1, 8, 8), alpha=0.0)


def test_badnets_random_position_is_one_patch_per_image_and_seeded():
    x = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    trigger = BadNets((3, 32, 32), size=4, position="random")
    y = trigger(x, torch.Generator().manual_seed(5))
    assert torch.equal(y, trigger(x, torch.Generator().manual_seed(5)))
    tops = set()
    for image in y:
        rows, cols = (image[0] == 255).nonzero(as_tuple=True)
        assert len(rows) == 16  # one whole 4x4 patch, nothing else
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
        tops.add(int(rows.min()))
    assert len(tops) > 5, "positions should vary between images"


def test_blended_is_the_alpha_mix_of_a_fixed_pattern():
    x = random_images()
    trigger = Blended((3, 32, 32), alpha=0.2, seed=1)
    y = trigger(x)
    expected = ((0.8 * x.float() / 255 + 0.2 * trigger.pattern) * 255).round()
    assert (y.float() - expected).abs().max() <= 1  # float rounding at .5
    assert torch.equal(trigger.pattern, Blended((3, 32, 32), seed=1).pattern)
    assert not torch.equal(trigger.pattern, Blended((3, 32, 32), seed=2).pattern)
    assert 0.0 <= float(trigger.pattern.min()) and float(trigger.pattern.max()) <= 1.0


def test_blended_alpha_one_replaces_the_image():
    trigger = Blended((1, 8, 8), alpha=1.0)
    y = trigger(random_images(4, (1, 8, 8)))
    assert torch.equal(y[0], y[3])


def test_trigger_options_are_validated():
    with pytest.raises(
        UnknownNameError,
        match="valid attacks: adaptive_blend, adaptive_patch, badnet_rand, badnet_stripes, badnets, blended",
    ):
        create_trigger("wanet2", (3, 32, 32))
    with pytest.raises(ValueError, match="valid: size, pattern, position, margin"):
        create_trigger("badnets", (3, 32, 32), colour="red")
    with pytest.raises(ValueError, match="valid: bottom-right"):
        create_trigger("badnets", (3, 32, 32), position="middle")
    with pytest.raises(ValueError, match="does not fit"):
        create_trigger("badnets", (1, 8, 8), size=9)
    with pytest.raises(ValueError, match="alpha"):
        create_trigger("blended", (3, 32, 32), alpha=0)
    with pytest.raises(ValueError, match="expects uint8"):
        BadNets((3, 32, 32))(torch.rand(2, 3, 32, 32))


def test_trigger_config_round_trips():
    trigger = create_trigger("badnets", (3, 32, 32), size=4, position="top-left")
    rebuilt = create_trigger("badnets", (3, 32, 32), **trigger.config())
    x = random_images()
    assert torch.equal(trigger(x), rebuilt(x))

"""Properties of every trigger (hypothesis), and the poisoning strategies of the attack suite."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backdoorlab.attacks import PoisonSpec, attacks_for, create_trigger, poison_dataset, triggered_test_set
from backdoorlab.data import DataError

from .test_contracts import built_trigger

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]
PER_IMAGE = ["badnet_stripes", "badnet_rand", "blended_stripes", "blended_rand"]
#: Options for attacks whose defaults read a file of the data folder that fits one image size, or
#: train for long
DATA_FREE = {
    "low_frequency": {"pattern": "generate"},
    "refool": {"reflections": "noise"},
    "adaptive_blend": {"pattern": "noise"},
    # and for SSBA, whose encoder trains first: two steps of it (1,500 by default)
    "ssba": {"steps": 2, "batch_size": 4, "bits": 8},
    # and Poison Ink's hiding and reveal networks: two steps at width 4 (600 at 16 and 32 by default)
    "poison_ink": {"steps": 2, "batch_size": 4, "hiding_width": 4, "reveal_width": 4},
}


def batch(seed: int, n: int, shape) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(attacks_for("image")),
    shape=st.sampled_from(SHAPES),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_trigger_keeps_shape_dtype_and_input(name, shape, n, seed):
    trigger = built_trigger(name, shape, DATA_FREE.get(name, {}))  # a training-controlled one trained
    x = batch(seed, n, shape)
    original = x.clone()
    y = trigger(x, torch.Generator().manual_seed(seed))
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(x, original), "triggers are pure: the input is untouched"
    assert torch.equal(y, trigger(x, torch.Generator().manual_seed(seed))), "reproducible under a seed"


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1))
def test_blend_weights_are_respected(shape, seed):
    x = batch(seed, 4, shape)
    xf = x.float() / 255
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    # |x' - x| = alpha |pattern - x| with the pattern in [-1, 1] (stripes) or [0, 1]
    stripes = create_trigger("blended_stripes", shape)(x, g()).float() / 255
    assert (stripes - xf).abs().max() <= 0.03 * 2 + 1 / 255
    rand = create_trigger("blended_rand", shape)(x, g()).float() / 255
    assert (rand - xf).abs().max() <= 0.2 + 1 / 255
    triangles = create_trigger("blended_triangles", shape)
    expected = torch.lerp(xf, triangles.pattern, 0.15)
    assert (triangles(x).float() / 255 - expected).abs().max() <= 1 / 255
    assert set(triangles.pattern.unique().tolist()) <= {0.4000000059604645, 0.800000011920929}


def test_per_image_triggers_differ_between_images():
    x = torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)  # identical images
    for name in PER_IMAGE:
        y = create_trigger(name, (3, 32, 32))(x, torch.Generator().manual_seed(0))
        distinct = len({tuple(img.flatten().tolist()) for img in y})
        assert distinct == 8, name


def test_badnet_stripes_is_one_patch_of_rgb_cube_columns():
    x = torch.full((16, 3, 32, 32), 128, dtype=torch.uint8)
    trigger = create_trigger("badnet_stripes", (3, 32, 32))
    assert trigger.size == 3  # 16 px at 224, scaled, at least 3
    y = trigger(x, torch.Generator().manual_seed(1))
    for img in y:
        changed = (img != 128).any(0)
        rows, cols = changed.nonzero(as_tuple=True)
        # every patch pixel becomes 0 or 255 per channel, so the changed area is the whole 3x3 patch
        assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2 and len(rows) == 9
        window = img[:, rows.min() : rows.min() + 3, cols.min() : cols.min() + 3]
        assert set(window.unique().tolist()) <= {0, 255}
        assert (window == window[:, :1, :]).all(), "vertical stripes: every row of a column is equal"


def test_blended_text_changes_only_the_red_channel_of_text_pixels():
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    trigger = create_trigger("blended_text", (3, 32, 32))
    y = trigger(x)
    assert torch.equal(y[:, 1:], x[:, 1:])
    changed = y[:, 0] != 100
    assert changed.any() and not changed[:, :8].any(), "text is a band across the middle"
    assert torch.equal(changed, (trigger.pattern[0] != 0).expand(2, -1, -1) & changed)


def test_sig_adds_the_sinusoid():
    x = torch.full((1, 1, 8, 32), 128, dtype=torch.uint8)
    y = create_trigger("sig", (1, 8, 32))(x)
    diff = y.float() - x.float()
    expected = 20 * torch.sin(2 * torch.pi * torch.arange(32) * 6 / 32)
    assert (diff[0, 0] - expected).abs().max() <= 0.51
    assert (diff[0, 0] == diff[0, 0, :1]).all(), "the same signal on every row"


def test_wanet_zero_strength_is_identity_and_default_warp_is_small_but_real():
    x = batch(0, 4, (3, 32, 32))
    assert torch.equal(create_trigger("wanet", (3, 32, 32), strength=0.0)(x), x)
    warped = create_trigger("wanet", (3, 32, 32))(x)
    diff = (warped.float() - x.float()).abs()
    assert diff.mean() > 1 and diff.mean() < 60


def test_clean_label_touches_only_target_class_and_keeps_labels(digits):
    sig = create_trigger("sig", digits.train.input_shape)
    result = poison_dataset(digits.train, sig, PoisonSpec(rate=50, target=2, clean_label=True), seed=0)
    assert result.num_poisoned == 50
    assert (digits.train.labels[result.mask] == 2).all()
    assert torch.equal(result.data.labels, digits.train.labels)
    changed = (result.data.inputs != digits.train.inputs).flatten(1).any(1)
    assert not changed[~result.mask].any()


def test_source_specific_poisoning(digits):
    trigger = create_trigger("badnets", digits.train.input_shape)
    spec = PoisonSpec(rate=30, target=0, source=7)
    result = poison_dataset(digits.train, trigger, spec, seed=0)
    assert (digits.train.labels[result.mask] == 7).all() and (result.data.labels[result.mask] == 0).all()
    t = triggered_test_set(digits.test, trigger, spec, seed=0)
    assert (t.true_labels == 7).all() and len(t.true_labels) == int((digits.test.labels == 7).sum())
    with pytest.raises(ValueError, match="source class must differ"):
        PoisonSpec(target=3, source=3).validate(10)
    with pytest.raises(ValueError, match="needs mode all-to-one"):
        PoisonSpec(clean_label=True, mode="all-to-all").validate(10)
    with pytest.raises(DataError, match="clean-label, target-class samples"):
        poison_dataset(digits.train, trigger, PoisonSpec(rate=0.5, clean_label=True), seed=0)


def test_wanet_cross_samples_keep_labels_and_are_disjoint(digits):
    data = digits.train
    # 8x8 digits are tiny; WaNet's defaults target 32 px, the mechanics are the same
    wanet = create_trigger("wanet", data.input_shape, strength=2.0)
    result = poison_dataset(data, wanet, PoisonSpec(rate=40, target=1), seed=0)
    cross = result.cross_mask
    assert int(cross.sum()) == 80 and not (cross & result.mask).any()
    assert torch.equal(result.data.labels[cross], data.labels[cross])
    assert (result.data.inputs[cross] != data.inputs[cross]).flatten(1).any(1).float().mean() > 0.9

"""Refool (attacks/refool.py): the trigger's properties on small synthetic reflection sets, its two
reflection models against the formulas computed by hand, the selected VOC reflections (with the
data folder), BackdoorBench's preset, and the backdoor taking on sklearn's digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from backdoorlab.attacks import create_trigger
from backdoorlab.data.corruptions import gaussian_blur
from backdoorlab.data.sources import DataNotFoundError
from backdoorlab.experiments import RunConfig, run
from backdoorlab.experiments.presets import BACKDOORBENCH_ATTACKS
from backdoorlab.options import OptionError

GAMMA = 2.2
VOC = Path("backdoorbench/refool/Refool-SelectedReflectionImages/selected_out-images")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(shape: tuple[int, ...], n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=generator(seed), dtype=torch.uint8)


def reflections(shape: tuple[int, ...], m: int = 3) -> torch.Tensor:
    """A tiny synthetic reflection set (uint8, half the image size: resized by the trigger)."""
    c, h, w = shape
    return torch.randint(0, 256, (m, c, h // 2, w // 2), generator=generator(7), dtype=torch.uint8)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_refool_is_a_pure_seeded_uint8_map(shape):
    trigger = create_trigger("refool", shape, reflections=reflections(shape))
    x = images(shape)
    before = x.clone()
    out = trigger(x, generator(0))
    assert torch.equal(x, before), "the input was modified"
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert (out != x).flatten(1).any(1).all(), "every image gets a reflection"
    assert torch.equal(out, trigger(x, generator(0))), "same seed, same blend"
    assert not torch.equal(out, trigger(x, generator(1))), "the reflection and its parameters are drawn per image"
    assert trigger.config()["reflections"] == "custom"


def test_refool_draws_both_models_and_is_clean_label_by_default():
    shape = (3, 32, 32)
    x = images(shape, n=64)
    mixed = create_trigger("refool", shape, reflections="noise")
    ghosts = create_trigger("refool", shape, reflections="noise", ghost_rate=1.0)
    focal = create_trigger("refool", shape, reflections="noise", ghost_rate=0.0)
    out, g, f = (t(x, generator(0)) for t in (mixed, ghosts, focal))
    is_ghost = (out == g).flatten(1).all(1)
    assert (is_ghost | (out == f).flatten(1).all(1)).all(), "each image is one model or the other"
    assert 0.3 < is_ghost.float().mean() < 0.7, "ghost_rate 0.49 of the images are ghosted"
    config = RunConfig(dataset="digits", attack="refool", attack_options={"reflections": "noise"})
    assert mixed.clean_label and config.resolved().clean_label


def test_ghost_model_matches_the_formula_by_hand():
    """3x3 grey image, one reflection, offset (1, 1): the 2x2 overlap ``0.3 r[1:, 1:] + 0.7 r[:2, :2]``
    (linear light) stretched bilinearly back to 3x3 (source rows and columns 0, 0.5, 1), then
    ``(0.5 t + 0.5 ghost) ** (1 / 2.2)``."""
    t = [[0.1, 0.5, 0.9], [0.2, 0.4, 0.6], [0.3, 0.7, 0.8]]
    r = [[0.2, 0.9, 0.4], [0.6, 0.1, 0.8], [0.5, 0.3, 0.7]]
    trigger = create_trigger(
        "refool",
        (1, 3, 3),
        reflections=torch.tensor(r)[None, None],
        alpha_t=0.5,
        ghost_rate=1.0,
        offset=(1, 1),
        ghost_alpha=0.3,
    )
    lin = [[v**GAMMA for v in row] for row in r]
    overlap = [[0.3 * lin[i + 1][j + 1] + 0.7 * lin[i][j] for j in range(2)] for i in range(2)]

    def at(y: float, x: float) -> float:  # bilinear in the 2x2 overlap, y and x in [0, 1]
        top = (1 - x) * overlap[0][0] + x * overlap[0][1]
        bottom = (1 - x) * overlap[1][0] + x * overlap[1][1]
        return (1 - y) * top + y * bottom

    coords = (0.0, 0.5, 1.0)
    expected = [
        [(0.5 * t[i][j] ** GAMMA + 0.5 * at(coords[i], coords[j])) ** (1 / GAMMA) for j in range(3)] for i in range(3)
    ]
    out = trigger.apply(torch.tensor(t)[None, None], generator(0))
    assert torch.allclose(out[0, 0], torch.tensor(expected), atol=1e-6)


def vignette_by_hand(side: int) -> list[list[float]]:
    """``gen_kernel(side, 3)``: normal mass per cell over +-3.5 sigma cells, square-rooted, peak 1."""
    interval = 7.0 / side
    edges = [-3 - interval / 2 + k * (6 + interval) / side for k in range(side + 1)]
    cdf = [0.5 * (1 + math.erf(e / math.sqrt(2))) for e in edges]
    root = [math.sqrt(b - a) for a, b in zip(cdf, cdf[1:])]
    peak = max(root)
    return [[a * b / peak**2 for b in root] for a in root]


def test_out_of_focus_model_matches_the_formula_by_hand():
    """Constant 3x3 image 0.4 and reflection 0.5: the blur keeps the constant, ``t + r`` stays
    under 1 (no over-exposure correction), so ``x' = (0.6 t + vignette (1 - 0.3) r) ** (1 / 2.2)``."""
    trigger = create_trigger(
        "refool", (1, 3, 3), reflections=torch.full((1, 1, 3, 3), 0.5), alpha_t=0.6, ghost_rate=0.0, sigma=1.0
    )
    g = vignette_by_hand(3)
    expected = [[(0.6 * 0.4**GAMMA + g[i][j] * 0.7 * 0.5**GAMMA) ** (1 / GAMMA) for j in range(3)] for i in range(3)]
    out = trigger.apply(torch.full((1, 1, 3, 3), 0.4), generator(0))
    assert torch.allclose(out[0, 0], torch.tensor(expected), atol=1e-6)


def test_over_exposed_reflection_is_lowered_by_the_mean_excess():
    """``t + r`` over 1 everywhere: ``r`` is lowered by ``(t + r - 1) att`` with ``att`` in [1.08, 1.18]."""
    t, r, alpha = 0.9**GAMMA, 0.95**GAMMA, 0.6
    trigger = create_trigger(
        "refool", (1, 4, 4), reflections=torch.full((1, 1, 4, 4), 0.95), alpha_t=alpha, ghost_rate=0.0, sigma=1.0
    )
    out = trigger.apply(torch.full((1, 1, 4, 4), 0.9), generator(0))[0, 0]
    g = torch.tensor(vignette_by_hand(4))

    def blended(att: float) -> torch.Tensor:
        return (alpha * t + g * (1 - alpha / 2) * (r - (t + r - 1) * att)) ** (1 / GAMMA)

    assert ((out <= blended(1.08) + 1e-6) & (out >= blended(1.18) - 1e-6)).all()
    assert not torch.allclose(out, blended(0.0)), "the correction applied"


def test_batched_blur_is_each_images_own_gaussian():
    """An impulse blurs to the outer product of its normalised 1-D Gaussian (kernel 2 ceil(2 sigma) + 1);
    a batch of mixed sigmas blurs each image as alone, and a constant image stays constant."""
    impulse = torch.zeros(1, 1, 11, 11)
    impulse[0, 0, 5, 5] = 1.0
    taps = torch.arange(-2, 3, dtype=torch.float64)  # sigma 1: kernel 5
    w = torch.exp(-(taps**2) / 2)
    w = w / w.sum()
    out = gaussian_blur(impulse, torch.tensor([1.0]))[0, 0]
    assert torch.allclose(out[3:8, 3:8].double(), torch.outer(w, w), atol=1e-6)
    assert out.sum() == pytest.approx(1.0, abs=1e-5) and out[:3].abs().max() == 0
    batch = torch.rand(3, 2, 9, 9, generator=generator(3))
    sigmas = torch.tensor([1.0, 4.7, 2.2])  # kernels 5, 21 (wider than the image) and 11
    together = gaussian_blur(batch, sigmas)
    for k in range(3):
        assert torch.allclose(together[k], gaussian_blur(batch[k : k + 1], sigmas[k : k + 1])[0], atol=1e-6)
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 8, 8), 0.3), torch.tensor([4.9])), torch.tensor(0.3))


def test_options_are_checked():
    with pytest.raises(ValueError, match="offset"):
        create_trigger("refool", (1, 8, 8), reflections="noise", offset=(8, 2))
    with pytest.raises(ValueError, match="alpha_t"):
        create_trigger("refool", (1, 8, 8), reflections="noise", alpha_t=0.0)
    with pytest.raises(OptionError, match="ghost_rate"):
        create_trigger("refool", (1, 8, 8), reflections="noise", ghost_rate=1.5)
    with pytest.raises(ValueError, match="reflections must be"):
        create_trigger("refool", (1, 8, 8), reflections="vocc")


def test_voc_reflections_need_the_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("BACKDOORLAB_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="no data root is set"):
        create_trigger("refool", (3, 32, 32))
    with pytest.raises(DataNotFoundError, match="selected_out-images"):
        create_trigger("refool", (3, 32, 32), data_root=tmp_path)


def test_backdoorbench_preset_fixes_alpha_t():
    assert BACKDOORBENCH_ATTACKS["refool"] == {"reflections": "voc", "alpha_t": 0.4, "ghost_rate": 0.49}
    config = RunConfig(
        dataset="digits", attack="refool", preset="backdoorbench", attack_options={"reflections": "noise"}
    )
    assert config.resolved().attack_options == {"reflections": "noise", "alpha_t": 0.4, "ghost_rate": 0.49}


def test_the_selected_voc_reflections_are_read_from_the_data_root(data_root):
    if not (data_root / VOC).is_dir():
        pytest.skip(f"no {VOC} under the data root")
    rgb = create_trigger("refool", (3, 32, 32), data_root=data_root)
    grey = create_trigger("refool", (1, 28, 28), data_root=data_root)
    assert rgb.reflections.shape == (200, 3, 32, 32) and grey.reflections.shape == (200, 1, 28, 28)
    assert 0 <= float(rgb.reflections.min()) and float(rgb.reflections.max()) <= 1
    x = images((3, 32, 32), n=4)
    assert not torch.equal(rgb(x, generator(0)), x)


def test_refool_backdoor_takes_on_digits():
    """BackdoorBench's setting on digits: dirty-label at 10%, alpha_t 0.4, smooth-noise reflections
    (data-free); measured CA 0.994, ASR 1.000 (about 6 s on one thread)."""
    config = RunConfig(
        dataset="digits",
        attack="refool",
        attack_options={"reflections": "noise", "alpha_t": 0.4},
        clean_label=False,
        poison_rate=0.1,
        device="cpu",
        threads=1,
        seed=0,
    )
    metrics = run(config).metrics
    assert metrics["attack_success_rate"] > 0.9 and metrics["clean_accuracy"] > 0.95, metrics

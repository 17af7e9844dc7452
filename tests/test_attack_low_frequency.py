"""Low Frequency (attacks/low_frequency.py): BackdoorBench's stored patterns added as its
``SimpleAdditiveTrigger`` adds them, the pattern files' two formats, the paper's low-pass filter
and targeted DeepFool by their definitions, the fitted (``generate``) pattern's properties, the run
passing the attacker's images and target to the fit, and the backdoor taking on digits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoorlab.attacks import create_trigger
from backdoorlab.attacks.low_frequency import (
    LowFrequency,
    gaussian_low_pass,
    read_pattern,
    stored_patterns,
    targeted_deepfool,
    universal_low_frequency,
)
from backdoorlab.data import DataNotFoundError
from backdoorlab.experiments import RunConfig, build_model, run
from backdoorlab.experiments.run import prepare
from backdoorlab.models import create_model
from backdoorlab.training import TrainConfig, train

PATTERNS = Path("backdoorbench/lowFrequency")


def images(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def stored(data_root: Path, name: str) -> Path:
    path = data_root / PATTERNS / f"{name}_0_255.npy"
    if not path.is_file():
        pytest.skip(f"{path} is absent (BackdoorBench's trigger files: see the data README)")
    return path


def tiny_model(channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=4, in_channels=channels, width=8).eval()


@pytest.fixture(scope="module")
def surrogate(digits):
    config = RunConfig(dataset="digits").resolved()
    torch.manual_seed(0)
    model = build_model(config, digits.train)
    train(model, digits.train, TrainConfig(epochs=4, batch_size=64, lr=0.05, progress=False), device="cpu", seed=0)
    model.zero_grad(set_to_none=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# stored patterns


def test_the_stored_pattern_is_added_and_clipped_as_backdoorbench_adds_it(data_root):
    path = stored(data_root, "cifar10_preactresnet18")
    trigger = create_trigger("low_frequency", (3, 32, 32), data_root=data_root)
    assert trigger.config()["pattern"] == "cifar10_preactresnet18" and not trigger.needs_surrogate
    x = images(4, (3, 32, 32))
    # utils/bd_img_transform/patch.py, SimpleAdditiveTrigger: np.clip(img.astype(float) + p, 0, 255)
    # .astype(np.uint8) on HWC images; the pattern file is uint8, so rounding and truncation agree
    pattern = np.load(path)
    assert pattern.dtype == np.uint8 and pattern.shape == (32, 32, 3) and pattern.max() == 51
    hwc = x.permute(0, 2, 3, 1).numpy().astype(float)
    expected = np.clip(hwc + pattern, 0, 255).astype(np.uint8)
    assert np.array_equal(trigger(x).permute(0, 2, 3, 1).numpy(), expected)


def test_float_pattern_files_are_in_0_1_units_and_scaled_to_pixels(data_root):
    path = stored(data_root, "gtsrb_vgg19_bn")
    raw = np.load(path)
    assert raw.dtype == np.float32 and raw.ndim == 4 and raw.max() <= 0.2 + 1e-6, "BackdoorBench's second format"
    trigger = create_trigger("low_frequency", (3, 32, 32), pattern="gtsrb_vgg19_bn", data_root=data_root)
    expected = torch.from_numpy(raw[0]).permute(2, 0, 1)
    assert torch.allclose(trigger.pattern, expected) and math.isclose(
        float(trigger.pattern.max() * 255), 51, rel_tol=1e-5
    )


def test_read_pattern_takes_both_formats_and_grey(tmp_path):
    levels = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.save(tmp_path / "levels.npy", levels)
    assert torch.allclose(read_pattern(tmp_path / "levels.npy"), torch.from_numpy(levels).permute(2, 0, 1) / 255.0)
    units = np.full((1, 2, 2, 3), 0.1, dtype=np.float32)
    np.save(tmp_path / "units.npy", units)
    assert torch.allclose(read_pattern(tmp_path / "units.npy"), torch.full((3, 2, 2), 0.1))
    np.save(tmp_path / "grey.npy", np.full((2, 2), 51, dtype=np.uint8))
    assert torch.allclose(read_pattern(tmp_path / "grey.npy"), torch.full((3, 2, 2), 0.2)), "2-D: repeated to RGB"


def test_a_stored_pattern_refuses_images_of_another_shape_and_names_the_way_out(data_root):
    stored(data_root, "cifar10_preactresnet18")
    with pytest.raises(ValueError, match=r"3x32x32, the images 1x28x28.*pattern='generate'"):
        create_trigger("low_frequency", (1, 28, 28), data_root=data_root)
    with pytest.raises(ValueError, match="valid: cifar10_convnext_tiny.*gtsrb_vit_b_16, generate"):
        create_trigger("low_frequency", (3, 32, 32), pattern="mnist_preactresnet18", data_root=data_root)


def test_a_stored_pattern_without_a_data_root_says_where_it_is_read(monkeypatch):
    monkeypatch.delenv("BACKDOORLAB_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="lowFrequency/cifar10_preactresnet18_0_255.npy"):
        create_trigger("low_frequency", (3, 32, 32))
    assert "cifar10_preactresnet18" in stored_patterns() and "gtsrb_preactresnet18" in stored_patterns()


def test_the_backdoorbench_preset_reads_its_cifar10_victims_pattern(data_root):
    config = RunConfig(dataset="cifar10", attack="low_frequency", preset="backdoorbench", data_root=str(data_root))
    options = config.resolved().attack_options
    assert options["pattern"] == "cifar10_preactresnet18"
    gtsrb = RunConfig(dataset="gtsrb", attack="low_frequency", preset="backdoorbench", data_root=str(data_root))
    assert gtsrb.resolved().attack_options["pattern"] == "gtsrb_preactresnet18"


def test_the_backdoorbench_preset_generates_a_pattern_where_it_stores_none():
    """BackdoorBench stores no pattern for MNIST (its lf.py would find no file): the preset fits one."""
    config = RunConfig(dataset="mnist", attack="low_frequency", preset="backdoorbench")
    assert config.resolved().attack_options["pattern"] == "generate"


# ---------------------------------------------------------------------------------------------
# the generation procedure


def test_the_low_pass_filter_is_the_papers_gaussian():
    impulse = torch.zeros((1, 1, 32, 32), dtype=torch.float64)
    impulse[0, 0, 16, 16] = 1.0
    out = gaussian_low_pass(impulse, sigma=6.0)
    # gauss_smooth: 30 taps, weights exp(-((i - 14.5) / 6)^2 / 2) normalised, padded 14 before and
    # 15 after; out[r, c] = k[16 - r + 14] k[16 - c + 14]
    taps = [math.exp(-0.5 * ((i - 14.5) / 6) ** 2) for i in range(30)]
    k = [t / sum(taps) for t in taps]
    for r, c in ((16, 16), (10, 20), (3, 29), (2, 31)):
        expected = k[30 - r] * k[30 - c] if 0 <= 30 - r < 30 and 0 <= 30 - c < 30 else 0.0
        assert math.isclose(float(out[0, 0, r, c]), expected, rel_tol=1e-9, abs_tol=1e-15), (r, c)
    assert out.shape == impulse.shape


def test_targeted_deepfool_reaches_the_target_class(digits, surrogate):
    x = digits.test.inputs[:5].float() / 255
    for image, label in zip(x, digits.test.labels[:5].tolist()):
        target = (label + 3) % 10
        r, steps = targeted_deepfool(surrogate, image, target, overshoot=0.02, max_steps=200)
        with torch.no_grad():
            assert int(surrogate((image + r)[None]).argmax()) == target
        assert 0 < steps < 200 and r.norm() > 0
    assert all(p.grad is None for p in surrogate.parameters()), "no gradients left on the model"


def test_the_fitted_pattern_is_smooth_in_0_to_peak_and_seeded(digits, surrogate):
    x = digits.train.inputs[:8].float() / 255

    def fit(seed: int) -> torch.Tensor:
        return universal_low_frequency(surrogate, x, 0, passes=1, generator=torch.Generator().manual_seed(seed))

    v = fit(0)
    assert v.shape == x.shape[1:] and math.isclose(float(v.min()), 0.0, abs_tol=1e-7)
    assert math.isclose(float(v.max()), 0.2, rel_tol=1e-5), "rescaled to [0, 0.2]"
    assert torch.equal(v, fit(0)), "the same generator, the same pattern"
    assert not torch.equal(v, fit(1)), "another order over the images, another pattern"
    rough = torch.rand_like(v)
    assert (v.diff(dim=-1).abs().mean() / v.std()) < 0.5 * (rough.diff(dim=-1).abs().mean() / rough.std()), "smooth"


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_a_generated_pattern_keeps_the_trigger_properties(shape):
    trigger = create_trigger("low_frequency", shape, pattern="generate", images=6, passes=1, deepfool_steps=100)
    assert trigger.needs_surrogate and not trigger.fitted
    assert torch.equal(trigger(images(2, shape)), images(2, shape)), "no pattern until fitted"
    trigger.fit(tiny_model(shape[0]), torch.Generator().manual_seed(0), images=images(12, shape, seed=5), target=0)
    assert trigger.fitted
    levels = trigger.pattern * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4) and 0 <= levels.min() and levels.max() <= 51
    x = images(5, shape, seed=2)
    before = x.clone()
    out = trigger(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape and torch.equal(x, before)
    assert (out.int() - x.int()).min() >= 0, "the pattern only adds"
    assert (out != x).flatten(1).any(1).all() and torch.equal(out, trigger(x, torch.Generator().manual_seed(1)))


def test_generate_needs_the_attackers_images():
    trigger = create_trigger("low_frequency", (1, 8, 8), pattern="generate")
    with pytest.raises(ValueError, match="clean images"):
        trigger.fit(tiny_model(1))


def test_the_run_fits_on_the_attackers_images_towards_its_target(monkeypatch):
    seen = {}

    def spy(self, surrogate, generator=None, images=None, target=0):  # noqa: ANN001, ANN202
        seen.update(images=images, target=target)
        self.fitted = True

    monkeypatch.setattr(LowFrequency, "fit", spy)
    config = RunConfig(
        dataset="digits",
        attack="low_frequency",
        attack_options={"pattern": "generate"},
        target=3,
        epochs=1,
        device="cpu",
        threads=1,
    )
    prepared = prepare(config)
    assert seen["target"] == 3
    assert seen["images"].dtype == torch.uint8 and len(seen["images"]) == len(prepared.train_set) - len(
        prepared.trusted
    )


@pytest.mark.slow
def test_low_frequency_takes_on_digits():
    options = {"pattern": "generate", "images": 30, "passes": 2}
    result = run(RunConfig(dataset="digits", attack="low_frequency", attack_options=options, device="cpu", threads=1))
    assert result.metrics["clean_accuracy"] > 0.95 and result.metrics["attack_success_rate"] > 0.9
    assert "fit_attack" in result.timings

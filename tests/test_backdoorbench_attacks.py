"""The ``backdoorbench`` preset's attacks against BackdoorBench's own settings (SCLBD/BackdoorBench
f02e353; issue 38's attack deviations): SIG's amplitude, BadNets' patch pixels, the Hello Kitty
pattern read from the data root, label-consistent's four corners and PGD settings, and clean-label
rates as a fraction of the target class. The reference values are written here with the file
that holds them; nothing reads BackdoorBench's code."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from backdoorlab.attacks import PoisonSpec, create_trigger, optimized, poison_dataset
from backdoorlab.attacks.adversarial import pgd_linf
from backdoorlab.data import DataNotFoundError
from backdoorlab.experiments import RunConfig
from backdoorlab.experiments.run import prepare

CIFAR = (3, 32, 32)
HELLO_KITTY = Path("backdoorbench/blended/hello_kitty.jpeg")
TRIGGER_IMAGE = Path("backdoorbench/badnet/trigger_image.png")


def preset_trigger(attack: str, data_root: Path | None = None, dataset: str = "cifar10"):
    """The trigger the ``backdoorbench`` preset builds for ``attack`` on ``dataset``."""
    config = RunConfig(
        dataset=dataset, attack=attack, preset="backdoorbench", data_root=str(data_root) if data_root else None
    )
    options = config.resolved().attack_options
    shape = {"cifar10": CIFAR, "digits": (1, 8, 8)}[dataset]
    return create_trigger(attack, shape, data_root=data_root, **options)


def resource(data_root: Path, relative: Path) -> Path:
    path = data_root / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (BackdoorBench's trigger files: see the data README)")
    return path


def grey(value: int = 128) -> torch.Tensor:
    return torch.full((2, *CIFAR), value, dtype=torch.uint8)


def test_sig_preset_adds_backdoorbenchs_delta_40():
    # config/attack/sig/default.yaml: sig_delta 40, sig_f 6; utils/bd_img_transform/sig.py adds
    # delta * sin(2 pi j f / m) to column j of m and casts with np.uint8 (truncation)
    trigger = preset_trigger("sig")
    assert trigger.config() == {"delta": 40.0, "frequency": 6.0}
    out = trigger(grey()).int()
    columns = np.arange(32)
    reference = np.uint8(np.clip(128 + 40 * np.sin(2 * np.pi * columns * 6 / 32), 0, 255)).astype(int)
    diff = out[0, 0, 0].numpy() - reference
    assert diff.min() >= 0 and diff.max() <= 1, "rounded here, truncated there: at most one level apart"
    assert (out - 128).abs().max() == 40, "the full amplitude is reached"
    assert torch.equal(out[:, :, :1].expand_as(out), out), "the same sinusoid on every row and channel"
    assert create_trigger("sig", CIFAR).config()["delta"] == 20.0, "the default stays the SIG paper's"


def test_badnets_preset_patch_is_trigger_image_png(data_root):
    png = np.array(Image.open(resource(data_root, TRIGGER_IMAGE)).convert("RGB"))
    reference = torch.from_numpy(png).permute(2, 0, 1)  # (3, 32, 32): 255 at rows/cols 29-31
    trigger = preset_trigger("badnets")
    black = torch.zeros((1, *CIFAR), dtype=torch.uint8)
    assert torch.equal(trigger(black)[0], reference), "the patch is the PNG, pixel for pixel"
    # BackdoorBench pastes the PNG's non-zero pixels (utils/bd_img_transform/patch.py)
    images = torch.randint(0, 256, (4, *CIFAR), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pasted = torch.where(reference > 0, reference, images)
    assert torch.equal(trigger(images), pasted)
    default = create_trigger("badnets", CIFAR)(black)[0, 0]
    assert default[28:31, 28:31].eq(255).all() and default[31].eq(0).all(), "the default sits at 28-30"


def test_blended_preset_reads_hello_kitty_from_the_data_root(data_root, monkeypatch):
    path = resource(data_root, HELLO_KITTY)
    monkeypatch.delenv("BACKDOORLAB_DATA", raising=False)  # only the run's data root says where
    trigger = preset_trigger("blended", data_root)
    assert trigger.config()["pattern"] == "hello_kitty" and trigger.alpha == 0.2
    # BackdoorBench (utils/aggregate_block/bd_attack_generate.py, blended): the image through
    # ToPILImage, Resize(32, 32) and ToTensor, blended at 0.2 in float, cast with truncation
    image = transforms.ToPILImage()(np.asarray(Image.open(path).convert("RGB")))
    reference = transforms.ToTensor()(transforms.Resize((32, 32))(image))
    assert torch.equal(trigger.pattern, reference), "the same resized Hello Kitty"
    images = torch.randint(0, 256, (4, *CIFAR), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = (0.8 * images.double() + 0.2 * reference.double() * 255).floor()
    diff = trigger(images).double() - expected
    assert diff.min() >= 0 and diff.max() <= 1, "rounded here, truncated there"


def test_hello_kitty_is_read_from_the_runs_data_root_and_a_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("BACKDOORLAB_DATA", raising=False)
    options = {"pattern": "hello_kitty"}
    with pytest.raises(DataNotFoundError, match="no data root is set"):
        create_trigger("blended", CIFAR, **options)
    with pytest.raises(DataNotFoundError, match=str(tmp_path / HELLO_KITTY)):
        RunConfig(dataset="cifar10", attack="blended", attack_options=options, data_root=str(tmp_path)).resolved()
    # a run hands its data root to the trigger (digits need no data files of their own)
    (tmp_path / HELLO_KITTY).parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 40, 90)).save(tmp_path / HELLO_KITTY, quality=100)
    config = RunConfig(dataset="digits", attack="blended", attack_options=options, data_root=str(tmp_path))
    pattern = prepare(config).trigger.pattern
    assert pattern.shape == (1, 8, 8)
    luminance = (0.299 * 200 + 0.587 * 40 + 0.114 * 90) / 255  # PIL's grey of the file's colour
    assert torch.allclose(pattern, torch.full_like(pattern, luminance), atol=2 / 255), "the file in the run's data root"


def test_an_option_named_data_root_is_refused():
    with pytest.raises(ValueError, match="unknown option.*data_root"):
        RunConfig(dataset="cifar10", attack="blended", attack_options={"data_root": "/tmp"}).resolved()


#: utils/bd_img_transform/lc.py, trigger "all-corners": each corner's 3x3, 1 = 255 and 0 = 0 (its
#: -1 entries, added at -255 and clipped), rows top to bottom
LC_CORNERS = {
    "top-left": [[1, 0, 0], [0, 1, 0], [1, 0, 1]],
    "top-right": [[0, 0, 1], [0, 1, 0], [1, 0, 1]],
    "bottom-left": [[1, 0, 0], [0, 1, 0], [1, 0, 1]],
    "bottom-right": [[0, 0, 1], [0, 1, 0], [1, 0, 1]],
}


def test_label_consistent_preset_stamps_four_corners_and_sets_backdoorbenchs_pgd(monkeypatch):
    trigger = preset_trigger("label_consistent")
    out = trigger(grey())[0, 0]
    slices = {"top": slice(0, 3), "bottom": slice(29, 32), "left": slice(0, 3), "right": slice(29, 32)}
    expected = torch.full((32, 32), 128, dtype=torch.uint8)
    for corner, rows in LC_CORNERS.items():
        vertical, horizontal = corner.split("-")
        expected[slices[vertical], slices[horizontal]] = torch.tensor(rows, dtype=torch.uint8) * 255
    assert torch.equal(out, expected), "the pattern in every corner, mirrored on the left, nothing else"
    # resource/label-consistent/craft_adv_dataset.py: PGD eps 8, alpha 1.5, steps 100 (of 255), no random start
    calls = []

    def spy(model, images, labels, **kwargs):
        calls.append(kwargs)
        return images

    monkeypatch.setattr(optimized, "pgd_linf", spy)
    trigger.fit(torch.nn.Linear(1, 1))
    trigger.poison(grey(), torch.zeros(2, dtype=torch.long))
    (kwargs,) = calls
    assert kwargs["random_start"] is False and kwargs["steps"] == 100
    assert math.isclose(kwargs["eps"], 8 / 255) and math.isclose(kwargs["step_size"], 1.5 / 255)


def test_pgd_without_random_start_does_not_depend_on_the_generator():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x, y = torch.rand(5, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    runs = [
        pgd_linf(
            model,
            x,
            y,
            eps=0.05,
            step_size=0.01,
            steps=3,
            random_start=start,
            generator=torch.Generator().manual_seed(seed),
        )
        for start in (False, True)
        for seed in (0, 1)
    ]
    assert torch.equal(runs[0], runs[1]), "no random start: the same from any generator"
    assert not torch.equal(runs[2], runs[3]), "a random start draws from the generator"


def test_clean_label_rate_as_a_fraction_of_the_target_class(digits):
    trigger = create_trigger("sig", digits.train.input_shape)
    in_class = int((digits.train.labels == 2).sum())
    whole = poison_dataset(
        digits.train, trigger, PoisonSpec(rate=1.0, target=2, clean_label=True, rate_of="target"), seed=0
    )
    assert whole.num_poisoned == in_class and bool((whole.original_labels[whole.mask] == 2).all())
    half = poison_dataset(
        digits.train, trigger, PoisonSpec(rate=0.5, target=2, clean_label=True, rate_of="target"), seed=0
    )
    assert half.num_poisoned == round(0.5 * in_class)
    count = poison_dataset(
        digits.train, trigger, PoisonSpec(rate=30, target=2, clean_label=True, rate_of="target"), seed=0
    )
    assert count.num_poisoned == 30, "a count stays a count"
    train_share = poison_dataset(digits.train, trigger, PoisonSpec(rate=0.05, target=2, clean_label=True), seed=0)
    assert train_share.num_poisoned == round(0.05 * len(digits.train)), "the default stays a share of the training set"
    with pytest.raises(ValueError, match="is for clean-label poisoning"):
        PoisonSpec(rate=0.1, rate_of="target").validate(10)
    with pytest.raises(ValueError, match="valid: train, target"):
        PoisonSpec(rate=0.1, clean_label=True, rate_of="class").validate(10)
    # BackdoorBench's pratio 0.1 for SIG on CIFAR-10 is its whole target class: here, a run's field
    spec = (
        RunConfig(dataset="cifar10", attack="sig", preset="backdoorbench", poison_rate=1.0, poison_rate_of="target")
        .resolved()
        .poison_spec()
    )
    assert (spec.rate, spec.rate_of, spec.clean_label) == (1.0, "target", True)


def test_the_default_rate_of_leaves_sweep_keys_as_they_were():
    from backdoorlab.experiments.grid import ADDED_FIELDS, cell_key

    assert ADDED_FIELDS["poison_rate_of"] == RunConfig().poison_rate_of == "train", "left out of keys at its default"
    plain = cell_key(RunConfig(dataset="digits", attack="sig").resolved())
    assert plain != cell_key(RunConfig(dataset="digits", attack="sig", poison_rate_of="target").resolved())

"""Time series: UCR folders and sktime sets, series triggers, 1-D models, a backdoor that takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from backdoorlab.attacks import attacks_for, create_trigger
from backdoorlab.cli import app
from backdoorlab.data import DataError, load_dataset
from backdoorlab.defenses import DefenseWarning
from backdoorlab.defenses.e2abl import ShallowHead, split_at
from backdoorlab.experiments import RunConfig, run
from backdoorlab.models import create_model
from backdoorlab.training.augment import jitter, random_scaling

SERIES_MODELS = ["fcn", "resnet1d", "inception_time", "inception_time_small"]


def _write_ucr(root: Path, name: str, train: str, test: str) -> None:
    folder = root / "ucr" / name
    folder.mkdir(parents=True)
    (folder / f"{name}_TRAIN.tsv").write_text(train)
    (folder / f"{name}_TEST.tsv").write_text(test)


def test_ucr_folder_maps_labels_and_keeps_their_names(tmp_path):
    _write_ucr(tmp_path, "Toy", "-1\t0\t1\t2\n1\t3\t4\t5\n-1\t1\t1\t1\n", "1\t0\t0\t0\n-1\t2\t2\t2\n")
    splits = load_dataset("ucr:Toy", tmp_path)
    train = splits.train
    assert train.modality == "series" and train.inputs.dtype == torch.float32
    assert train.input_shape == (1, 3) and train.classes == ("-1", "1")
    assert train.labels.tolist() == [0, 1, 0] and splits.test.labels.tolist() == [1, 0]
    assert train.mean[0] == pytest.approx(np.mean([0, 1, 2, 3, 4, 5, 1, 1, 1]), abs=1e-5)
    assert train.std[0] == pytest.approx(np.std([0, 1, 2, 3, 4, 5, 1, 1, 1]), abs=1e-5)


def test_ucr_errors_name_the_file_and_the_problem(tmp_path, monkeypatch):
    _write_ucr(tmp_path, "Broken", "1\t0\t1\n2\t0\tabc\n", "1\t0\t1\n")
    with pytest.raises(DataError, match=r"Broken_TRAIN\.tsv"):
        load_dataset("ucr:Broken", tmp_path)
    _write_ucr(tmp_path, "Gappy", "1\t0\tNaN\n2\t0\t1\n", "1\t0\t1\n")
    with pytest.raises(DataError, match="missing"):
        load_dataset("ucr:Gappy", tmp_path)
    _write_ucr(tmp_path, "Unseen", "1\t0\t1\n2\t0\t1\n", "3\t0\t1\n")
    with pytest.raises(DataError, match="never occur"):
        load_dataset("ucr:Unseen", tmp_path)
    with pytest.raises(DataError, match="sets there: Broken, Gappy, Unseen"):
        load_dataset("ucr:Absent", tmp_path)
    monkeypatch.delenv("BACKDOORLAB_DATA", raising=False)
    with pytest.raises(DataError, match="none is set"):
        load_dataset("ucr:Absent")
    with pytest.raises(DataError, match="prefixed names are ucr:<Name>, sktime:<Name>"):
        load_dataset("foo:Bar")


def test_shared_ucr_folder_matches_sktime_copy(data_root):
    pytest.importorskip("sktime")
    folder = load_dataset("ucr:GunPoint", data_root)
    bundled = load_dataset("gunpoint")
    assert folder.train.input_shape == (1, 150) and len(folder.train) == 50 and len(folder.test) == 150
    assert folder.train.classes == bundled.train.classes == ("1", "2")
    assert torch.equal(folder.train.labels, bundled.train.labels)
    assert torch.allclose(folder.train.inputs, bundled.train.inputs, atol=1e-5)


def test_sktime_bundled_sets_load_offline():
    pytest.importorskip("sktime", reason="the timeseries extra (sktime) is not installed")
    motions = load_dataset("basicmotions")
    assert motions.train.input_shape == (6, 100) and motions.train.num_classes == 4
    assert set(motions.train.classes) == {"standing", "running", "walking", "badminton"}
    italy = load_dataset("italypowerdemand")
    assert italy.train.input_shape == (1, 24) and len(italy.test) == 1029


def _series(n: int = 6, length: int = 50, channels: int = 2) -> torch.Tensor:
    return torch.randn((n, channels, length), generator=torch.Generator().manual_seed(0)) * 3 + 1


def test_pattern_trigger_touches_only_its_window_with_peak_amplitude_times_std():
    x = _series()
    trigger = create_trigger("ts_pattern", (2, 50), shape="square", width=5, position="end", amplitude=1.5)
    delta = trigger(x) - x
    assert torch.all(delta[..., :45] == 0)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    assert torch.allclose(delta[..., 45:], 1.5 * std.expand(-1, -1, 5), atol=1e-5)
    for shape in ("sine", "spike"):
        d = create_trigger("ts_pattern", (2, 50), shape=shape, position=10, width=8)(x) - x
        assert torch.allclose(d.abs().amax(-1), std[..., 0], rtol=1e-4)  # peak = 1 x std
        assert torch.all(d[..., :10] == 0) and torch.all(d[..., 18:] == 0)


def test_random_position_is_drawn_per_series_and_seeded():
    x = _series(n=32)
    trigger = create_trigger("ts_pattern", (2, 50), position="random", shape="square")
    a = trigger(x, torch.Generator().manual_seed(1)) - x
    b = trigger(x, torch.Generator().manual_seed(1)) - x
    assert torch.equal(a, b)
    starts = (a[:, 0] != 0).float().argmax(1)
    assert len(set(starts.tolist())) > 5


def test_sine_and_frequency_triggers_live_at_their_frequencies():
    x = _series(n=4, length=64, channels=1)
    sine = create_trigger("ts_sine", (1, 64), frequency=6, amplitude=0.5)
    spectrum = torch.fft.rfft((sine(x) - x)[:, 0]).abs()
    assert (spectrum.argmax(1) == 6).all()
    assert (spectrum[:, 6] > 100 * torch.cat([spectrum[:, :6], spectrum[:, 7:]], 1).amax(1)).all()
    freq = create_trigger("ts_frequency", (1, 64))
    assert freq.config()["frequencies"] == [16, 31]
    d = freq(x) - x
    spectrum = torch.fft.rfft(d[:, 0]).abs()
    others = torch.ones(33, dtype=torch.bool)
    others[[16, 31]] = False
    assert (spectrum[:, [16, 31]] > 1).all() and (spectrum[:, others] < 1e-3).all()
    assert torch.allclose(d.abs().amax(-1)[:, 0], 0.2 * x.std(-1, unbiased=False)[:, 0], rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(attacks_for("series")),
    channels=st.integers(1, 3),
    length=st.integers(12, 200),
    n=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_series_trigger_keeps_shape_dtype_and_input(name, channels, length, n, seed):
    trigger = create_trigger(name, (channels, length))
    x = torch.randn((n, channels, length), generator=torch.Generator().manual_seed(seed))
    original = x.clone()
    y = trigger(x, torch.Generator().manual_seed(seed))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(x, original), "triggers are pure: the input is untouched"
    assert torch.equal(y, trigger(x, torch.Generator().manual_seed(seed))), "reproducible under a seed"
    assert not torch.equal(y, x)


def test_constant_series_stay_unchanged_and_modalities_do_not_mix():
    flat = torch.full((2, 1, 30), 4.0)
    for name in ("ts_pattern", "ts_sine", "ts_frequency"):
        assert torch.equal(create_trigger(name, (1, 30))(flat), flat)
    with pytest.raises(ValueError, match="image attack.*attacks for series data: .*ts_frequency"):
        create_trigger("badnets", (1, 30))
    with pytest.raises(ValueError, match="series attack.*attacks for image data: .*badnets"):
        create_trigger("ts_sine", (1, 8, 8))
    with pytest.raises(ValueError, match="float32 series"):
        create_trigger("ts_sine", (1, 30))(flat.double())
    with pytest.raises(ValueError, match="unknown shape 'zigzag'; valid: sine, spike, square"):
        create_trigger("ts_pattern", (1, 30), shape="zigzag")


@pytest.mark.parametrize("name", SERIES_MODELS)
def test_series_models_share_the_classifier_interface(name):
    for channels in (1, 6):
        model = create_model(name, 3, channels, (0.0,) * channels, (1.0,) * channels).eval()
        x = torch.randn(4, channels, 57)
        features = model.forward_features(x)
        assert features.dim() == 3 and features.shape[1] == model.num_features
        assert model(x).shape == (4, 3)
        assert model.forward_head(features, pre_logits=True).shape == (4, model.num_features)
    depth = min(2, len(model.body) - 1)
    main, h = split_at(model, x, depth)
    assert main.shape == ShallowHead.for_model(model, depth, x)(h).shape == (4, 3)


def test_series_augmentations():
    x = _series(n=2000, length=40, channels=1)
    g = torch.Generator().manual_seed(0)
    noise = jitter(x, 0.1, g) - x
    assert noise.std().item() == pytest.approx(0.1 * x.std(-1).mean().item(), rel=0.05)
    factors = random_scaling(x, 0.2, g) / x
    assert torch.allclose(factors, factors[..., :1].expand_as(factors), atol=1e-4)
    assert factors[:, 0, 0].std().item() == pytest.approx(0.2, rel=0.1)


def test_series_config_defaults_and_refusals():
    config = RunConfig(dataset="ucr:GunPoint").resolved()
    assert (config.attack, config.model) == ("ts_pattern", "fcn")
    assert config.train.crop_padding == 0 and config.train.epochs == 100
    with pytest.raises(ValueError, match="attack 'badnets' does not take series data.*only image.*ts_pattern"):
        RunConfig(dataset="gunpoint", attack="badnets").resolved()
    with pytest.raises(ValueError, match="model 'small_cnn' does not take series data.*fcn"):
        RunConfig(dataset="gunpoint", model="small_cnn").resolved()
    with pytest.raises(ValueError, match="model 'fcn' does not take image data"):
        RunConfig(dataset="digits", model="fcn").resolved()


@pytest.mark.slow
def test_pattern_backdoor_takes_on_gunpoint_with_clean_accuracy_kept():
    pytest.importorskip("sktime", reason="the timeseries extra (sktime) is not installed")
    clean = run(RunConfig(dataset="gunpoint", poison_rate=0.0, device="cpu"))
    poisoned = run(RunConfig(dataset="gunpoint", poison_rate=0.1, device="cpu"))
    assert clean.metrics["attack_success_rate"] < 0.2
    assert poisoned.data["poisoned"] == 5
    assert poisoned.metrics["attack_success_rate"] >= 0.9
    assert poisoned.metrics["clean_accuracy"] >= clean.metrics["clean_accuracy"] - 0.05


@pytest.mark.slow
def test_cli_runs_and_plots_a_series_set(tmp_path):
    pytest.importorskip("sktime", reason="the timeseries extra (sktime) is not installed")
    pytest.importorskip("matplotlib")
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--dataset", "italypowerdemand", "--epochs", "3", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "ts_pattern" in result.output and (tmp_path / "result.json").exists()
    out = tmp_path / "trigger.png"
    result = runner.invoke(app, ["show-trigger", "--dataset", "gunpoint", "--attack", "ts_sine", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1000
    result = runner.invoke(app, ["run", "--dataset", "gunpoint", "--attack", "badnets"])
    assert result.exit_code != 0 and "ts_pattern" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["abl", "e2abl", "fine_tuning", "fine_pruning", "nad"])
def test_defenses_run_on_series_unchanged(defense):
    """Training-time defenses and repairs take series as they are; the model they return still
    classifies (ItalyPowerDemand, 20 epochs: a quick run, not a removal test).

    E2ABL at its defaults flags nothing here, and the test says so rather than passing over it: on
    these small sets (67 series, 5 poisoned) no shallow-head loss falls below its flag threshold of
    0.01 (set on MNIST), so it isolates nothing, warns, and the backdoor stays (docs/time_series.md;
    measured ASR 0.814 with and without it). Measured too with ``flag_loss`` 0.1, at poison rate
    0.2, and with the two-class scaling below: nothing flagged on ItalyPowerDemand. The test after
    this one shows where it does flag."""
    pytest.importorskip("sktime", reason="the timeseries extra (sktime) is not installed")
    config = RunConfig(dataset="italypowerdemand", epochs=20, trusted_size=0.2, defense=defense, device="cpu")
    if defense == "e2abl":
        with pytest.warns(DefenseWarning, match="E2ABL flagged no training sample"):
            result = run(config)
        assert result.metrics["isolated"] == 0 and result.metrics["isolation_recall"] == 0.0
    else:
        result = run(config)
    assert result.metrics["clean_accuracy"] >= 0.75
    if defense == "abl":
        assert result.metrics["isolated"] == 1, "ABL's 1% of 54 series: one"
    elif defense != "e2abl":
        assert result.metrics["suspect_clean_accuracy"] >= 0.75


@pytest.mark.slow
@pytest.mark.heavy  # kept out of CI: on a 2-thread AMD EPYC (2026-12-07) it flagged nothing
def test_e2abl_flags_the_poisoned_series_of_a_bundled_set_with_two_class_settings():
    """E2ABL on GunPoint (50 series, 2 classes, ``ts_pattern`` at 10%: 5 poisoned), the default
    recipe (FCN, 100 epochs), with ABL's loss floor and E2ABL's flag threshold scaled by
    ln 2 / ln 10, the ratio of the chance losses of 2 and 10 classes (``gamma=0.15``,
    ``flag_loss=0.003``; docs/time_series.md, the Strawberry runs). At the defaults (gamma 0.5,
    flag 0.01) it flags nothing on GunPoint: a floor of 0.5 holds the clean series near the binary
    chance loss of 0.69 (measured with ``flag_loss=0.1`` alone too: nothing flagged). Measured:
    5 flagged, all 5 poisoned; ASR 0.000, CA 0.927, where the undefended run of the same config
    has ASR 0.946 and CA 0.947 (docs/time_series.md;
    ``test_pattern_backdoor_takes_on_gunpoint_with_clean_accuracy_kept`` checks that it takes). On a
    2-thread AMD EPYC (2026-12-07) the same config flagged nothing (ASR 0.784, CA 0.927): the
    threshold sits at the edge of what the machine's float order gives, so the test is heavy."""
    pytest.importorskip("sktime", reason="the timeseries extra (sktime) is not installed")
    options = {"gamma": 0.15, "flag_loss": 0.003}
    defended = run(
        RunConfig(dataset="gunpoint", poison_rate=0.1, defense="e2abl", defense_options=options, device="cpu")
    )
    assert defended.metrics["isolation_precision"] >= 0.8 and defended.metrics["isolation_recall"] >= 0.8, (
        defended.metrics
    )
    assert defended.metrics["attack_success_rate"] < 0.2
    assert defended.metrics["clean_accuracy"] >= 0.88, "within 7 points of the undefended 0.947 (150 test series)"


@pytest.mark.slow
@pytest.mark.heavy
def test_e2abl_removes_a_pattern_backdoor_from_a_500_series_set(data_root):
    """E2ABL with the ``mixture`` flag rule on UCR SwedishLeaf (500 training series, 15 classes),
    ``ts_pattern`` at 10%: each epoch's threshold is the low mode of the shallow head's losses, the
    poisoned series fall in it, and the backdoor goes (docs/time_series.md, "Training-time defenses
    on the larger sets", one thread, 2026-12-07: undefended CA 0.950, ASR 0.955; mixture CA 0.944,
    ASR 0.003, 58 flagged at precision 0.83, recall 0.96). The fixed threshold (0.01) sits at the edge of the poisoned losses here: it removed
    the backdoor on 2026-11-24's machine (ASR 0.002) and flagged 3 series on this one (ASR 0.912),
    so the test checks the rule that does not depend on that edge. At two threads the same config
    removed the backdoor too but kept CA 0.810 (before the rule's label and floor checks), so the thread count is pinned, as ABL's MNIST test
    does: the test checks the rule, not the float order. The undefended run is not
    repeated (it doubled the test's two minutes): the CA bar is its measured 0.950 less 5 points,
    and ``test_pattern_backdoor_takes_on_gunpoint_with_clean_accuracy_kept`` checks that the attack
    takes."""
    base = dict(dataset="ucr:SwedishLeaf", data_root=str(data_root), attack="ts_pattern", poison_rate=0.1, device="cpu")
    defended = run(RunConfig(**base, defense="e2abl", defense_options={"flag_rule": "mixture"}, threads=1))
    assert defended.details["head_switched_at"] is None
    assert defended.metrics["attack_success_rate"] < 0.2
    assert defended.metrics["clean_accuracy"] > 0.950 - 0.05, "CA within 5 points of the undefended run's"
    assert defended.metrics["isolation_precision"] > 0.5 and defended.metrics["isolation_recall"] > 0.8
    assert defended.details["flag_threshold_last"] > 0, "a low mode was found"


def test_trigger_inversion_refuses_series():
    pytest.importorskip("sktime", reason="the timeseries extra (sktime) is not installed")
    with pytest.raises(ValueError, match="detector 'neural_cleanse' does not take series data .*only image"):
        run(RunConfig(dataset="italypowerdemand", epochs=1, detector="neural_cleanse", device="cpu"))

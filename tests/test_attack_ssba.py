"""SSBA (attacks.ssba): the reference's networks and their shapes, the trainer's loss and L2 ramp by
hand, a fitted trigger that is a pure, seeded function, training that teaches the decoder the bits,
and the encoder cache. No test that the backdoor takes: at the CPU defaults it does not on digits
(CA 0.969, ASR 0.432 in 5 minutes; the module docstring says why)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.attacks import PoisonSpec, create_trigger, poison_dataset
from backdoorlab.attacks.ssba import (
    SSBA,
    StegaStampDecoder,
    StegaStampEncoder,
    bit_accuracy,
    l2_weight,
    psnr,
    stegastamp_loss,
)
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.experiments.presets import BACKDOORBENCH_ATTACKS

#: Cheap training for the fast tests.
TINY = {"steps": 4, "batch_size": 8, "images": 16, "bits": 8}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test trains into its own cache folder, so no test reads another's (or a user's) encoder."""
    monkeypatch.setenv("BACKDOORLAB_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(count: int = 16, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 8, 8), (3, 30, 45)])
def test_the_networks_keep_the_image_shape_and_read_bits_of_any_size(shape):
    encoder, decoder = StegaStampEncoder(shape[0], bits=10), StegaStampDecoder(*shape, bits=10)
    encoded = encoder(torch.rand(2, 10).round(), torch.rand(2, *shape))
    assert encoded.shape == (2, *shape) and 0 <= encoded.min() and encoded.max() <= 1
    assert decoder(encoded).shape == (2, 10)


def test_the_networks_have_the_reference_layers_at_32_px():
    encoder, decoder = StegaStampEncoder(3), StegaStampDecoder(3, 32, 32)
    assert (encoder.secret_dense.in_features, encoder.secret_dense.out_features) == (100, 16 * 16 * 3)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 15
    assert [(c.in_channels, c.out_channels) for c in convs][:5] == [(6, 32), (32, 32), (32, 64), (64, 128), (128, 256)]
    assert (encoder.conv9.in_channels, encoder.residual.out_channels) == (32 + 32 + 6, 3)
    assert decoder.dense[0].in_features == 32 * 32 * 128 // 32 // 32 and decoder.dense[-1].out_features == 100


def test_the_loss_and_the_l2_ramp_are_the_reference_formulas_by_hand():
    encoded, clean = torch.tensor([[0.2, 0.8]]), torch.tensor([[0.0, 1.0]])
    logits, secret = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 1.0]])
    loss, l2, bce = stegastamp_loss(encoded, clean, logits, secret, 3.0, 0.5)
    by_hand_l2 = (0.2**2 + 0.2**2) / 2
    by_hand_bce = -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(torch.sigmoid(torch.tensor(-1.0)))) / 2
    assert l2.item() == pytest.approx(by_hand_l2) and bce.item() == pytest.approx(by_hand_bce.item())
    assert loss.item() == pytest.approx(3.0 * by_hand_l2 + 0.5 * by_hand_bce.item())
    # zero until the bits are read (-1), through the wait, then linear up to the weight
    assert [l2_weight(t, 10.0, 100, 300) for t in (-1, 0, 100, 250, 400, 1000)] == [0.0, 0.0, 0.0, 5.0, 10.0, 10.0]
    assert bit_accuracy(logits, secret) == 0.5
    assert psnr(torch.full((1, 4), 0.1), torch.zeros(1, 4)) == pytest.approx(20.0)


def test_the_fitted_trigger_is_a_pure_seeded_function_of_the_images_and_options(tmp_path, monkeypatch):
    x = images()
    trigger = create_trigger("ssba", (1, 8, 8), **TINY)
    assert trigger.needs_images and not trigger.fitted
    with pytest.raises(ValueError, match="fits on the attacker's clean images"):
        poison_dataset(
            TensorDataset(x, torch.arange(16) % 4, tuple("abcd"), (0.5,), (0.25,), "tiny"), trigger, PoisonSpec(), 0
        )
    trigger.fit(None, images=x)
    out = trigger(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(trigger(x), out) and torch.equal(trigger(x[:3]), out[:3]), "per image, no batch effects"
    monkeypatch.setenv("BACKDOORLAB_CACHE", str(tmp_path / "another cache"))  # trained again, not loaded
    again = create_trigger("ssba", (1, 8, 8), **TINY)
    again.fit(None, images=x)
    assert again.fit_report["trained"] == 1.0
    assert torch.equal(again(x), out) and torch.equal(again.secret, trigger.secret)
    other = create_trigger("ssba", (1, 8, 8), **TINY, seed=1)
    other.fit(None, images=x)
    assert not torch.equal(other.secret, trigger.secret) and not torch.equal(other(x), out)
    assert trigger.secret.shape == (8,) and set(trigger.secret.tolist()) <= {0.0, 1.0}


def test_the_encoder_is_cached_by_images_and_options_and_reused(monkeypatch):
    x = images()
    first = create_trigger("ssba", (1, 8, 8), **TINY)
    first.fit(None, images=x)
    assert first.fit_report["trained"] == 1.0
    calls = []
    monkeypatch.setattr(SSBA, "_train", lambda self, imgs: calls.append(1) or self.networks())
    second = create_trigger("ssba", (1, 8, 8), **TINY)
    second.fit(None, images=x)
    assert not calls and second.fit_report["trained"] == 0.0
    assert torch.equal(second(x), first(x)), "the cached encoder is the trained one"
    for changed in ({"images": 255 - x}, {"options": {"steps": 5}}):
        trigger = create_trigger("ssba", (1, 8, 8), **{**TINY, **changed.get("options", {})})
        trigger.fit(None, images=changed.get("images", x))
        assert trigger.fit_report["trained"] == 1.0
    assert len(calls) == 2


def test_training_teaches_the_encoder_to_give_the_image_back():
    """The image term at work: PSNR of the encoded images rises from an untrained encoder's (the bits
    themselves are not read within a CPU budget: see the module docstring)."""
    x = images(64, seed=3)
    options = {"steps": 60, "batch_size": 16, "images": 64, "bits": 8, "lr": 1e-3, "l2_await": 0, "l2_ramp": 1}
    untrained = create_trigger("ssba", (1, 8, 8), **options)
    untrained.encoder, untrained.decoder = (net.eval() for net in untrained.networks())
    trained = create_trigger("ssba", (1, 8, 8), **options)
    trained.fit(None, images=x)
    before, after = (psnr(t(x).float() / 255, x.float() / 255) for t in (untrained, trained))
    assert after > before + 5 and trained.fit_report["psnr"] == pytest.approx(after, abs=0.5), (before, after)


def test_the_backdoorbench_preset_is_the_readmes_trainer_on_cifar10():
    trigger = create_trigger("ssba", (3, 32, 32), **BACKDOORBENCH_ATTACKS["ssba"])
    assert trigger.steps == 20 * -(-50_000 // 64) and trigger.images >= 50_000
    assert (trigger.l2_await, trigger.l2_ramp, trigger.l2_start, trigger.bits, trigger.lr) == (
        1000,
        3000,
        "bits",
        100,
        1e-4,
    )

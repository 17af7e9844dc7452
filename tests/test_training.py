from __future__ import annotations

import math

import pytest
import torch

from backdoorlab.data import TensorDataset, subsample
from backdoorlab.models import create_model
from backdoorlab.training import Callback, TrainConfig, predict, train
from backdoorlab.training.augment import random_crop, random_hflip

FAST = TrainConfig(epochs=2, batch_size=64, lr=0.05, progress=False)


def fresh_model(data, seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", data.num_classes, data.in_channels, data.mean, data.std, width=8)


def test_training_is_deterministic_on_cpu(digits):
    data = subsample(digits.train, 300, seed=0)
    a, b = fresh_model(data), fresh_model(data)
    train(a, data, FAST, seed=7)
    train(b, data, FAST, seed=7)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_training_learns_digits(digits):
    model = fresh_model(digits.train)
    history = train(model, digits.train, TrainConfig(epochs=8, batch_size=64, lr=0.05, progress=False))
    assert history.loss[-1] < history.loss[0]
    accuracy = (predict(model, digits.test.inputs) == digits.test.labels).float().mean()
    assert accuracy > 0.9


def test_a_model_predicted_with_before_training_still_trains(digits):
    """Predicting converts a fresh model to channels_last; done inside inference mode, that made
    its weights inference tensors and a later ``train`` failed."""
    data = subsample(digits.train, 200, seed=0)
    model = fresh_model(data)
    predict(model, data.inputs)
    assert not any(p.is_inference() for p in model.parameters())
    history = train(model, data, FAST)
    assert len(history.loss) == FAST.epochs


def test_callbacks_see_every_sample_once_per_epoch(digits):
    data = subsample(digits.train, 200, seed=0)

    class Recorder(Callback):
        def __init__(self):
            self.seen: dict[int, list[int]] = {}
            self.epochs_ended: list[int] = []

        def on_batch_end(self, indices, losses, epoch):
            assert losses.shape == indices.shape and not losses.requires_grad
            self.seen.setdefault(epoch, []).extend(indices.tolist())

        def on_epoch_end(self, epoch, model):
            self.epochs_ended.append(epoch)

    recorder = Recorder()
    train(fresh_model(data), data, FAST, callbacks=[recorder])
    assert recorder.epochs_ended == [0, 1]
    for epoch in (0, 1):
        assert sorted(recorder.seen[epoch]) == list(range(200))


def test_loss_fn_replaces_the_per_sample_loss(digits):
    """A loss of zero (no weight decay) leaves the trainable weights untouched; the indices passed
    to the hook are positions in the training set, so a defense can weigh chosen samples."""
    data = subsample(digits.train, 128, seed=0)
    model = fresh_model(data)
    before = {k: v.clone() for k, v in model.named_parameters()}
    seen = []

    def zero_loss(logits, labels, indices, epoch):
        seen.append(indices)
        return logits.sum(1) * 0.0

    train(model, data, TrainConfig(epochs=1, batch_size=32, weight_decay=0.0, progress=False), loss_fn=zero_loss)
    assert sum(len(i) for i in seen) == 128
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_gradient_ascent_hook_unlearns(digits):
    """Negating the loss (as ABL's unlearning does for isolated samples) drives accuracy down."""
    data = digits.train
    model = fresh_model(data)
    train(model, data, TrainConfig(epochs=5, batch_size=64, progress=False))
    acc = lambda: float((predict(model, digits.test.inputs) == digits.test.labels).float().mean())  # noqa: E731
    assert acc() > 0.9
    ascent = lambda logits, y, i, e: -torch.nn.functional.cross_entropy(logits, y, reduction="none")  # noqa: E731
    train(
        model, data, TrainConfig(epochs=1, batch_size=64, lr=0.05, schedule="constant", progress=False), loss_fn=ascent
    )
    assert acc() < 0.5


def test_random_crop_shifts_whole_images():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5) + 1
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # each output is one window of the padded image
        windows = [padded[i, :, r : r + 5, c : c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_random_crop_works_on_uint8_and_varies():
    x = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 1, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and (out != x).flatten(1).any(1).sum() > 32


def test_random_hflip_flips_about_half():
    x = torch.rand(1000, 1, 2, 2)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = torch.isclose(out, x.flip(-1)).flatten(1).all(1)
    kept = torch.isclose(out, x).flatten(1).all(1)
    assert (flipped | kept).all() and 400 < int(flipped.sum()) < 600


def test_bad_train_config_is_refused(digits):
    with pytest.raises(ValueError, match="valid: onecycle, triangle, cosine, step, constant"):
        train(fresh_model(digits.train), digits.train, TrainConfig(schedule="steps"))
    with pytest.raises(ValueError, match="milestones between 1 and epochs - 1 .4., got \\[5\\]"):
        train(fresh_model(digits.train), digits.train, TrainConfig(epochs=5, schedule="step", milestones=[5]))


@pytest.mark.parametrize("samples", [1, 3, 5, 9])
def test_onecycle_schedule_survives_runs_of_a_few_steps(samples):
    """OneCycleLR divided by zero for 5 steps at warm-up 0.2 (one epoch of a tiny UCR set)."""
    data = TensorDataset(
        torch.randint(0, 255, (samples, 1, 8, 8), dtype=torch.uint8),
        torch.arange(samples) % 2,
        ("0", "1"),
        (0.5,),
        (0.25,),
        "tiny",
    )
    model = create_model("small_cnn", 2, 1, data.mean, data.std)
    history = train(model, data, TrainConfig(epochs=1, batch_size=1, progress=False))
    assert len(history.loss) == 1 and math.isfinite(history.loss[0])

from __future__ import annotations

import math

import pytest
import torch

from backdoorlab.data import TensorDataset, subsample
from backdoorlab.models import create_model
from backdoorlab.training import Callback, TrainConfig, TrainStep, loop, plain_step, predict, train
from backdoorlab.training.augment import random_crop, random_hflip
from backdoorlab.training.callbacks import FreezeWhiteningBias, LookaheadAveraging
from backdoorlab.training.loop import BatchAugmentation, recipe_callbacks, train_step
from backdoorlab.training.regularizers import create_regularizer

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


def test_hooks_run_in_order_with_the_recipe_callbacks_first(digits, monkeypatch):
    """Each epoch opens with on_epoch_start; optimiser steps are counted over the run; the recipe's
    callbacks (Lookahead, the whitening-bias freeze) run before the caller's at every hook, so a
    caller's on_epoch_end sees the averaged weights."""
    data = subsample(digits.train, 100, seed=0)
    events = []

    class Recorder(Callback):
        def __init__(self, who):
            self.who = who

        def on_epoch_start(self, epoch, model):
            events.append((self.who, "start", epoch))

        def on_step_end(self, step, steps, model):
            events.append((self.who, "step", step, steps))

        def on_batch_end(self, indices, losses, epoch):
            events.append((self.who, "batch", epoch))

        def on_epoch_end(self, epoch, model):
            events.append((self.who, "end", epoch))

    monkeypatch.setattr(loop, "recipe_callbacks", lambda config, model: [Recorder("recipe")])
    train(fresh_model(data), data, TrainConfig(epochs=2, batch_size=25, progress=False), callbacks=[Recorder("user")])
    expected = []
    for epoch in (0, 1):
        hooks = [("start", epoch)]
        for k in range(1, 5):  # 100 samples in batches of 25; steps count over the run's 8
            hooks += [("step", 4 * epoch + k, 8), ("batch", epoch)]
        hooks.append(("end", epoch))
        expected += [(who, *hook) for hook in hooks for who in ("recipe", "user")]
    assert events == expected


def test_recipe_callbacks_follow_the_config():
    small = create_model("small_cnn", 10, 1, (0.5,), (0.25,), width=8)
    airbench = create_model("airbench", 10, 3, (0.5,) * 3, (0.25,) * 3, width=8)
    assert recipe_callbacks(TrainConfig(), airbench) == []
    both = TrainConfig(lookahead_epoch=2, whiten_bias_epochs=3)
    assert [type(c) for c in recipe_callbacks(both, airbench)] == [FreezeWhiteningBias, LookaheadAveraging]
    assert [type(c) for c in recipe_callbacks(both, small)] == [LookaheadAveraging]  # no whitening layer
    freeze = recipe_callbacks(both, airbench)[0]
    for epoch, trains in ((0, True), (2, True), (3, False), (4, False)):
        freeze.on_epoch_start(epoch, airbench)
        assert airbench.body.whitening_bias.requires_grad is trains


def test_lookahead_averaging_starts_at_its_epoch_and_returns_the_average():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    averaging = LookaheadAveraging(start=1)
    averaging.on_epoch_start(0, model)
    assert averaging.lookahead is None
    averaging.on_epoch_start(1, model)  # average starts at the current weights (0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    averaging.on_step_end(4, 10, model)  # not a multiple of 5: untouched
    assert torch.equal(model.weight, torch.ones(1, 2))
    averaging.on_epoch_end(1, model)  # an epoch's end: the steps since the last average stay
    assert torch.equal(model.weight, torch.ones(1, 2))
    averaging.on_step_end(9, 10, model)  # not a multiple of 5, not the last step: untouched
    assert torch.equal(model.weight, torch.ones(1, 2))
    averaging.lookahead.every = 4  # so the last step is no averaging step: the copy alone acts
    averaging.on_step_end(10, 10, model)  # after the last step the average (still 0) becomes the weights
    assert torch.equal(model.weight, torch.zeros(1, 2))


def test_a_custom_step_replaces_the_forward_and_excludes_a_regularizer(digits):
    data = subsample(digits.train, 64, seed=0)
    calls = []

    def step(model, x, y, loss_fn, indices, epoch, generator):
        calls.append((x.dtype, len(indices), epoch))
        return plain_step(model, x, y, loss_fn, indices, epoch, generator)

    train(fresh_model(data), data, TrainConfig(epochs=2, batch_size=32, progress=False), step=step)
    assert calls == [(torch.float32, 32, 0)] * 2 + [(torch.float32, 32, 1)] * 2
    with pytest.raises(ValueError, match="custom training step and a regularizer cannot be combined"):
        train(fresh_model(data), data, TrainConfig(regularizer="logit_squeezing", progress=False), step=step)
    assert TrainStep in type(create_regularizer("logit_squeezing")).__mro__  # regularisers are steps
    assert train_step(TrainConfig()) is plain_step


def test_batch_augmentation_builds_the_model_input_from_the_config():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=g)
    data = TensorDataset(images, torch.zeros(6, dtype=torch.int64), ("a",), (0.5,), (0.25,), "tiny", hflip=True)
    indices = torch.arange(6)
    plain = BatchAugmentation(TrainConfig(flip=False), data, g, torch.device("cpu"))
    assert torch.equal(plain(images, indices, 0), images.float() / 255)
    alternating = BatchAugmentation(TrainConfig(alternating_flip=True), data, g, torch.device("cpu"))
    even, odd = alternating(images, indices, 0), alternating(images, indices, 1)
    assert torch.equal(odd.flip(-1), even)  # each image shown both ways over two epochs
    mirrored = (even != plain(images, indices, 0)).flatten(1).any(1)
    assert torch.equal(even[mirrored], plain(images, indices, 0)[mirrored].flip(-1)) and 0 < int(mirrored.sum()) < 6


@pytest.mark.parametrize(
    ("samples", "min_last_batch", "sizes"),
    [(90, 1.0, [32, 32]), (90, 0.0, [32, 32, 26]), (90, 0.9, [32, 32]), (90, 0.8, [32, 32, 26]), (20, 1.0, [20])],
)
def test_a_last_batch_under_min_last_batch_is_skipped_but_never_a_whole_epoch(digits, samples, min_last_batch, sizes):
    """A last batch smaller than ``min_last_batch`` of a batch is skipped (1.0: airbench94's
    drop_last); a set smaller than one batch is still trained on."""
    data = subsample(digits.train, samples, seed=0)
    seen = []

    class Sizes(Callback):
        def on_batch_end(self, indices, losses, epoch):
            seen.append((epoch, len(indices)))

    config = TrainConfig(epochs=2, batch_size=32, min_last_batch=min_last_batch, progress=False)
    history = train(fresh_model(data), data, config, callbacks=[Sizes()])
    assert seen == [(epoch, size) for epoch in (0, 1) for size in sizes]
    assert len(history.loss) == 2 and all(math.isfinite(v) for v in history.loss)


def test_the_fast_recipe_skips_a_last_batch_under_half_and_repairs_keep_theirs():
    """The 30,000-image MNIST subset's 4-image last batch (29,700 after the trusted 1%) collapsed the
    fast recipe's lr 1.5 run (CA 0.45); the 10,000-image subset's 684-image one is kept."""
    from backdoorlab.defenses.post_training import tuning_recipe
    from backdoorlab.experiments import RunConfig
    from backdoorlab.training.loop import steps_in_epoch

    recipe = RunConfig(dataset="mnist").resolved().train
    assert steps_in_epoch(29_700, recipe) == 29 and steps_in_epoch(9_900, recipe) == 10
    assert tuning_recipe(recipe, epochs=1, lr=0.01, batch_size=64).min_last_batch == 0.0
    assert RunConfig(dataset="mnist", recipe="quick").resolved().train.min_last_batch == 0.0


def test_predictions_do_not_depend_on_the_device_default_batch():
    """The CPU predicts in batches of 128 (faster there), CUDA in 1,024; an eval-mode model's
    logits are the same either way, and the model's training mode is restored."""
    model = create_model("small_cnn", 10, 1)
    model.train()
    inputs = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    assert loop.inference_batch_size(torch.device("cpu")) == 128
    assert loop.inference_batch_size(torch.device("cuda")) == 1024
    by_default = loop.predict_logits(model, inputs)
    whole = loop.predict_logits(model, inputs, batch_size=1024)
    assert by_default.shape == (300, 10) and torch.allclose(by_default, whole, atol=1e-5)
    assert model.training


def test_without_a_terminal_training_logs_a_line_per_epoch_and_none_when_progress_is_turned_off(
    digits, caplog, monkeypatch
):
    monkeypatch.setattr("backdoorlab.progress.LOG_EVERY", 0.0)
    monkeypatch.delenv("BACKDOORLAB_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    data = subsample(digits.train, 300, seed=0)
    config = TrainConfig(epochs=3, batch_size=64, lr=0.05)
    with caplog.at_level("INFO", logger="backdoorlab"):
        train(fresh_model(data), data, config, description="toy")
    lines = [r.getMessage() for r in caplog.records if r.name == "backdoorlab"]
    assert [line.split(" loss")[0] for line in lines] == [f"toy: epoch {e}/3" for e in (1, 2, 3)], lines
    assert "(15/15, " in lines[-1], "the last line gives the steps done of all"
    caplog.clear()
    with caplog.at_level("INFO", logger="backdoorlab"):
        train(fresh_model(data), data, FAST)
    assert not [r for r in caplog.records if r.name == "backdoorlab"], "progress=False logs nothing"
    monkeypatch.setenv("BACKDOORLAB_PROGRESS", "0")
    with caplog.at_level("INFO", logger="backdoorlab"):
        train(fresh_model(data), data, config)
    assert not [r for r in caplog.records if r.name == "backdoorlab"], "BACKDOORLAB_PROGRESS=0 turns the lines off"

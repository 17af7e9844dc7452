"""MCR: the curve passes exactly through its endpoints and is the Bezier mix between them, only its
bends train, BackdoorBench's summed gradient is what its loop computes, and the batch-norm
statistics at the chosen point are recomputed; on two independently trained backdoored models the
trained curve's middle loses the backdoor where the straight line's loses the task (the paper's
finding), and on one MNIST suspect and its fine-tuned copy it does not (slow)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from backdoorlab.data import TensorDataset
from backdoorlab.defenses import DefenseContext, create_repair
from backdoorlab.defenses.mcr import (
    CurvePath,
    ModeConnectivityRepair,
    _AccumulatedGradients,
    curve_coefficients,
    recompute_batch_norm,
)
from backdoorlab.models import create_model
from backdoorlab.training.loop import TrainConfig, to_float

from .test_channel_pruning import trusted


def images(count: int, size: int = 16) -> TensorDataset:
    """Random 1 x size x size images in 4 classes (airbench needs 16 pixels or more)."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (count, 1, size, size), generator=g, dtype=torch.uint8)
    return TensorDataset(inputs, torch.arange(count) % 4, tuple("abcd"), (0.5,), (0.25,), "noise")


def two_models(name: str = "small_cnn") -> tuple[nn.Module, nn.Module]:
    """A model and a copy of it with every weight moved (frozen ones too)."""
    torch.manual_seed(0)
    start = create_model(name, num_classes=4, in_channels=1).eval()
    end = copy.deepcopy(start)
    with torch.no_grad():
        for p in end.parameters():
            p.add_(torch.randn_like(p))
    return start, end


def context(observer=None) -> DefenseContext:  # noqa: ANN001
    recipe = TrainConfig(epochs=1, progress=False, amp=False, channels_last=False)
    return DefenseContext(recipe, torch.device("cpu"), 0, observer)


def test_bezier_and_polychain_coefficients():
    assert curve_coefficients(0.5, 3) == [0.25, 0.5, 0.25]
    assert curve_coefficients(0.1, 3) == pytest.approx([0.81, 0.18, 0.01])
    assert sum(curve_coefficients(0.37, 5)) == pytest.approx(1.0)
    assert curve_coefficients(0.25, 3, "polychain") == [0.5, 0.5, 0.0]
    with pytest.raises(ValueError, match="t in"):
        curve_coefficients(1.5, 3)


@pytest.mark.parametrize("name", ["small_cnn", "airbench"])
def test_the_curve_reproduces_its_endpoints_exactly(name: str):
    start, end = two_models(name)
    path = CurvePath(start, end)
    for t, model in ((0.0, start), (1.0, end)):
        point = path.point(t)
        for (n, a), b in zip(point.named_parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b), n
        x = to_float(images(8).inputs)
        path.move(t)
        with torch.no_grad():
            assert torch.equal(path.model.eval()(x), model(x))


def test_the_curve_at_a_half_is_the_bezier_mix_and_the_polychain_passes_through_the_bend():
    start, end = two_models()
    path = CurvePath(start, end)
    bends = path.bends()
    with torch.no_grad():
        for bend in bends:
            bend.add_(torch.randn_like(bend))  # off the straight line
    middle, named_bends = path.point(0.5), dict(zip([n for n, _ in start.named_parameters()], bends, strict=True))
    for (name, w), a, b in zip(middle.named_parameters(), start.parameters(), end.parameters(), strict=True):
        assert torch.allclose(w, 0.25 * a + 0.5 * named_bends[name] + 0.25 * b, atol=1e-6), name
    chain = CurvePath(start, end, curve="polychain")
    for bend, moved in zip(chain.bends(), bends, strict=True):
        bend.data.copy_(moved)
    for w, bend in zip(chain.point(0.5).parameters(), bends, strict=True):
        assert torch.equal(w, bend)


def test_only_the_bends_train_and_a_frozen_weight_keeps_its_straight_line():
    start, end = two_models("airbench")
    frozen = {n for n, p in start.named_parameters() if not p.requires_grad}
    assert frozen, "airbench freezes its whitening and BN scales"
    path = CurvePath(start, end)
    before = [b.detach().clone() for b in path.model.parameters()]
    repair = ModeConnectivityRepair(epochs=2, batch_size=16)
    repair.train_curve(path, images(32), context())
    for (name, p), b in zip(path.model.named_parameters(), before, strict=True):
        assert torch.equal(p, b) != p.requires_grad, name  # the bends moved, nothing else did
    for name, (w, a) in zip(
        [n for n, _ in start.named_parameters()],
        zip(path.point(1.0).parameters(), end.parameters(), strict=True),
        strict=True,
    ):
        assert torch.equal(w, a), name  # the endpoint stays fixed
    for name, w, a, b in zip(
        [n for n, _ in start.named_parameters()],
        path.point(0.5).parameters(),
        start.parameters(),
        end.parameters(),
        strict=True,
    ):
        if name in frozen:
            assert torch.allclose(w, 0.5 * (a + b), atol=1e-5), name


def test_accumulated_gradients_hand_each_step_the_sum_of_the_gradients_so_far():
    """BackdoorBench's loop: the bend gets c_1(t_k) x (g_1 + ... + g_k), g_i the gradient at the
    curve's weight at step i."""
    start, end = nn.Linear(3, 1, bias=False), nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        start.weight.fill_(1.0)
        end.weight.fill_(3.0)
    path = CurvePath(start, end)
    _AccumulatedGradients(path)
    (bend,) = path.bends()
    x1, x2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[-1.0, 0.5, 2.0]])
    path.move(0.3)
    path.model(x1).sum().backward()  # d/dw of w.x is x
    assert torch.allclose(bend.grad, curve_coefficients(0.3, 3)[1] * x1)
    bend.grad = None
    path.move(0.8)
    path.model(x2).sum().backward()
    assert torch.allclose(bend.grad, curve_coefficients(0.8, 3)[1] * (x1 + x2))


def test_batch_norm_statistics_are_recomputed_from_scratch_on_the_data():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    model[1].running_mean.fill_(100.0)
    data = trusted(32)
    recompute_batch_norm(model, data, 8, torch.device("cpu"))
    with torch.no_grad():
        features = model[0](to_float(data.inputs))
    assert torch.allclose(model[1].running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert not model.training


def test_the_repair_shows_the_suspect_then_the_point_after_each_curve_epoch():
    start, _ = two_models()
    seen: list[int] = []
    repair = create_repair("mcr", epochs=2, tuning_epochs=1, batch_size=16, tuning_batch_size=16, t=0.4)
    outcome = repair.repair(start, trusted(32), context(lambda model, checkpoint: seen.append(checkpoint)))
    assert seen == [0, 1, 2] and repair.checkpoint_unit == "curve epoch"
    assert outcome.details["t"] == 0.4 and len(outcome.details["curve_loss"]) == 2
    assert not any(torch.equal(a, b) for a, b in zip(outcome.model.parameters(), start.parameters(), strict=True))
    with pytest.raises(ValueError, match="num_bends"):
        create_repair("mcr", num_bends=2)


@pytest.mark.slow
def test_the_trained_curve_between_two_backdoored_models_loses_the_backdoor_in_the_middle():
    """The paper's setting: two backdoored models (digits BadNets, 10 epochs, seeds 0 and 1 on the
    same poisoned data), the curve trained on the 20% trusted split (287 digits) for 50 epochs.
    Measured: the straight line's midpoint CA 0.56 (ASR 1.00); the curve's midpoint CA 0.97, ASR 0.29
    (0.18 after 100 epochs)."""
    from backdoorlab.experiments import RunConfig
    from backdoorlab.experiments.run import evaluate, post_training_context, prepare, train_victim

    prepared = prepare(RunConfig(dataset="digits", epochs=10, trusted_size=0.2))
    first, _ = train_victim(prepared)
    second, _ = train_victim(dataclasses.replace(prepared, config=dataclasses.replace(prepared.config, seed=1)))
    path = CurvePath(first, second)
    trusted_split, device = prepared.trusted, prepared.device

    def middle() -> dict[str, float]:
        return evaluate(prepared, recompute_batch_norm(path.point(0.5), trusted_split, 128, device))

    line = middle()
    ModeConnectivityRepair(epochs=50).train_curve(path, trusted_split, post_training_context(prepared, None))
    curve = middle()
    assert line["clean_accuracy"] < 0.8 and line["attack_success_rate"] > 0.9
    assert curve["clean_accuracy"] > 0.95 and curve["attack_success_rate"] < 0.5


@pytest.mark.slow
def test_mcr_leaves_badnets_in_an_mnist_airbench_whose_fine_tuned_copy_keeps_it(mnist_badnets_airbench):
    """A tenth of the official epochs (10 of fine-tuning the endpoint, 10 of the curve: 20 + 20 steps
    on the 250 trusted images). Measured: ASR 1.00 -> 1.00 at CA 0.985 -> 0.982; with 20 + 20
    epochs ASR 1.00 at CA 0.983, and at the defaults
    (100 + 100 epochs) the same 1.00 at every t of the curve: fine-tuning at lr 0.01 leaves the
    endpoint in the backdoor's basin (its ASR 1.00), and a curve trained on clean data between two
    points of one basin stays in it."""
    from backdoorlab.experiments.run import apply_repair

    prepared, model, suspect = mnist_badnets_airbench
    assert suspect["attack_success_rate"] >= 0.9
    _, after, details, _ = apply_repair(prepared, model, "mcr", {"epochs": 10, "tuning_epochs": 10}, persistence=False)
    assert after["attack_success_rate"] >= 0.9 and after["clean_accuracy"] >= suspect["clean_accuracy"] - 0.05

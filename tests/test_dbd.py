"""DBD (Huang et al. 2022): the symmetric cross-entropy and MixMatch's pieces (sharpening, mixup,
interleaving, the ramp, the losses) by hand against BackdoorBench's ``utils/defense_utils/dbd``
formulas, the warm-up's frozen extractor, the unlabelled draws, option checks, and the defense
against BadNets on MNIST (slow, heavy)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses import create_defense
from backdoorlab.defenses.dbd import (
    LinearWarmupStep,
    MixMatchStep,
    interleave,
    linear_rampup,
    mixmatch_losses,
    mixup,
    sharpen,
    symmetric_cross_entropy,
)
from backdoorlab.experiments import RunConfig, run
from backdoorlab.models.registry import create_model
from backdoorlab.options import OptionError
from backdoorlab.training.loop import TrainConfig, train


def test_symmetric_cross_entropy_by_hand():
    """``SCELoss(alpha, beta)``: alpha CE + beta RCE, RCE = -sum_k p_k log(clamp(onehot, 1e-4)),
    which is -log(1e-4) times the probability off the label."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    targets = torch.tensor([0, 2])
    for (alpha, beta), row in itertools.product(((0.1, 1.0), (1.0, 0.0), (0.3, 2.0)), (0, 1)):
        z = logits[row].tolist()
        total = sum(math.exp(v) for v in z)
        p = [math.exp(v) / total for v in z]
        y = targets[row].item()
        ce = -math.log(p[y])
        rce = -math.log(1e-4) * (1 - p[y])
        got = symmetric_cross_entropy(logits, targets, alpha, beta)[row]
        assert float(got) == pytest.approx(alpha * ce + beta * rce, rel=1e-5)


def test_sharpen_by_hand():
    """p^(1/T) / sum: (0.5, 0.3, 0.2) at T 0.5 -> (0.25, 0.09, 0.04) / 0.38."""
    p = torch.tensor([[0.5, 0.3, 0.2]])
    assert sharpen(p, 0.5)[0].tolist() == pytest.approx([0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38])
    assert sharpen(p, 1.0)[0].tolist() == pytest.approx([0.5, 0.3, 0.2])


def test_mixup_of_labelled_and_unlabelled_by_hand():
    """Row 0 (labelled, one-hot class 1) mixed at lam 0.75 with row 2 (a guessed label): inputs
    and targets alike, 0.75 a + 0.25 a[order]."""
    inputs = torch.tensor([[0.0], [1.0], [2.0]])
    targets = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.4, 0.6]])
    mixed, mixed_targets = mixup(inputs, targets, 0.75, torch.tensor([2, 0, 1]))
    assert mixed.flatten().tolist() == pytest.approx([0.5, 0.75, 1.75])
    assert mixed_targets[0].tolist() == pytest.approx([0.1, 0.9])
    assert mixed_targets[1].tolist() == pytest.approx([0.75, 0.25])
    assert mixed_targets[2].tolist() == pytest.approx([0.55, 0.45])


def test_interleave_swaps_groups_as_the_reference_and_undoes_itself():
    """Batch 5 in 3 chunks: groups of 1, 2, 2 rows (``interleave_offsets``: 5 // 3 each, the
    remainder to the last groups); group i of chunk 0 changes places with group i of chunk i."""
    chunks = [torch.arange(5), torch.arange(10, 15), torch.arange(20, 25)]
    mixed = interleave(chunks, 5)
    assert [c.tolist() for c in mixed] == [[0, 11, 12, 23, 24], [10, 1, 2, 13, 14], [20, 21, 22, 3, 4]]
    assert [c.tolist() for c in interleave(mixed, 5)] == [c.tolist() for c in chunks]


def test_linear_rampup_by_hand():
    """clip(current / length, 0, 1), 1 at length 0: the first MixMatch step after 10 warm-up
    epochs weighs Lu by 15 x 10/190."""
    assert linear_rampup(10.0, 190) == pytest.approx(10 / 190)
    assert linear_rampup(10.5, 190) * 15 == pytest.approx(15 * 10.5 / 190)
    assert linear_rampup(250.0, 190) == 1.0
    assert linear_rampup(-1.0, 190) == 0.0
    assert linear_rampup(3.0, 0) == 1.0


def test_mixmatch_losses_by_hand():
    """``MixMatchLoss``: Lx = -mean_i sum_k t_ik log softmax(x)_ik; Lu = mean over every entry of
    (softmax(u) - t)^2."""
    x = torch.tensor([[0.0, math.log(3.0)]])  # softmax (0.25, 0.75)
    u = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]])  # (0.5, 0.5), (0.8, 0.2)
    lx, lu = mixmatch_losses(x, torch.tensor([[0.2, 0.8]]), u, torch.tensor([[1.0, 0.0], [0.8, 0.2]]))
    assert lx.tolist() == pytest.approx([-(0.2 * math.log(0.25) + 0.8 * math.log(0.75))])
    assert float(lu) == pytest.approx((0.25 + 0.25 + 0.0 + 0.0) / 4)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=3, in_channels=1, mean=(0.5,), std=(0.5,))


def test_the_warmup_step_trains_the_head_alone():
    model = small_model().train()
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    logits, losses = LinearWarmupStep(0.1, 1.0)(model, x, y, None, torch.arange(6), 0, torch.Generator())
    losses.mean().backward()
    assert torch.allclose(losses, symmetric_cross_entropy(logits.detach(), y, 0.1, 1.0))
    assert all(p.grad is None for p in model.body.parameters())
    assert all(p.grad is not None for p in model.fc.parameters())


def test_unlabelled_batches_take_each_sample_once_per_pass():
    """As a shuffled loader that drops its last partial batch: 10 samples in batches of 4 give two
    disjoint batches, then a fresh pass."""
    data = TensorDataset(
        torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.int64), ("a",), (0.5,), (0.5,), "toy"
    )
    step = MixMatchStep(data, TrainConfig(), 0.5, 0.75, 15.0, 190.0, 10, 100)
    generator = torch.Generator().manual_seed(0)
    first, second = step.unlabelled_batch(4, generator), step.unlabelled_batch(4, generator)
    assert len(set(first.tolist()) | set(second.tolist())) == 8
    third = step.unlabelled_batch(4, generator)
    assert len(set(third.tolist())) == 4 and len(step._order) == 6


def test_a_mixmatch_step_weighs_the_unlabelled_loss_by_the_ramp():
    """The per-sample losses' mean is Lx + lambda_u ramp Lu: with lambda_u 0 it is the labelled
    soft cross-entropy alone, so raising lambda_u only adds; the step counts itself."""
    unlabelled = TensorDataset(
        torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8),
        torch.zeros(8, dtype=torch.int64),
        ("a", "b", "c"),
        (0.5,),
        (0.5,),
        "toy",
    )
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    means = []
    for lambda_u in (0.0, 100.0):
        model = small_model().train()
        step = MixMatchStep(unlabelled, TrainConfig(flip=False), 0.5, 0.75, lambda_u, 10.0, 5, 4)
        torch.manual_seed(1)
        _, losses = step(model, x, y, None, torch.arange(4), 0, torch.Generator().manual_seed(0))
        means.append(float(losses.detach().mean()))
        assert step.done == 1
    assert means[1] > means[0] > 0


@pytest.mark.parametrize(
    ("options", "named"),
    [({"epsilon": 1.0}, "epsilon"), ({"ssl_epochs": 0}, "ssl_epochs"), ({"lr": 0.0}, "lr")],
)
def test_bad_options_are_refused_naming_the_option(options, named):
    with pytest.raises((OptionError, ValueError), match=named):
        create_defense("dbd", **options)


def test_the_defaults_are_backdoorbenchs():
    """config/defense/dbd/cifar10.yaml (epoch_self 100, epoch_warmup 10, epochs 100, epsilon 0.5,
    batch_size_self 512), the pretrain example.yaml (lr 0.4, temperature 0.5) and the semi one
    (SCE 0.1 / 1, batch 128 then 64, Adam 0.002, 1,024 iterations, T 0.5, alpha 0.75, lambda_u
    15, rampup 190)."""
    assert create_defense("dbd").config() == {
        "ssl_epochs": 100,
        "ssl_lr": 0.4,
        "ssl_batch_size": 512,
        "temperature": 0.5,
        "projection_dim": 128,
        "warmup_epochs": 10,
        "warmup_batch_size": 128,
        "sce_alpha": 0.1,
        "sce_beta": 1.0,
        "epsilon": 0.5,
        "epochs": 100,
        "iterations": 1024,
        "batch_size": 64,
        "lr": 0.002,
        "sharpen_temperature": 0.5,
        "mixup_alpha": 0.75,
        "lambda_u": 15.0,
        "rampup": 190.0,
    }


def test_an_optimiser_passed_to_the_loop_keeps_its_state_across_calls():
    """DBD's one Adam over the warm-up and every MixMatch epoch: the loop steps the optimiser it
    is given at its own rate (no schedule), and its state carries over from call to call."""
    data = TensorDataset(
        torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8),
        torch.arange(40) % 3,
        ("a", "b", "c"),
        (0.5,),
        (0.5,),
        "toy",
    )
    model = small_model()
    adam = torch.optim.Adam(model.parameters(), lr=0.002)
    config = TrainConfig(epochs=2, batch_size=10, lr=5.0, schedule="onecycle", data_init=False, progress=False)
    for _ in range(2):
        train(model, data, config, device="cpu", optimizer=adam)
    assert {int(state["step"]) for state in adam.state.values()} == {16}
    assert [group["lr"] for group in adam.param_groups] == [0.002]


@pytest.mark.slow
@pytest.mark.heavy  # kept out of CI's 30 minutes: pytest -m heavy
def test_dbd_removes_badnets_on_digits():
    """BadNets at 10% on digits, the digits recipe (small CNN), seed 0, one thread; undefended CA
    0.99, ASR 1.00. DBD on a CPU-sized schedule (SimCLR 40 epochs at batch 128: 480 steps; the
    head's warm-up 20 epochs: 240 steps; 4 MixMatch epochs of 44 steps) measured CA 0.875, ASR
    0.000, RA 0.543, every poisoned digit in the unlabelled half (isolation recall 1.00), 42-53 s.
    The warm-up's first epochs predict the largest class (the target's, clean and poisoned) for
    everything: the symmetric cross-entropy moves the head slowly, and too few steps leave the
    poisoned digits in the labelled half (SimCLR 60 epochs at batch 512, 5 warm-up epochs: 180 and
    60 steps, recall 0.05, ASR 0.97). CA stays below the undefended model's: SimCLR's features of
    8x8 digits are weak (MNIST: docs/defenses.md)."""
    result = run(
        RunConfig(
            dataset="digits",
            device="cpu",
            seed=0,
            threads=1,
            defense="dbd",
            defense_options={
                "ssl_epochs": 40,
                "ssl_batch_size": 128,
                "warmup_epochs": 20,
                "epochs": 4,
                "iterations": 40,
            },
        )
    )
    metrics = result.metrics
    assert metrics["attack_success_rate"] < 0.1, metrics
    assert metrics["clean_accuracy"] > 0.8, metrics
    assert metrics["isolation_recall"] > 0.9, metrics

"""I-BAU: the implicit hypergradient is exact on a problem solved by hand, and I-BAU removes
BadNets from an MNIST airbench (slow)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.defenses.i_bau import fixed_point_hypergradient


@pytest.mark.parametrize("a", [0.5, 2.0])
def test_the_hypergradient_of_a_quadratic_inner_problem_is_the_analytic_one(a: float):
    """Inner: delta* = argmin 0.5 ||delta - a w||^2 = a w (the map: a gradient step of 0.5 on it).
    Outer: ||delta||^2 + sum(w), so d/dw outer(delta*(w), w) = 2 a^2 w + 1."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def inner_map(delta: torch.Tensor) -> torch.Tensor:
        (grad,) = torch.autograd.grad(0.5 * (delta - a * w).pow(2).sum(), delta, create_graph=True)
        return delta - 0.5 * grad

    def outer_loss(delta: torch.Tensor) -> torch.Tensor:
        return delta.pow(2).sum() + w.sum()

    (grad,) = fixed_point_hypergradient(inner_map, outer_loss, (a * w).detach(), [w], iterations=60)
    assert torch.allclose(grad, 2 * a * a * w.detach() + 1, atol=1e-5)
    (few,) = fixed_point_hypergradient(inner_map, outer_loss, (a * w).detach(), [w], iterations=1)
    assert not torch.allclose(few, grad, atol=1e-3), "one iteration is not yet the fixed point"


@pytest.mark.slow
def test_i_bau_removes_badnets_from_an_mnist_airbench(mnist_badnets_airbench):
    """At the official defaults on the 250 trusted images (3 batches, 15 unlearning steps).
    Measured: ASR 1.00 -> 0.07 over the five rounds (0.87, 0.35, 0.18, 0.11, 0.07) at CA 0.985 -> 0.970."""
    from backdoorlab.experiments.run import apply_repair

    prepared, model, suspect = mnist_badnets_airbench
    assert suspect["attack_success_rate"] >= 0.9
    _, after, details, _ = apply_repair(prepared, model, "i_bau", {})
    assert after["attack_success_rate"] < 0.2 and after["clean_accuracy"] >= suspect["clean_accuracy"] - 0.03
    curve = [point["attack_success_rate"] for point in details["persistence"]]
    assert details["persistence_unit"] == "round" and len(curve) == 6 and curve[-1] < curve[0]

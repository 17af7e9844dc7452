"""Projected gradient descent (Madry et al. 2018) in pixel space, for attacks that perturb images
against a surrogate model (label-consistent poisoning) and for later defenses that need it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pgd_linf(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
    random_start: bool = True,
) -> Tensor:
    """Untargeted L-infinity PGD: maximise the cross-entropy of ``labels``.

    ``images`` are floats in [0, 1] on the model's device; ``eps`` and ``step_size`` are on the same
    scale. Starts from a uniform random point in the ball (drawn from ``generator``), or from the
    images themselves without ``random_start`` (as torchattacks' PGD by default), ``steps``
    signed-gradient steps, each projected back onto the ball and [0, 1]. The model is evaluated in
    eval mode and restored afterwards; its parameters get no gradients.
    """
    if eps <= 0 or steps < 1:
        raise ValueError(f"PGD needs eps > 0 and steps >= 1, got eps={eps}, steps={steps}")
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    try:
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            if random_start:
                noise = torch.rand(x.shape, generator=generator).to(x.device)
                delta = ((noise * 2 - 1) * eps).requires_grad_(True)
            else:
                delta = torch.zeros_like(x, requires_grad=True)
            for _ in range(steps):
                loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta += step_size * grad.sign()
                    delta.clamp_(-eps, eps)
                    delta.copy_((x + delta).clamp(0, 1) - x)
            out.append((x + delta.detach()).clamp(0, 1))
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
        model.train(was_training)
    return torch.cat(out) if out else images.clone()

"""I-BAU (Zeng et al. 2022): unlearn the backdoor as a minimax problem, the inner maximisation a
universal adversarial perturbation, the outer step's gradient through it by implicit hypergradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import REPAIRS, DefenseContext, DefenseOutcome, Repair
from backdoorlab.defenses.post_training import suspect_copy
from backdoorlab.options import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt
from backdoorlab.progress import progress_bar
from backdoorlab.training.loop import to_float


def fixed_point_hypergradient(
    inner_map: Callable[[Tensor], Tensor],
    outer_loss: Callable[[Tensor], Tensor],
    inner: Tensor,
    params: Sequence[nn.Parameter],
    iterations: int,
    tol: float = 1e-10,
) -> list[Tensor]:
    """The gradient of ``outer_loss(inner*(params))`` with respect to ``params``, where ``inner*`` is
    a fixed point of ``inner_map`` (one differentiable step of the inner solver) reached at ``inner``:
    ``v`` solves ``v = J^T v + d outer / d inner`` by ``iterations`` steps of the fixed-point method
    (``J`` the map's Jacobian in ``inner``), and the hypergradient is ``d outer / d params + (d map /
    d params)^T v``. The fixed-point method of hypertorch's ``fixed_point`` (Grazzi et al. 2020),
    which I-BAU's official ``hypergrad.py`` copies."""
    inner = inner.detach().requires_grad_(True)
    loss = outer_loss(inner)
    outer_inner, *outer_params = torch.autograd.grad(loss, [inner, *params], allow_unused=True)
    outer_inner = torch.zeros_like(inner) if outer_inner is None else outer_inner
    mapped = inner_map(inner)
    v = torch.zeros_like(inner)
    for _ in range(iterations):
        previous = v
        v = torch.autograd.grad(mapped, inner, grad_outputs=v, retain_graph=True)[0] + outer_inner
        if float(torch.linalg.vector_norm(v - previous)) < tol:
            break
    through = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [
        (torch.zeros_like(p) if a is None else a) + (0.0 if b is None else b)
        for a, b, p in zip(through, outer_params, params, strict=True)
    ]


@REPAIRS.register(
    "i_bau", "I-BAU (Zeng et al. 2022): adversarial unlearning of a universal perturbation by implicit hypergradient"
)
class ImplicitBackdoorUnlearning(Repair):
    """Each round, a universal perturbation ``delta`` is found that makes the model change its own
    predictions on the trusted split (SGD lr 10 on ``-CE + 0.001 ||delta||^2``, one pass over it),
    then the model is unlearnt on it: per batch, an Adam step on the cross-entropy of the batch with
    ``delta`` added to ``portion`` of it, the gradient taken through ``delta``'s dependence on the
    weights by :func:`fixed_point_hypergradient` (``K`` iterations; the inner map one gradient step
    of size 0.1 on ``delta``'s loss on the first batch). The model stays in eval mode. Source: Zeng
    et al., "Adversarial Unlearning of Backdoors via Implicit Hypergradient" (ICLR 2022); official
    code ``YiZeng623/I-BAU`` (``defense.py``: 5 rounds, K 5, Adam lr 0.001, batch 100, portion 0.01,
    the defaults here, on 5,000 clean test images); BackdoorBench's ``defense/i-bau.py``
    (``config/defense/i-bau/cifar10.yaml``: lr 1e-4, batch 256, 5% of the training set; the
    ``backdoorbench`` preset). No clamping of ``x + delta`` to the image range, as both codes
    (whose clamp is commented out); batches in the trusted split's order, unaugmented, as the
    official loader; the perturbed samples of a batch drawn from the run's seed.

    Args:
        rounds: perturbation-then-unlearning rounds.
        K: fixed-point iterations of the hypergradient.
        lr: the model's Adam learning rate.
        batch_size: trusted samples per unlearning step.
        portion: the share of each batch that carries the perturbation in the outer loss (at least one).
        perturbation_lr: SGD learning rate of the perturbation.
        inner_lr: step size of the inner map.
        regularisation: the weight of ``||delta||^2`` in the perturbation's loss.
        amsgrad: the AMSGrad variant of Adam (BackdoorBench's optimiser factory; the official code's is plain).
    """

    #: The persistence curve's checkpoints: the model after each round.
    checkpoint_unit: ClassVar[str] = "round"

    def __init__(
        self,
        rounds: PositiveInt = 5,
        K: PositiveInt = 5,  # noqa: N803 - the paper's and both codes' name
        lr: PositiveFloat = 0.001,
        batch_size: PositiveInt = 100,
        portion: Fraction = 0.01,
        perturbation_lr: PositiveFloat = 10.0,
        inner_lr: PositiveFloat = 0.1,
        regularisation: NonNegativeFloat = 0.001,
        amsgrad: bool = False,
    ) -> None:
        super().__init__()

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        o = self._options
        model = suspect_copy(model).to(ctx.device).eval()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=o["lr"], amsgrad=o["amsgrad"])
        generator = torch.Generator().manual_seed(ctx.seed)
        batches = [
            (to_float(x.to(ctx.device)), y.to(ctx.device))
            for x, y in zip(trusted.inputs.split(o["batch_size"]), trusted.labels.split(o["batch_size"]), strict=True)
        ]
        first_x, first_y = batches[0]
        reg = o["regularisation"]

        def perturbation_loss(delta: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return -F.cross_entropy(model(x + delta), y) + reg * delta.pow(2).sum()

        def inner_map(delta: Tensor) -> Tensor:
            loss = perturbation_loss(delta, first_x, first_y)
            (grad,) = torch.autograd.grad(loss, delta, create_graph=True)
            return delta - o["inner_lr"] * grad

        ctx.observe(model, 0)
        for round_ in progress_bar(range(o["rounds"]), "I-BAU rounds"):
            delta = torch.zeros_like(first_x[:1], requires_grad=True)
            delta_optimizer = torch.optim.SGD([delta], lr=o["perturbation_lr"])
            for x, _ in batches:
                with torch.no_grad():
                    own = model(x).argmax(1)
                (delta.grad,) = torch.autograd.grad(perturbation_loss(delta, x, own), delta)  # not the weights'
                delta_optimizer.step()
            for x, y in batches:
                carriers = torch.randperm(len(x), generator=generator)[: max(1, int(len(x) * o["portion"]))]
                carriers = carriers.to(ctx.device)

                def outer_loss(d: Tensor, x: Tensor = x, y: Tensor = y, carriers: Tensor = carriers) -> Tensor:
                    patch = torch.zeros_like(x)
                    patch[carriers] = d
                    return F.cross_entropy(model(x + patch), y)

                grads = fixed_point_hypergradient(inner_map, outer_loss, delta.detach()[0], params, o["K"])
                optimizer.zero_grad()
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.detach()
                optimizer.step()
            ctx.observe(model, round_ + 1)
        return DefenseOutcome(model, details={"perturbation_norm": float(delta.detach().norm())})

"""FT-SAM (Zhu et al. 2023): fine-tuning with (adaptive) sharpness-aware minimisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import REPAIRS, DefenseContext, DefenseOutcome
from backdoorlab.defenses.fine_tuning import FineTuning
from backdoorlab.defenses.post_training import suspect_copy
from backdoorlab.options import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt
from backdoorlab.training.steps import PerSampleLoss


class SharpnessAwareStep:
    """A training step that takes its gradient at the worst nearby weights: the gradient ``g`` at
    ``w``, then the loss at ``w + e`` with ``e = rho * T^2 g / ||T g||`` (ASAM's ``T = |w|`` when
    ``adaptive``, else ``T = 1``: plain SAM). The loop backpropagates that loss; each parameter is put
    back to ``w`` (a copy, exactly) as soon as its gradient has arrived (a post-accumulate-grad hook), so the
    optimiser steps from ``w`` with the gradient taken at ``w + e``. The per-sample loss is
    cross-entropy with ``label_smoothing``."""

    def __init__(self, rho: float, adaptive: bool, label_smoothing: float, eps: float = 1e-12) -> None:
        self.rho, self.adaptive, self.label_smoothing, self.eps = rho, adaptive, label_smoothing, eps
        self.pending: dict[nn.Parameter, Tensor] = {}  # the weights before the perturbation, not yet put back
        self.hooks: dict[nn.Parameter, RemovableHandle] = {}

    def restore(self) -> None:
        """Take back every perturbation still applied (of parameters that got no gradient)."""
        with torch.no_grad():
            for parameter, original in self.pending.items():
                parameter.copy_(original)
        self.pending.clear()

    def close(self) -> None:
        """Restore the weights and remove the hooks from the model's parameters."""
        self.restore()
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()

    def _take_back(self, parameter: nn.Parameter) -> None:
        original = self.pending.pop(parameter, None)
        if original is not None:
            with torch.no_grad():
                parameter.copy_(original)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: PerSampleLoss,
        indices: Tensor,
        epoch: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        self.restore()
        parameters = [p for p in model.parameters() if p.requires_grad]
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        with torch.no_grad():
            pairs = [(p, g) for p, g in zip(parameters, grads, strict=True) if g is not None]
            scaled = [(p.abs() * g if self.adaptive else g) for p, g in pairs]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
            for (p, g), s in zip(pairs, scaled, strict=True):
                e = self.rho / (norm + self.eps) * (p.abs() * s if self.adaptive else s)
                self.pending[p] = p.detach().clone()
                p.add_(e)
                if p not in self.hooks:
                    self.hooks[p] = p.register_post_accumulate_grad_hook(self._take_back)
        perturbed = model(x)
        losses = F.cross_entropy(perturbed.float(), y, reduction="none", label_smoothing=self.label_smoothing)
        return logits.detach(), losses


@REPAIRS.register("ft_sam", "FT-SAM (Zhu et al. 2023): fine-tune on the trusted split with adaptive SAM")
class FineTuningSAM(FineTuning):
    """Fine-tune the suspect model on the trusted split with adaptive sharpness-aware minimisation
    (:class:`SharpnessAwareStep`), which pushes the weights out of the sharp region that backdoor
    neurons sit in. Source: Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with
    Sharpness-Aware Minimization" (ICCV 2023); official code BackdoorBench's ``defense/ft-sam.py``
    (``config/defense/ft-sam/cifar10.yaml``): ``rho`` 2.0 (``rho_max = rho_min``: a constant radius),
    adaptive (ASAM), label smoothing 0.1, SGD lr 0.01 momentum 0.9 wd 5e-4 under a cosine schedule,
    batch 256, 100 epochs, the defaults here. Momentum is Nesterov where the run's recipe has it (as
    for :class:`FineTuning`); the second forward pass also updates batch-norm running statistics,
    as in the official code.

    Args:
        epochs, lr, batch_size, weight_decay: the fine-tuning's schedule.
        rho: the perturbation radius.
        adaptive: ASAM (the radius scaled by each weight's magnitude) rather than SAM.
        label_smoothing: of the cross-entropy.
    """

    def __init__(
        self,
        epochs: PositiveInt = 100,
        lr: PositiveFloat = 0.01,
        batch_size: PositiveInt = 256,
        weight_decay: NonNegativeFloat = 5e-4,
        rho: PositiveFloat = 2.0,
        adaptive: bool = True,
        label_smoothing: Fraction = 0.1,
    ) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay)
        self.rho, self.adaptive, self.label_smoothing = float(rho), bool(adaptive), float(label_smoothing)

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        model = suspect_copy(model)
        step = SharpnessAwareStep(self.rho, self.adaptive, self.label_smoothing)
        try:
            self.tune(model, trusted, ctx, step=step, description="FT-SAM")
        finally:
            step.close()
        return DefenseOutcome(model)

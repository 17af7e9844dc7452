"""Blind backdoor (Bagdasaryan & Shmatikov, "Blind Backdoors in Deep Learning Models", USENIX
Security 2021; official ``ebagdasa/backdoors101``; BackdoorBench ``attack/blind.py`` and
``config/attack/blind/default.yaml``, ``cifar10_mgda.yaml``).

The attacker compromises the loss computation, not the data: every training batch is also copied
with the trigger stamped on every sample and the target label (BackdoorBench's
``poisoning_proportion`` 1.1 covers the whole batch), and the victim minimises
``w_normal * CE(clean batch) + w_backdoor * CE(triggered copy)``. The backdoor loss joins only once
training is stable: while fewer than ``history`` batches have passed, or the mean clean loss of the
last ``history`` batches is at least ``loss_threshold``, the batch's loss is the clean one alone.
The weights are fixed (``balance="fixed"``: 1.0 and 0.9, BackdoorBench's ``default.yaml``) or set
per batch by multiple-gradient descent (``balance="mgda"``: the min-norm point of the two tasks'
gradients, each divided by its ``loss+`` normaliser ``min(loss * |g|, 10)``, as
``cifar10_mgda.yaml`` and the official code's ``MGDASolver`` for two tasks).

The trigger is the official "Pattern" synthesizer's: a 5x3 pattern of white and black pixels (the
rest of its box untouched) at rows 3-7, columns 23-25 (BackdoorBench's ``x_top`` 3, ``y_top`` 23),
on every channel. Defaults are BackdoorBench's: ``batch_history_len`` 1000,
``backdoor_batch_loss_threshold`` 1.0, fixed scales 1.0 / 0.9. The run's poison rate does not
enter the training; it sizes the fixed poisoned training set defenses get (BackdoorBench saves
none for Blind: ``bd_train=None``).

Reconstructed (why, with the measurements: docs/attacks.md, "Blind"):
- the clean batch and its triggered copy share one forward pass (the reference runs two), so
  batch norm cannot tell the halves apart by their statistics, a cue gone at evaluation;
- images too small for the pattern at (3, 23) get it moved in, one pixel from the bottom right;
- the per-sample loss is ``w_normal * normal_i + w_backdoor * backdoor_i`` through the run's
  per-sample loss (its mean is the reference's batch loss).
"""

from __future__ import annotations

from collections import deque
from typing import Literal

import torch
from torch import Tensor, nn

from backdoorlab.attacks.controlled import AttackStep, TrainingControlledTrigger
from backdoorlab.attacks.poisoning import PoisonSpec
from backdoorlab.attacks.triggers import ATTACKS
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.options import NonNegativeFloat, PositiveFloat, PositiveInt

#: The official pattern: 1 white, 0 black, -10 left as it is.
PATTERN = ((1.0, 0.0, 1.0), (-10.0, 1.0, -10.0), (-10.0, -10.0, 0.0), (-10.0, 1.0, -10.0), (1.0, 0.0, 1.0))
#: Its top-left corner (row, column) in BackdoorBench and the official code.
CORNER = (3, 23)
#: Cap of MGDA's ``loss+`` gradient normaliser (``gradient_normalizers``).
NORMALISER_CAP = 10.0


def pattern_and_mask(input_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The full-size pattern and its 0/1 mask ``(C, H, W)`` for images of ``input_shape``."""
    c, h, w = input_shape
    pattern = torch.tensor(PATTERN)
    ph, pw = pattern.shape
    if h < ph + 1 or w < pw + 1:
        raise ValueError(f"blind's 5x3 pattern needs images of at least 6x4 px, got {h}x{w}")
    top, left = min(CORNER[0], h - ph - 1), min(CORNER[1], w - pw - 1)
    full = torch.full((c, h, w), -10.0)
    full[:, top : top + ph, left : left + pw] = pattern
    mask = (full != -10.0).float()
    return full.clamp(min=0.0) * mask, mask


def mgda_scales(
    normal: list[Tensor], backdoor: list[Tensor], normal_loss: float, backdoor_loss: float
) -> tuple[float, float]:
    """The official ``MGDASolver.get_scales`` for the two tasks ``["backdoor", "normal"]`` with
    ``loss+`` normalisation: each gradient divided by ``min(loss * |g|, 10) + 1e-5``, then the
    min-norm point ``gamma g_b + (1 - gamma) g_n`` of the segment (``_min_norm_element_from2``:
    0.999 or 0.001 at its ends). Returns ``(normal scale, backdoor scale)``."""
    divisors = []
    for grads, loss in ((backdoor, backdoor_loss), (normal, normal_loss)):
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        divisors.append(min(loss * norm, NORMALISER_CAP) + 1e-5)
    b = [g.double() / divisors[0] for g in backdoor]
    n = [g.double() / divisors[1] for g in normal]
    v11 = float(sum((x * x).sum() for x in b))
    v12 = float(sum((x * y).sum() for x, y in zip(b, n, strict=True)))
    v22 = float(sum((y * y).sum() for y in n))
    if v12 >= v11:
        gamma = 0.999
    elif v12 >= v22:
        gamma = 0.001
    else:
        gamma = -(v12 - v22) / (v11 + v22 - 2 * v12)
    return 1.0 - gamma, gamma


class BlindStep(AttackStep):
    """The compromised loss computation (the official ``compute_blind_loss``), as a training step."""

    def __init__(self, attack: Blind, spec: PoisonSpec, num_classes: int) -> None:
        self.attack, self.spec, self.num_classes = attack, spec, num_classes
        self.losses: deque[float] = deque(maxlen=attack.history)
        self.active_batches = 0
        self.scales: list[tuple[float, float]] = []  # MGDA's per batch, (normal, backdoor)

    def active(self) -> bool:
        """Whether training is stable enough for the backdoor loss (the reference's test)."""
        a = self.attack
        return len(self.losses) >= a.history and sum(self.losses) / len(self.losses) < a.loss_threshold

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn,
        indices: Tensor,
        epoch: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        attack = self.attack
        if not self.active():
            logits = model(x)
            normal = loss_fn(logits.float(), y, indices, epoch)
            self.losses.append(float(normal.detach().mean()))
            return logits, normal
        triggered = attack.apply(x.float(), None).to(x.dtype)
        both = model(torch.cat([x, triggered]))  # one pass: batch norm sees clean and triggered together
        logits, back_logits = both[: len(x)], both[len(x) :]
        normal = loss_fn(logits.float(), y, indices, epoch)
        backdoor = loss_fn(back_logits.float(), self.spec.target_labels(y, self.num_classes), indices, epoch)
        if attack.balance == "mgda":
            params = [p for p in model.parameters() if p.requires_grad]
            grads_n = torch.autograd.grad(normal.mean(), params, retain_graph=True, allow_unused=True)
            grads_b = torch.autograd.grad(backdoor.mean(), params, retain_graph=True, allow_unused=True)
            pairs = [(a, b) for a, b in zip(grads_n, grads_b, strict=True) if a is not None and b is not None]
            w_normal, w_backdoor = mgda_scales(
                [a for a, _ in pairs],
                [b for _, b in pairs],
                float(normal.detach().mean()),
                float(backdoor.detach().mean()),
            )
            self.scales.append((w_normal, w_backdoor))
        else:
            w_normal, w_backdoor = attack.normal_weight, attack.backdoor_weight
        self.losses.append(float(normal.detach().mean()))
        self.active_batches += 1
        return logits, w_normal * normal + w_backdoor * backdoor


@ATTACKS.register(
    "blind",
    "Blind backdoor (Bagdasaryan & Shmatikov 2021): a pattern's loss added inside the victim's training",
)
class Blind(TrainingControlledTrigger):
    """Blind backdoor: the loss computation poisoned (module docstring).

    Args:
        normal_weight: weight of the clean batch's loss (``fix_scale_normal_weight``).
        backdoor_weight: weight of the triggered copy's loss (``fix_scale_backdoor_weight``).
        history: clean-loss batches averaged before the backdoor loss may join (``batch_history_len``).
        loss_threshold: the backdoor loss joins once that average is below this
            (``backdoor_batch_loss_threshold``).
        balance: ``fixed`` weights, or ``mgda`` (per-batch multiple-gradient descent; two more
            backward passes a batch).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        normal_weight: NonNegativeFloat = 1.0,
        backdoor_weight: NonNegativeFloat = 0.9,
        history: PositiveInt = 1000,
        loss_threshold: PositiveFloat = 1.0,
        balance: Literal["fixed", "mgda"] = "fixed",
    ) -> None:
        super().__init__(input_shape)
        self.pattern, self.mask = pattern_and_mask(self.input_shape)
        self.normal_weight, self.backdoor_weight = float(normal_weight), float(backdoor_weight)
        self.history, self.loss_threshold, self.balance = int(history), float(loss_threshold), balance
        self.step: BlindStep | None = None

    def begin(
        self,
        data: TensorDataset,
        spec: PoisonSpec,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        epochs: int | None = None,
    ) -> BlindStep:
        self.check_spec(spec)
        self.step = BlindStep(self, spec, data.num_classes)
        return self.step

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        mask, pattern = self.mask.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype)
        return x * (1 - mask) + pattern * mask

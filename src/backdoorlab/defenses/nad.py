"""NAD, Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma, ICLR 2021; code ``bboylyg/NAD``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import DefenseOutcome
from backdoorlab.defenses.fine_tuning import FineTuning
from backdoorlab.defenses.post_training import REPAIRS, Observer, RepairDefense, frozen_copy, suspect_copy
from backdoorlab.training.loop import PerSampleLoss, TrainConfig


def attention_map(features: Tensor, p: float) -> Tensor:
    """NAD's attention: the channel mean of ``|a|^p``, flattened and L2-normalised per sample."""
    return F.normalize(features.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student: Tensor, teacher: Tensor, p: float) -> Tensor:
    """Mean squared difference of the two attention maps (the official ``AT`` loss)."""
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def distillation_blocks(model: nn.Module, count: int = 3) -> list[int]:
    """Indices of the last ``count`` blocks of the model's body (modules with submodules: the
    residual groups of a ResNet, airbench's conv groups, small_cnn's conv-BN-ReLU blocks), where
    NAD distils attention (the official code: the outputs of WRN's three residual groups)."""
    blocks = [i for i, m in enumerate(model.body) if any(True for _ in m.children())]
    if len(blocks) < count:
        raise ValueError(f"NAD needs {count} blocks in the model body, found {len(blocks)}")
    return blocks[-count:]


def forward_with_blocks(model: nn.Module, x: Tensor, blocks: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """``(logits, [outputs of the body modules at blocks])`` in one forward pass."""
    h, outputs, start = model.normalize(x), [], 0
    for index in blocks:
        h = model.forward_body(h, start, index + 1)
        outputs.append(h)
        start = index + 1
    h = model.forward_body(h, start)
    return model.forward_head(h), outputs


class AttentionDistillationStep:
    """The student's step: CE + sum_i beta_i AT(student block i, teacher block i)."""

    def __init__(self, teacher: nn.Module, blocks: Sequence[int], betas: Sequence[float], p: float) -> None:
        self.teacher, self.blocks, self.betas, self.p = teacher, list(blocks), list(betas), p

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: PerSampleLoss, indices: Tensor, epoch: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        logits, student = forward_with_blocks(model, x, self.blocks)
        with torch.no_grad():
            _, teacher = forward_with_blocks(self.teacher, x, self.blocks)
        at = sum(beta * attention_loss(s, t, self.p) for beta, s, t in zip(self.betas, student, teacher))
        return logits, loss_fn(logits.float(), y, indices, epoch) + at


@REPAIRS.register("nad", "NAD (Li et al. 2021): distil attention maps from a fine-tuned teacher")
class NAD(RepairDefense):
    """Neural Attention Distillation.

    1. **Teacher**: a copy of the suspect model fine-tuned on the trusted split
       (``teacher_epochs`` = 10, BackdoorBench's ``te_epochs``; the official code also 10).
    2. **Student**: the suspect model itself, trained on the trusted split with
       ``CE + sum_i beta_i ||A_s^i - A_t^i||^2``, where ``A = normalize(mean_c |a|^p)`` is the
       attention map of block ``i``; ``p`` = 2 and ``betas`` = (500, 1000, 1000) for the last three
       blocks of the body (BackdoorBench's ``beta1..3`` for PreAct-ResNet18's layer2-4; the official
       code's WRN groups). Both stages use SGD momentum 0.9, cosine, weight decay 1e-4 and peak
       lr 0.1 (the official code's ``lr`` 0.1; BackdoorBench uses 0.01, which leaves the teacher,
       and so the student, backdoored on MNIST: see :class:`FineTuning`); the student trains
       ``epochs`` = 20 (the official code's 20; BackdoorBench 100).

    Reconstructed for backdoorlab's models: "block" is a body module with submodules (see
    :func:`distillation_blocks`).
    """

    def __init__(
        self,
        epochs: int = 20,
        teacher_epochs: int = 10,
        lr: float = 0.1,
        batch_size: int = 128,
        betas: Sequence[float] = (500.0, 1000.0, 1000.0),
        p: float = 2.0,
    ) -> None:
        if epochs < 1 or teacher_epochs < 1 or not betas:
            raise ValueError("NAD needs epochs >= 1, teacher_epochs >= 1 and at least one beta")
        self.teacher_tuning = FineTuning(epochs=teacher_epochs, lr=lr, batch_size=batch_size, weight_decay=1e-4)
        self.student_tuning = FineTuning(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=1e-4)
        self.betas, self.p = [float(b) for b in betas], float(p)
        self._options = {
            "epochs": int(epochs), "teacher_epochs": int(teacher_epochs), "lr": float(lr),
            "batch_size": int(batch_size), "betas": self.betas, "p": self.p,
        }  # fmt: skip

    def repair(
        self,
        model: nn.Module,
        trusted: TensorDataset,
        recipe: TrainConfig,
        *,
        device: torch.device,
        seed: int,
        observer: Observer | None = None,
    ) -> DefenseOutcome:
        blocks = distillation_blocks(model, len(self.betas))
        teacher = suspect_copy(model)
        self.teacher_tuning.tune(teacher, trusted, recipe, device=device, seed=seed, description="NAD teacher")
        student = suspect_copy(model)
        step = AttentionDistillationStep(frozen_copy(teacher), blocks, self.betas, self.p)
        self.student_tuning.tune(student, trusted, recipe, device=device, seed=seed + 1, observer=observer, step=step, description="NAD student")
        return DefenseOutcome(student, details={"blocks": blocks})

"""LIRA: a learnable, imperceptible trigger generator trained with the victim (Doan et al.,
"LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021; official
``sunbelbd/invisible_backdoor_attacks``; BackdoorBench ``attack/lira.py`` with
``config/attack/lira/default.yaml``, which this follows).

A generator ``G`` (a small convolutional autoencoder) reads the normalised image and adds
``eps * tanh(.)`` to it, in normalised units, clipped to the data's range: in [0, 1] pixels the
trigger is ``clip(x + eps * std * G(x), 0, 1)``. Stage one trains ``G`` and the victim together:
in each batch ``G`` takes an Adam step on the victim's cross-entropy of its triggered images
towards the target, and the victim learns ``alpha`` x CE(clean) + (1 - alpha) x CE(triggered by
a frozen copy of ``G``, target), the copy refreshed from ``G`` after each epoch. Stage two keeps
``G`` fixed and the victim goes on learning the same mix.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from backdoorlab.attacks.controlled import (
    AttackStep,
    PerSampleLoss,
    TrainingControlledTrigger,
    data_normalization,
)
from backdoorlab.attacks.padding import crop, pad_to_multiple
from backdoorlab.attacks.poisoning import PoisonSpec
from backdoorlab.attacks.triggers import ATTACKS
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.options import Fraction, PositiveFloat, PositiveInt

#: The autoencoder halves the side four times: inputs are padded to a multiple of this.
STRIDE = 16
#: Inference chunk of the frozen generator.
CHUNK = 1024


def _down(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU()]


def _up(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU()]


class Autoencoder(nn.Module):
    """BackdoorBench's LIRA ``Autoencoder`` (its ``attack_model: autoencoder`` default): four 4x4
    stride-2 convolutions with batch norm and ReLU (``channels`` -> 16 -> 32 -> 64 -> 128), four
    transposed ones back (the last to ``channels``, then tanh). Reconstructed: the input is
    zero-padded (zero is the data's mean, in normalised units) to a multiple of 16 px and the
    output cropped back, so any image size works (the reference's sizes, 32 px, need no padding;
    its 28 px MNIST would come back as 16 px)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_down(channels, 16), *_down(16, 32), *_down(32, 64), *_down(64, 128))
        self.decoder = nn.Sequential(
            *_up(128, 64), *_up(64, 32), *_up(32, 16), nn.ConvTranspose2d(16, channels, 4, 2, 1), nn.Tanh()
        )

    def forward(self, x: Tensor) -> Tensor:
        padded, box = pad_to_multiple(x, STRIDE)
        return crop(self.decoder(self.encoder(padded)), box)


class LiraStep(AttackStep):
    """The victim's training under LIRA (BackdoorBench's ``train`` for the first ``joint_epochs``,
    its ``final_test`` training after). Per batch, in the reference's order of forward passes:

    - stage one only: ``G``'s loss CE(victim(T_G(x)), target); ``G`` steps (Adam) after the
      victim's step, on the gradient of this loss alone. Its backward also reaches the victim,
      whose gradients BackdoorBench does not clear before the victim's own step
      (``tgtoptimizer.zero_grad()`` clears ``G``'s only), so the victim learns this term too
      (``victim_learns_generator_loss``, on by default);
    - ``alpha`` x CE(victim(x), y) + (1 - alpha) x CE(victim(T_frozen(x)), target), with the frozen
      copy (eval mode, no gradient).

    The per-sample loss is the weighted sum of the terms, so its batch mean is the reference's
    loss. The clean batch and its triggered copies share one forward pass (``one_pass``, on by
    default; reconstructed, as ``blind``'s): the reference runs one pass per term, and with batch
    norm in training mode each pass is normalised by its own statistics, a cue the victim learns
    that is gone at evaluation (digits, 20 epochs, ``eps`` 0.1: CA 0.672 and ASR 0.827 with one
    pass per term, 1.000 and 0.997 with one pass).
    """

    def __init__(self, attack: Lira, spec: PoisonSpec, num_classes: int, joint_epochs: int) -> None:
        self.attack, self.spec, self.num_classes, self.joint_epochs = attack, spec, num_classes, joint_epochs
        assert attack.generator is not None
        self.optimizer = torch.optim.Adam(attack.generator.parameters(), attack.generator_lr)
        self.generator_grads: tuple[Tensor, ...] | None = None

    def joint(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is in stage one, where ``G`` trains."""
        return epoch < self.joint_epochs

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
        attack = self.attack
        size = len(x)
        targets = self.spec.target_labels(y, self.num_classes)
        with torch.no_grad():
            poisoned = attack.perturb(attack.frozen, x).to(x.dtype)
        inputs = [x, poisoned]
        train_generator = self.joint(epoch)
        if train_generator:
            assert attack.generator is not None
            inputs.append(attack.perturb(attack.generator, x).to(x.dtype))
        if attack.one_pass:
            all_logits = model(torch.cat(inputs)).float().split(size)
        else:
            all_logits = [model(part).float() for part in inputs]
        logits = all_logits[0]
        losses = attack.alpha * loss_fn(logits, y, indices, epoch)
        losses = losses + (1 - attack.alpha) * loss_fn(all_logits[1], targets, indices, epoch)
        if train_generator:
            assert attack.generator is not None
            generator_losses = loss_fn(all_logits[2], targets, indices, epoch)
            # G's gradient is its own loss's alone, as the reference's (its own backward): the loop's
            # one backward would add the other terms' through the victim's batch norm, which couples
            # the samples of one pass
            self.generator_grads = torch.autograd.grad(
                generator_losses.mean(), list(attack.generator.parameters()), retain_graph=True
            )
            if attack.victim_learns_generator_loss:
                losses = losses + generator_losses
        return logits, losses

    def after_step(self) -> None:
        """``G``'s Adam step on the gradient of its own loss (stage one only)."""
        grads, self.generator_grads = self.generator_grads, None
        if grads is not None:
            assert self.attack.generator is not None
            for parameter, grad in zip(self.attack.generator.parameters(), grads, strict=True):
                parameter.grad = grad
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_epoch(self, epoch: int) -> None:
        """The reference's ``atkmodel.load_state_dict(tgtmodel.state_dict())`` after each stage-one epoch."""
        if self.joint(epoch):
            assert self.attack.generator is not None
            self.attack.frozen.load_state_dict(self.attack.generator.state_dict())


@ATTACKS.register(
    "lira",
    "LIRA (Doan et al. 2021): an imperceptible additive trigger from a generator trained with the victim",
)
class Lira(TrainingControlledTrigger):
    """LIRA: a training-controlled attack (``attacks.controlled``).

    Source: Doan et al., ICCV 2021; BackdoorBench ``attack/lira.py`` (f02e353) and
    ``config/attack/lira/default.yaml``, whose values are the defaults: ``attack_model``
    autoencoder, ``lr_atk`` 1e-4 (Adam), ``eps`` and ``test_eps`` 0.01 (normalised units),
    ``alpha`` and ``test_alpha`` 0.5, ``both_train_epochs`` 50 of ``epochs`` 100 (``joint_epochs``:
    half the victim's epochs), all-to-one to ``attack_target``. The victim's optimiser, schedule and
    augmentation are the run's recipe's, as every victim's here; it is one network through both
    stages (``avoid_clsmodel_reinitialization`` defaults to true and no yaml sets it).

    Every sample is learnt clean and triggered (the reference's loss), so the run's poison rate only
    sizes the fixed poisoned set defenses get (BackdoorBench saves none). This follows BackdoorBench
    where the official code differs, but the victim is the model after both stages.

    Reconstructed (why, and the amplitudes: docs/attacks.md, "LIRA"): ``G`` reads each dataset
    normalised by its own mean and std; the autoencoder pads to a multiple of 16 px
    (:class:`Autoencoder`); the frozen trigger rounds to 8 bits, as every trigger here.

    Args:
        eps: the trigger's amplitude in normalised units (``eps``, ``test_eps``).
        alpha: the clean term's weight in the victim's loss (``alpha``, ``test_alpha``).
        generator_lr: Adam learning rate of ``G`` (``lr_atk``).
        joint_epochs: epochs of stage one (``both_train_epochs``); default half the victim's epochs,
            at least one. At or beyond the victim's epochs there is no stage two.
        victim_learns_generator_loss: whether the victim's step also descends ``G``'s loss (the
            reference's uncleared gradients; see :class:`LiraStep`).
        one_pass: one forward pass for the clean batch and its triggered copies (reconstructed;
            ``False``: the reference's pass per term; see :class:`LiraStep`).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        eps: PositiveFloat = 0.01,
        alpha: Fraction = 0.5,
        generator_lr: PositiveFloat = 1e-4,
        joint_epochs: PositiveInt | None = None,
        victim_learns_generator_loss: bool = True,
        one_pass: bool = True,
    ) -> None:
        super().__init__(input_shape)
        self.eps, self.alpha, self.generator_lr = eps, alpha, generator_lr
        self.joint_epochs, self.victim_learns_generator_loss = joint_epochs, victim_learns_generator_loss
        self.one_pass = one_pass
        c = self.input_shape[0]
        self.generator: Autoencoder | None = None
        self.frozen = Autoencoder(c).eval().requires_grad_(False)
        self.mean, self.std = torch.zeros(c, 1, 1), torch.ones(c, 1, 1)

    def perturb(self, net: nn.Module, x: Tensor) -> Tensor:
        """``clip(x + eps * std * net(normalise(x)), 0, 1)`` for images ``x`` in [0, 1]."""
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x + self.eps * std * net((x - mean) / std)).clamp(0.0, 1.0)

    def begin(
        self,
        data: TensorDataset,
        spec: PoisonSpec,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        epochs: int | None = None,
    ) -> LiraStep:
        self.check_spec(spec)
        if self.joint_epochs is not None:
            joint = self.joint_epochs
        elif epochs is not None:
            joint = max(1, epochs // 2)
        else:
            raise ValueError("lira's stage one lasts half the victim's epochs: begin needs epochs, or set joint_epochs")
        self.mean, self.std = data_normalization(data)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
            self.generator = Autoencoder(self.input_shape[0]).to(device).train()
        # the reference's atkmodel starts as tgtmodel's copy (tgtmodel.load_state_dict(atkmodel...))
        self.frozen = copy.deepcopy(self.generator).eval().requires_grad_(False)
        return LiraStep(self, spec, data.num_classes, joint)

    def end(self) -> None:
        self.generator = None  # the frozen copy is the trigger: G as of the last stage-one epoch
        super().end()

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        self._require_trained()
        device = next(self.frozen.parameters()).device
        with torch.no_grad():
            out = [self.perturb(self.frozen, chunk.to(device)).to(x.device) for chunk in x.split(CHUNK)]
        return torch.cat(out) if out else x.clone()

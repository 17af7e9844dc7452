"""Attacks that adapt to a model: the attacker first trains a surrogate on clean data
(:meth:`Trigger.fit`), then poisons.

- ``label_consistent`` (Turner, Tsipras, Madry 2019, "Label-Consistent Backdoor Attacks",
  arXiv:1912.02771; code ``MadryLab/label-consistent-backdoor-code``);
- ``trojannn`` (Liu et al. 2018, "Trojaning Attack on Neural Networks", NDSS; code
  ``PurduePAML/TrojanNN``; as TrojanZoo's and BackdoorBench's TrojanNN data-poisoning variant).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backdoorlab.attacks.adversarial import pgd_linf
from backdoorlab.attacks.triggers import ATTACKS, BadNets, default_patch_size
from backdoorlab.models.classifier import model_device
from backdoorlab.options import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

#: Turner et al.'s 3x3 bottom-right trigger (official ``poison_attack.py``): 1 white, 0 black.
TURNER_PATTERN = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
#: The label-consistent position value that stamps every corner.
ALL_CORNERS = "all-corners"
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@ATTACKS.register(
    "label_consistent",
    "Label-consistent (Turner et al. 2019): PGD-hardened target-class images + corner patch, clean-label",
)
class LabelConsistent(BadNets):
    """Clean-label BadNets on target-class images first made hard to classify.

    Poisoned training images are target-class images pushed away from their (true) label by an
    L-infinity PGD perturbation against a surrogate, then stamped with Turner et al.'s 3x3
    black-and-white corner pattern; labels stay. The perturbation destroys the natural features, so
    the network learns the trigger instead. Test images get the trigger only.

    Defaults: eps 8/255 (the issue's CIFAR-scale budget; the paper studies 8, 16 and 32), pattern at
    the very corner (margin 0) at full amplitude, as the official ``config.json``
    (``poisoning_trigger: bottom-right``, ``reduced_amplitude: null``), 10 PGD steps of 2/255 from a
    random start (Madry et al.'s CIFAR-10 setting). Reconstructed: the paper attacks an
    *adversarially trained* surrogate; here the surrogate is the victim's architecture trained
    normally on the clean data (adversarial training is out of CPU reach), so perturbations are
    less semantic than the paper's and the attack is weaker at equal eps.

    BackdoorBench (``config/attack/lc/default.yaml``, ``utils/bd_img_transform/lc.py``,
    ``resource/label-consistent/craft_adv_dataset.py``) stamps all four corners and crafts with
    PGD eps 8/255, step 1.5/255, 100 steps, no random start, on an adversarially trained ResNet-18
    it does not distribute; the ``backdoorbench`` preset sets those options, and its ``pratio: 0.1``
    is ``poison_rate=1.0, poison_rate_of="target"`` here (docs/attacks.md, "Label-consistent").

    Args:
        eps, step_size: PGD budget and step in pixel units (0-255).
        steps: PGD iterations.
        random_start: start PGD from a uniform random point in the eps-ball (else from the image).
        size, margin: as :class:`BadNets` (the pattern is resized to ``size``).
        position: as :class:`BadNets`, or ``"all-corners"``: the pattern in each corner, mirrored
            left to right in the left ones (Turner et al.'s and BackdoorBench's four-corner trigger).
    """

    clean_label = True
    needs_surrogate = True

    def __init__(
        self,
        input_shape: tuple[int, ...],
        eps: NonNegativeFloat = 8.0,
        steps: PositiveInt = 10,
        step_size: PositiveFloat = 2.0,
        size: PositiveInt | None = None,
        position: str = "bottom-right",
        margin: NonNegativeInt = 0,
        random_start: bool = True,
    ) -> None:
        four = position == ALL_CORNERS
        super().__init__(
            input_shape,
            size=size,
            pattern=TURNER_PATTERN,
            position="bottom-right" if four else position,
            margin=margin,
        )
        if four:
            _, h, w = self.input_shape
            if 2 * (self.size + self.margin) > min(h, w):
                raise ValueError(f"four {self.size}px patches at margin {self.margin} overlap on {h}x{w} images")
            self.position = ALL_CORNERS
        if not 0 < eps <= 255 or not 0 < step_size <= 255 or steps < 1:
            raise ValueError("eps and step_size must be in (0, 255] and steps >= 1")
        self.eps, self.steps, self.step_size = float(eps), int(steps), float(step_size)
        self.random_start = bool(random_start)
        self.surrogate: nn.Module | None = None

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.position != ALL_CORNERS:
            return super().apply(x, generator)
        out = x.clone()
        patch = self.patch.to(x.device)
        for corner in CORNERS:
            self._paste(out, patch if "right" in corner else patch.flip(-1), corner)
        return out

    def fit(
        self,
        surrogate: nn.Module,
        generator: torch.Generator | None = None,
        *,
        images: Tensor | None = None,
        target: int = 0,
    ) -> None:
        self.surrogate = surrogate
        self.fitted = True

    def poison(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.surrogate is None:
            raise ValueError("LabelConsistent needs fit(surrogate) before poisoning")
        device = model_device(self.surrogate)
        x = images.to(device).float().div_(255.0)
        hard = pgd_linf(
            self.surrogate,
            x,
            labels.to(device),
            eps=self.eps / 255,
            step_size=self.step_size / 255,
            steps=self.steps,
            generator=generator,
            random_start=self.random_start,
        )
        return self(hard.mul_(255.0).round_().to(torch.uint8).cpu(), generator)


@ATTACKS.register("trojannn", "TrojanNN (Liu et al. 2018): a corner patch optimised to excite chosen neurons")
class TrojanNN(BadNets):
    """A BadNets patch whose pixels are optimised on a surrogate to drive its best-connected
    penultimate neurons to a high activation, so the trigger is a strong feature from the start.

    Neuron choice and optimisation follow TrojanZoo's TrojanNN (defaults of the paper's code): the
    ``neurons`` = 2 penultimate units with the largest mean absolute weight into the classifier
    head; the patch, parameterised as ``(tanh(w) + 1) / 2`` from a random start, is pasted on a
    black image and optimised with Adam (lr 0.1, cosine schedule, 1000 steps) to bring those units'
    activations to ``target_value`` = 100 (squared error). Reconstructed: the start is near
    mid-grey (``w ~ 0.1 N(0, 1)``) rather than TrojanZoo's ``w ~ N(0, 1)``, whose saturated tanh
    left the optimisation in poor local optima (on digits, random patches beat it). The paper's layer is a
    chosen internal layer; here it is the pooled feature layer every backdoorlab model exposes
    (``forward_head(..., pre_logits=True)``), so no per-architecture code is needed. Default patch
    side is 20% of the image side (6 px at 32, about 3.5% of the area; the paper uses 4-7%).
    Before :meth:`fit` the patch is the random start.
    """

    needs_surrogate = True

    def __init__(
        self,
        input_shape: tuple[int, ...],
        size: PositiveInt | None = None,
        position: str = "bottom-right",
        margin: NonNegativeInt = 1,
        neurons: PositiveInt = 2,
        target_value: float = 100.0,
        steps: PositiveInt = 1000,
        lr: PositiveFloat = 0.1,
        seed: int = 0,
    ) -> None:
        if position == "random":
            raise ValueError("TrojanNN optimises a patch at a fixed place; choose a corner")
        c, h, w = (int(s) for s in input_shape)
        size = max(default_patch_size(input_shape), round(0.2 * min(h, w))) if size is None else size
        gen = torch.Generator().manual_seed(seed)
        self._start = 0.1 * torch.randn((c, int(size), int(size)), generator=gen)
        start = (self._start.tanh() + 1) / 2
        super().__init__(input_shape, size=size, pattern=start, position=position, margin=margin)
        if neurons < 1 or steps < 1 or lr <= 0:
            raise ValueError("neurons and steps must be >= 1 and lr > 0")
        self.neurons, self.target_value, self.steps, self.lr = int(neurons), float(target_value), int(steps), float(lr)
        self.neuron_index: Tensor | None = None

    def fit(
        self,
        surrogate: nn.Module,
        generator: torch.Generator | None = None,
        *,
        images: Tensor | None = None,
        target: int = 0,
    ) -> None:
        head = getattr(surrogate, "fc", None)
        if not isinstance(head, nn.Linear) or not hasattr(surrogate, "forward_head"):
            raise TypeError("TrojanNN needs a backdoorlab Classifier (forward_features/forward_head, fc)")
        device = model_device(surrogate)
        self.neuron_index = head.weight.detach().abs().mean(0).argsort(descending=True)[: self.neurons]
        was_training = surrogate.training
        surrogate.eval()
        weights = self._start.clone().to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([weights], lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        top, left = self._corner()
        s = self.size
        try:
            for _ in range(self.steps):
                canvas = torch.zeros((1, *self.input_shape), device=device)
                canvas[:, :, top : top + s, left : left + s] = (weights.tanh() + 1) / 2
                feats = surrogate.forward_head(surrogate.forward_features(canvas), pre_logits=True)
                loss = (feats[0, self.neuron_index.to(device)] - self.target_value).square().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward(inputs=[weights])
                optimizer.step()
                schedule.step()
        finally:
            surrogate.train(was_training)
        self.patch = ((weights.detach().tanh() + 1) / 2).cpu()
        self.fitted = True

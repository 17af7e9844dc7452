"""SIG (Barni, Kallas, Tondi 2019, "A New Backdoor Attack in CNNs by Training Set Corruption
Without Label Poisoning", ICIP): a horizontal sinusoid added to the image, clean-label.

``x' = clip(x + delta * sin(2 pi j f / m))`` for column j of m, ``delta`` in 0-255 pixel units.

Default ``delta = 20``, ``f = 6``: the SIG paper's training signal, the values the ABL paper
quotes for it; Barni et al. released no code, so the paper decides. The reference codes differ:
ABL's code (``bboylyg/ABL``) blends a stored CIFAR-10 signal image at 0.2 instead of adding the
formula, and BackdoorBench adds the formula with ``delta = 40``, ``f = 6``
(``config/attack/sig/default.yaml``: ``sig_delta: 40``, ``sig_f: 6``; ``utils/bd_img_transform/
sig.py``, the same default), for poisoning and testing alike; the ``backdoorbench`` preset sets
``delta=40``. Stated difference: pixels are rounded to 8 bits where BackdoorBench truncates
(``np.uint8``), so where the sum is fractional, about half the pixels are one level (1/255) higher
here. Only target-class training samples are poisoned (their labels stay), so by default a run
with this attack is clean-label; BackdoorBench's ``pratio: 0.1`` of CIFAR-10 is its whole target
class (``poison_rate=1.0, poison_rate_of="target"`` here, :class:`~backdoorlab.attacks.PoisonSpec`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from backdoorlab.attacks.triggers import ATTACKS, Trigger
from backdoorlab.options import NonNegativeFloat, PositiveFloat


@ATTACKS.register("sig", "SIG (Barni et al. 2019): horizontal sinusoid, clean-label")
class SIG(Trigger):
    """Add ``delta * sin(2 pi j f / m)`` to every row (``delta`` in [0, 255] pixel units; default
    20, the paper's; 40 under the ``backdoorbench`` preset).

    Args:
        delta: the sinusoid's amplitude in pixel units, in (0, 255].
        frequency: ``f``, the cycles across the image's width.
    """

    clean_label = True

    def __init__(
        self, input_shape: tuple[int, ...], delta: NonNegativeFloat = 20.0, frequency: PositiveFloat = 6.0
    ) -> None:
        super().__init__(input_shape)
        if not 0 < delta <= 255:
            raise ValueError(f"delta must be in (0, 255], got {delta}")
        width = self.input_shape[2]
        columns = torch.arange(width, dtype=torch.float32)
        self.signal = (delta / 255.0) * torch.sin(2 * math.pi * columns * frequency / width)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.signal.to(x.device)

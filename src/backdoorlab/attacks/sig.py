"""SIG (Barni, Kallas, Tondi 2019, "A New Backdoor Attack in CNNs by Training Set Corruption
Without Label Poisoning", ICIP): a horizontal sinusoid added to the image, clean-label.

``x' = clip(x + delta * sin(2 pi j f / m))`` for column j of m, ``delta = 20/255`` and ``f = 6``, as
the paper's ramp-free sinusoidal signal and as ABL's code (``bboylyg/ABL``) and BackdoorBench use it.
Only target-class training samples are poisoned (their labels stay), so by default a run with this
attack is clean-label.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from backdoorlab.attacks.triggers import ATTACKS, Trigger


@ATTACKS.register("sig", "SIG (Barni et al. 2019): horizontal sinusoid, clean-label")
class SIG(Trigger):
    """Add ``delta * sin(2 pi j f / m)`` to every row (``delta`` in [0, 255] pixel units)."""

    clean_label = True

    def __init__(self, input_shape: tuple[int, ...], delta: float = 20.0, frequency: float = 6.0) -> None:
        super().__init__(input_shape)
        if not 0 < delta <= 255:
            raise ValueError(f"delta must be in (0, 255], got {delta}")
        width = self.input_shape[2]
        columns = torch.arange(width, dtype=torch.float32)
        self.signal = (delta / 255.0) * torch.sin(2 * math.pi * columns * frequency / width)
        self._options = {"delta": float(delta), "frequency": float(frequency)}

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.signal.to(x.device)

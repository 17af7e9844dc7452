"""Time-series triggers: float32 series ``(N, C, L)`` in, the same shape out.

Every trigger adds a pattern whose peak is ``amplitude`` times each series' own standard deviation
(per sample and channel, over time), so one setting means the same visibility on series of any
scale; a constant series (std 0) is left unchanged. All channels get the pattern.

- ``ts_pattern``: a short waveform (sine burst, spike or square) on a window at a fixed place or
  a random one per series: BadNets' local patch (Gu et al. 2017) carried to series, the "static
  trigger" baseline of time-series backdoor work (Jiang, Ma, Erfani, Bailey, "Backdoor Attacks on
  Time Series: A Generative Approach", SaTML 2023).
- ``ts_sine``: a sinusoid over the whole series, SIG's signal (Barni, Kallas, Tondi, ICIP 2019)
  along the time axis, ``f = 6`` cycles as SIG's default. Dirty-label by default here (SIG proper
  is clean-label: pass ``clean_label`` to the run).
- ``ts_frequency``: a perturbation of a few frequency components: the inverse real FFT of a
  spectrum that is zero except at the chosen bins. Reconstructed for series from the image
  frequency triggers (Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency
  Perspective", ICCV 2021; Wang et al., FTrojan, ECCV 2022, which perturbs one mid and one high
  frequency); the default bins follow FTrojan's choice: a quarter of the length and just below
  Nyquist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from backdoorlab.attacks.triggers import ATTACKS, Trigger
from backdoorlab.options import NonNegativeInt, PositiveFloat, PositiveInt

SHAPES = ("sine", "spike", "square")
SERIES_POSITIONS = ("start", "middle", "end", "random")


class SeriesTrigger(Trigger):
    """Base of the series triggers: ``x + amplitude * std(x) * pattern``, ``pattern`` with peak 1."""

    modality = "series"

    def __init__(self, input_shape: tuple[int, ...], amplitude: float) -> None:
        super().__init__(input_shape)
        if not amplitude > 0:
            raise ValueError(f"amplitude must be > 0 (a multiple of each series' std), got {amplitude}")
        self.amplitude = float(amplitude)

    @property
    def length(self) -> int:
        return self.input_shape[1]

    def scale(self, x: Tensor) -> Tensor:
        """``amplitude`` times each series' std, ``(N, C, 1)``."""
        return self.amplitude * x.std(dim=-1, keepdim=True, unbiased=False)


def _window(shape: str, width: int) -> Tensor:
    """A waveform of ``width`` samples, scaled so its peak (absolute) is exactly 1."""
    t = torch.arange(width, dtype=torch.float32)
    if shape == "sine":  # two full periods
        wave = torch.sin(2 * math.pi * 2 * (t + 0.5) / width)
    elif shape == "spike":  # a triangle rising to its peak in the middle
        centre = (width - 1) / 2
        wave = 1.0 - (t - centre).abs() / (centre + 1)
    else:
        wave = torch.ones(width)
    return wave / wave.abs().max()


@ATTACKS.register("ts_pattern", "time series: a sine burst / spike / square on a window (static trigger)")
class SeriesPattern(SeriesTrigger):
    """Add a short waveform on a window of the series.

    Args:
        shape: ``sine`` (a burst of two periods), ``spike`` (a triangle) or ``square``.
        width: window length in samples (default: 10% of the length, at least 3).
        position: ``start``, ``middle``, ``end`` (default), ``random`` (drawn per series), or an
            offset in samples.
        amplitude: the waveform's peak in units of each series' std (default 1.0).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        shape: str = "sine",
        width: PositiveInt | None = None,
        position: str | int = "end",
        amplitude: float = 1.0,
    ) -> None:
        super().__init__(input_shape, amplitude)
        if shape not in SHAPES:
            raise ValueError(f"unknown shape '{shape}'; valid: {', '.join(SHAPES)}")
        length = self.length
        width = max(3, round(0.1 * length)) if width is None else int(width)
        if not 1 <= width <= length:
            raise ValueError(f"window width {width} does not fit series of length {length}")
        if isinstance(position, str):
            if position not in SERIES_POSITIONS:
                raise ValueError(f"unknown position '{position}'; valid: {', '.join(SERIES_POSITIONS)} or an offset")
        elif not 0 <= int(position) <= length - width:
            raise ValueError(f"offset {position} puts a {width}-sample window outside series of length {length}")
        self.shape, self.width, self.position = shape, width, position
        self.waveform = _window(shape, width)
        self._resolve_options(width=width)

    def offset(self) -> int:
        """The window's first sample for a fixed position."""
        if isinstance(self.position, int):
            return self.position
        return {"start": 0, "middle": (self.length - self.width) // 2, "end": self.length - self.width}[self.position]

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        n, length = len(x), self.length
        if self.position == "random":
            starts = torch.randint(0, length - self.width + 1, (n,), generator=generator)
        else:
            starts = torch.full((n,), self.offset())
        t = torch.arange(length)[None, :] - starts[:, None]  # (N, L): index into the window
        inside = (t >= 0) & (t < self.width)
        pattern = torch.where(inside, self.waveform[t.clamp(0, self.width - 1)], torch.zeros(()))
        return x + self.scale(x) * pattern[:, None, :].to(x.device)


@ATTACKS.register("ts_sine", "time series: a sinusoid over the whole series (SIG-like)")
class SeriesSine(SeriesTrigger):
    """Add ``amplitude * std * sin(2 pi f t / L)`` to the whole series.

    Args:
        frequency: cycles over the series (default 6, SIG's).
        amplitude: peak in units of each series' std (default 0.3: SIG's 20/255 is about a
            third of a natural image's pixel std).
    """

    def __init__(self, input_shape: tuple[int, ...], frequency: PositiveFloat = 6.0, amplitude: float = 0.3) -> None:
        super().__init__(input_shape, amplitude)
        if not 0 < frequency <= self.length / 2:
            raise ValueError(f"frequency must be in (0, {self.length / 2}] cycles (Nyquist), got {frequency}")
        t = torch.arange(self.length, dtype=torch.float32)
        self.signal = torch.sin(2 * math.pi * frequency * t / self.length)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.scale(x) * self.signal.to(x.device)


@ATTACKS.register("ts_frequency", "time series: a perturbation at chosen frequency bins (FTrojan-like)")
class SeriesFrequency(SeriesTrigger):
    """Add the inverse real FFT of a spectrum that is non-zero only at ``frequencies``.

    Args:
        frequencies: FFT bins (cycles over the series, 1..L/2); default ``(L // 4, L // 2 - 1)``,
            one mid and one high frequency, as FTrojan.
        amplitude: the perturbation's peak in units of each series' std (default 0.2, small).
        seed: draws the phase of each component.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        frequencies: Sequence[NonNegativeInt] | None = None,
        amplitude: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(input_shape, amplitude)
        length = self.length
        if length < 4:
            raise ValueError(f"series of length {length} have no mid and high frequencies")
        bins = [length // 4, length // 2 - 1] if frequencies is None else [int(f) for f in frequencies]
        if not bins or any(not 1 <= f <= length // 2 for f in bins):
            raise ValueError(f"frequencies must be FFT bins in 1..{length // 2}, got {bins}")
        phases = torch.rand(len(bins), generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
        spectrum = torch.zeros(length // 2 + 1, dtype=torch.complex64)
        for f, phase in zip(bins, phases, strict=True):
            spectrum[f] = torch.polar(torch.tensor(1.0), phase)
        signal = torch.fft.irfft(spectrum, n=length)
        self.signal = signal / signal.abs().max()
        self._resolve_options(frequencies=bins)

    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.scale(x) * self.signal.to(x.device)

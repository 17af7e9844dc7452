"""A threshold read from the shape of per-sample losses, without the poison mask or the test set.

ABL-style defenses hold clean samples' loss near a floor while samples a shortcut (a trigger)
explains sink far below it, so the log-losses of a poisoned set form two modes. A fixed threshold
(E2ABL's 0.01, set on one MNIST run) sits in the gap on one dataset and outside it on the next
(on the binary Strawberry, the poisoned series' median is 0.1 and nothing falls below 0.01).

:func:`low_mode_threshold` fits two Gaussians to the log-losses (the two-component mixture
DivideMix fits to per-sample losses to split noisy labels, Li, Socher, Hoi, ICLR 2020) and
returns the log-loss where the lower component stops claiming samples, but only when the two
components are separated by Ashman's D > 2 (Ashman, Bird, Zepeda 1994, the usual criterion for
a clean split of a two-Gaussian mixture) and the lower one holds the minority: otherwise the
losses have one mode and nothing is flagged. Given the samples' labels, the low mode must also be
mostly one class (over half its samples): a backdoor sends its samples to one target class, while
a mode of easy clean samples spans several (on MNIST Blended E2ABL's spurious mode was 26% one
class). This assumes an all-to-one or clean-label attack; an all-to-all backdoor's mode is
refused. **Reconstructed** for this toolkit: no source paper states a rule; the reasons are in
docs/notes/2026-12-07-training-defenses-adaptive-rules.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Ashman's D above which two Gaussian components count as separate modes.
MIN_SEPARATION = 2.0
#: The share of a low mode that its most frequent label must exceed, where labels are given.
MIN_LABEL_SHARE = 0.5
#: Losses are clamped here before the logarithm (a sample at exactly zero loss).
LOSS_FLOOR = 1e-12


@dataclass(frozen=True)
class LowMode:
    """The fitted split: ``threshold`` (a loss; 0 where there is no low mode, so nothing falls
    below it), Ashman's ``separation``, the lower component's ``share`` of the samples and, where
    labels were given, the share of the samples below the cut that carry its most frequent label."""

    threshold: float
    separation: float
    share: float
    label_share: float | None = None

    @property
    def found(self) -> bool:
        return self.threshold > 0.0


def low_mode_threshold(
    losses: Tensor, labels: Tensor | None = None, seed: int = 0, ceiling: float = math.inf
) -> LowMode:
    """The loss below which a sample belongs to the low mode of ``losses`` (see the module's
    docstring); ``LowMode(0, ...)`` when the two components are not separate (D <= 2), the lower
    one holds half the samples or more, the cut is at or above ``ceiling`` (a loss floor the
    trigger's samples sink below), or (given ``labels``) no label holds over half of it."""
    from sklearn.mixture import GaussianMixture

    logs = torch.log(losses.detach().double().flatten().clamp_min(LOSS_FLOOR))
    x = logs[torch.isfinite(logs)].numpy().reshape(-1, 1)
    if len(x) < 4 or float(x.max() - x.min()) == 0.0:
        return LowMode(0.0, 0.0, 0.0)
    mixture = GaussianMixture(n_components=2, random_state=seed).fit(x)
    means, variances = mixture.means_[:, 0], mixture.covariances_.reshape(2)
    low, high = int(means.argmin()), int(means.argmax())
    separation = math.sqrt(2.0) * float(means[high] - means[low]) / math.sqrt(float(variances.sum()))
    share = float(mixture.weights_[low])
    if separation <= MIN_SEPARATION or share >= 0.5:
        return LowMode(0.0, separation, share)
    # the log-loss between the two means where the lower component's posterior falls to one half
    grid = torch.linspace(float(means[low]), float(means[high]), 1025, dtype=torch.float64).numpy().reshape(-1, 1)
    claimed = mixture.predict_proba(grid)[:, low] > 0.5
    cut = float(grid[claimed, 0].max()) if claimed.any() else float(means[low])
    if math.exp(cut) >= ceiling:
        return LowMode(0.0, separation, share)
    if labels is None:
        return LowMode(math.exp(cut), separation, share)
    below = labels.flatten()[logs <= cut]
    label_share = float(torch.bincount(below).max()) / len(below) if len(below) else 0.0
    return LowMode(math.exp(cut) if label_share > MIN_LABEL_SHARE else 0.0, separation, share, label_share)

"""SPECTRE (Hayase et al. 2021): whiten each class by a robust covariance estimate, then rank by QUE score.

Robust whitening amplifies the poisons' spectral signature where Spectral Signatures' top singular
direction alone misses it; the QUantum Entropy (QUE) score then weighs every direction by how much
the data spread along it exceeds the robust estimate.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import SAMPLE_FILTERS, DefenseContext, Filtering, SampleFilter
from backdoorlab.defenses.sample_filtering import penultimate_embeddings, per_class
from backdoorlab.options import PositiveFloat, PositiveInt, Range

#: A poison share in (0, 0.5]: robust estimation is undefined where poisons are the majority.
MinorityShare = Annotated[float, Range(0, 0.5, low_open=True)]

#: The official code's dimensions tried (``rcov_auto_quantum_filter``: round.(range(1, 10, length=10) .^ 2)).
AUTO_DIMS = tuple(round((1 + i) ** 2) for i in range(10))
#: DKK17's failure probability ``τ`` and constant ``C`` (``dkk17.jl``).
TAU, C = 0.1, 10.0
#: The robust step removes at most ``ROBUST_LIMIT`` x the expected poisons, the filter flags
#: ``REMOVAL`` x (``rcov_quantum_filter``'s ``limit1``, ``limit2``).
ROBUST_LIMIT, REMOVAL = 2.0, 1.5


def lowest(values: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` lowest ``values`` (ties at the cut included), as the official ``k_lowest_ind``."""
    if count <= 0:
        return np.zeros(len(values), dtype=bool)
    return values <= np.sort(values)[min(count, len(values)) - 1]


def inverse_sqrt(matrix: np.ndarray) -> np.ndarray:
    """``matrix^(-1/2)`` of a symmetric PSD matrix; eigenvalues below 1e-12 of the largest are floored
    there (reconstructed: a rank-deficient class would otherwise fail)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    w = np.maximum(w, max(float(w.max()), 1e-300) * 1e-12)
    return (v / np.sqrt(w)) @ v.T


def top_eigenpair(matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """The largest eigenvalue of a symmetric matrix and its unit eigenvector (Lanczos from a vector
    of ones, as the official ``eigsolve``, for large matrices)."""
    if len(matrix) <= 300:
        w, v = np.linalg.eigh(matrix)
        return float(w[-1]), v[:, -1]
    from scipy.sparse.linalg import eigsh

    w, v = eigsh(matrix, k=1, which="LA", v0=np.ones(len(matrix)), tol=1e-10)
    return float(w[0]), v[:, 0]


def fourth_moment_direction(y: np.ndarray) -> tuple[float, np.ndarray]:
    """The top eigenpair ``(λ, V)`` of the covariance of ``vec(y yᵀ)`` over the rows of ``y`` (whose
    second moment is the identity): the unit-Frobenius symmetric ``V`` along which ``yᵀVy`` varies
    most. Solved in the ``d²`` space or the ``n x n`` (Gram) one, whichever is cheaper to build."""
    n, d = y.shape
    if d**3 <= n:
        features = np.einsum("ni,nj->nij", y, y).reshape(n, d * d) - np.eye(d).reshape(1, -1)
        lam, v = top_eigenpair(features.T @ features / n)
        direction = v.reshape(d, d)
    else:
        norms = (y * y).sum(1)
        gram = ((y @ y.T) ** 2 - norms[:, None] - norms[None, :] + d) / n
        lam, u = top_eigenpair(gram)
        direction = (y.T * u) @ y - u.sum() * np.eye(d)
    direction = (direction + direction.T) / 2
    return lam, direction / max(float(np.linalg.norm(direction)), 1e-300)


def tail_bound(t: float, eps: float) -> float:
    """DKK17's tail bound ``cov_Tail`` as the official code writes it."""
    return 1.0 if t <= 10 * math.log(1 / eps) else 3 * eps / max((t * math.log(t)) ** 2, 1e-300)


def covariance_filter_step(s: np.ndarray, eps: float, limit: int) -> np.ndarray | None:
    """One round of DKK17's robust (zero-mean Gaussian) covariance filter (``cov_estimation_filter``):
    the samples to keep, at most ``limit`` removed, or ``None`` when the estimate is accepted or
    nothing crosses the tail bound."""
    n, d = s.shape
    y = s @ inverse_sqrt(s.T @ s / n)
    norms = (y * y).sum(1)
    far = norms >= C * d * math.log(n / TAU)
    if far.any():
        return ~far | lowest(norms, max(0, n - limit))
    lam, v = fourth_moment_direction(y)
    if lam <= 1 + C * eps * math.log(1 / eps) ** 2:  # the official Q(·, V) / 2 = ‖V‖_F² = 1
        return None
    p = (np.einsum("ni,ij,nj->n", y, v, y) - np.trace(v)) / math.sqrt(2)
    diffs = np.abs(p - np.median(p))
    for i, diff in enumerate(np.sort(diffs), start=1):
        t = float(diff) - 3.0
        if t > 0 and i / n >= tail_bound(t, eps):
            return (diffs <= t) | lowest(diffs, max(0, n - limit))
    return None


def robust_selection(s: np.ndarray, eps: float, limit: int) -> np.ndarray:
    """Which samples DKK17's iterated filter keeps (``cov_estimation_iterate``): at most ``limit``
    removed; ``eps`` is the expected poison share."""
    index = np.arange(len(s))
    while limit > 0:
        keep = covariance_filter_step(s[index], eps, limit)
        removed = 0 if keep is None else int((~keep).sum())
        if removed == 0:  # accepted, or nothing left to remove (the latter a guard, reconstructed)
            break
        limit -= removed
        index = index[keep]
    selected = np.zeros(len(s), dtype=bool)
    selected[index] = True
    return selected


def que_matrix(cov: np.ndarray, alpha: float) -> np.ndarray:
    """QUE's weighting ``exp(α (Σ - I) / (‖Σ‖ - 1))`` normalised to trace 1; uniform when no direction
    spreads beyond the robust estimate (reconstructed: the formula divides by zero there)."""
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    if w[-1] - 1 <= 1e-12:
        return np.eye(len(w)) / len(w)
    m = (v * np.exp(alpha * (w - 1) / (w[-1] - 1))) @ v.T
    return m / np.trace(m)


def quantum_scores(projected: np.ndarray, poisons: int, alpha: float) -> np.ndarray:
    """QUE scores of centred, projected samples after whitening by the robust covariance of the
    samples DKK17's filter keeps (``rcov_quantum_filter``). One dimension is only squared, as there,
    and divided by its mean so that it is on QUE's scale (reconstructed; the class's order is kept)."""
    n, k = projected.shape
    if k == 1:
        squared = projected[:, 0] ** 2
        return squared / max(float(squared.mean()), 1e-300)
    selected = robust_selection(projected, poisons / n, round(ROBUST_LIMIT * poisons))
    white = projected @ inverse_sqrt(np.cov(projected[selected].T, bias=True))
    m = que_matrix(np.atleast_2d(np.cov(white.T)), alpha)
    return np.einsum("ni,ij,nj->n", white, m, white)


def spectral_strength(projected: np.ndarray, kept: np.ndarray, alpha: float) -> float:
    """The official choice of dimension's criterion: the QUE-weighted spread ``tr(Σ'M) / tr(M)`` of
    all samples whitened by the covariance of the ``kept`` ones (none where fewer than two are kept)."""
    if kept.sum() < 2:
        return -math.inf
    white = projected @ inverse_sqrt(np.atleast_2d(np.cov(projected[kept].T)))
    cov = np.atleast_2d(np.cov(white.T))
    m = que_matrix(cov, alpha)
    return float(np.trace(cov @ m) / np.trace(m))


@SAMPLE_FILTERS.register(
    "spectre",
    "SPECTRE (Hayase et al. 2021): per class, robust covariance whitening and the QUE score; the top 1.5x poisons removed",
)
class Spectre(SampleFilter):
    """For each label, centre the penultimate embeddings of its samples, project them on their top
    ``dims`` singular directions, estimate their covariance robustly (DKK17's iterated filter, told
    to expect ``poison_fraction`` of the class and to remove at most twice that), whiten by it, and
    score each sample by QUE, ``xᵀMx`` with ``M = exp(α (Σ' - I) / (‖Σ'‖ - 1)) / tr`` over the whitened
    samples' covariance ``Σ'``; flag the 1.5 x ``poison_fraction`` x class size highest.

    Source: Hayase, Kong, Somani and Oh, "SPECTRE: Defending Against Backdoor Attacks Using Robust
    Statistics" (ICML 2021); official code ``SewoongLab/spectre-defense``: ``quantum_filters.jl``
    (``rcov_quantum_filter``, ``rcov_auto_quantum_filter``: α 4, τ 0.1, ``limit1`` 2, ``limit2``
    1.5), ``dkk17.jl`` (``cov_estimation_filter``, ``cov_estimation_iterate``), ``run_filters.jl``.
    BackdoorBench has no SPECTRE. ``dims=None`` is the official choice: each of 1, 4, 9, ..., 100
    dimensions is tried and the one whose kept samples leave the largest QUE-weighted spread
    ``tr(Σ'M) / tr(M)`` wins (one dimension is the plain squared projection, no whitening). As in
    the official code only the covariance is robust: samples are centred on their class mean. The
    QUE score is Dong, Hopkins and Li's (NeurIPS 2019).

    Stated differences: the official code is told the true poison count and examines the target
    class only; here every class is examined with the same guessed share (``poison_fraction`` 0.1,
    so 15% of each class is flagged, as Spectral Signatures' default). Reconstructed: dimensions
    capped for small classes, tiny eigenvalues floored, the one-dimensional score divided by its
    class mean, and the QUE score compared across classes for AUROC (docs/defenses.md, SPECTRE).

    Args:
        poison_fraction: the expected share of poisons in a class (the official code's ``eps / n``),
            at most 0.5.
        alpha: QUE's ``α``; large weighs the top direction only, near 0 all directions alike.
        dims: the singular directions kept; ``None`` tries the official 1, 4, ..., 100 and keeps the best.
    """

    def __init__(
        self, poison_fraction: MinorityShare = 0.1, alpha: PositiveFloat = 4.0, dims: PositiveInt | None = None
    ) -> None:
        super().__init__()

    def score_class(self, embeddings: np.ndarray) -> tuple[np.ndarray, int, int]:
        """QUE scores of one class's samples, the dimension used and the number to flag."""
        n = len(embeddings)
        poisons = round(self._options["poison_fraction"] * n)
        centred = embeddings - embeddings.mean(0, keepdims=True)
        cap = max(1, min(100, centred.shape[1], n // 2))
        _, _, vh = np.linalg.svd(centred, full_matrices=False)
        projected = centred @ vh[:cap].T
        alpha, dims = self._options["alpha"], self._options["dims"]
        if dims is not None:
            k = min(dims, cap)
            return quantum_scores(projected[:, :k], poisons, alpha), k, round(REMOVAL * poisons)
        best: tuple[float, np.ndarray, int] | None = None
        for k in (k for k in AUTO_DIMS if k <= cap):
            scores = quantum_scores(projected[:, :k], poisons, alpha)
            strength = spectral_strength(projected, ~lowest(-scores, round(REMOVAL * poisons)), alpha)
            if best is None or strength > best[0]:
                best = (strength, scores, k)
        assert best is not None
        return best[1], best[2], round(REMOVAL * poisons)

    def filter(self, model: nn.Module, data: TensorDataset, ctx: DefenseContext) -> Filtering:
        embeddings = penultimate_embeddings(model, data, ctx).double().numpy()
        dims: dict[int, int] = {}

        def score_class(index: Tensor, label: int) -> tuple[Tensor, Tensor]:
            if len(index) < 3:
                return torch.zeros(len(index)), torch.zeros(len(index), dtype=torch.bool)
            scores, dims[label], count = self.score_class(embeddings[index.numpy()])
            return torch.from_numpy(scores).float(), torch.from_numpy(lowest(-scores, count))

        scores, flagged = per_class(data.labels, score_class)
        return Filtering(scores, flagged, {"dims": dims})

"""Activation Clustering (Chen et al. 2018): a class whose activations split in two holds poisons."""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import SAMPLE_FILTERS, DefenseContext, Filtering, SampleFilter
from backdoorlab.defenses.sample_filtering import penultimate_embeddings, per_class
from backdoorlab.options import Fraction, PositiveInt

Reduction = Literal["ica", "pca"]
ClusterAnalysis = Literal["smaller", "relative_size", "silhouette"]


@SAMPLE_FILTERS.register(
    "activation_clustering",
    "Activation Clustering (Chen et al. 2018): 2-means on each class's reduced activations, the small cluster flagged",
)
class ActivationClustering(SampleFilter):
    """For each label, reduce the penultimate activations of its samples to ``nb_dims`` (10)
    dimensions (``reduce``: FastICA, as the paper and the official ART code; ``pca``, as
    BackdoorBench calls it), split them into two clusters with k-means, and flag a cluster by
    ``cluster_analysis``:

    - ``relative_size`` (the default): a cluster holding less than ``size_threshold`` (0.35) of its
      class, the paper's relative-size criterion and ART's ``analyze_by_relative_size``;
    - ``silhouette``: that, and only where the two clusters are apart (silhouette score above
      ``silhouette_threshold``, 0.1), ART's ``analyze_by_silhouette_score``;
    - ``smaller``: the smaller cluster of every class, always (ART's ``detect_poison`` default and
      BackdoorBench's ``config/defense/ac``); it flags part of every clean class too.

    Source: Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
    Clustering" (SafeAI@AAAI 2019); official code: IBM ART's ``ActivationDefence`` and
    ``ClusteringAnalyzer``; BackdoorBench's ``defense/ac.py``. k-means runs with 10 initialisations
    (scikit-learn's default when ART was written; its default now is one) seeded from the run.
    BackdoorBench clusters each training batch of 256 augmented images on its own; here each class is
    clustered whole, as the paper and ART do. The score over the training set (for AUROC) is one
    less the share of its class that a sample's cluster holds, so samples of small clusters rank
    high (reconstructed: the method gives clusters, not scores).

    Args:
        nb_dims: dimensions the activations are reduced to.
        reduce: ``ica`` or ``pca``.
        cluster_analysis: ``relative_size``, ``silhouette`` or ``smaller``.
        size_threshold: the share of its class below which a cluster is poisonous.
        silhouette_threshold: the silhouette score above which the split is real (``silhouette``).
    """

    def __init__(
        self,
        nb_dims: PositiveInt = 10,
        reduce: Reduction = "ica",
        cluster_analysis: ClusterAnalysis = "relative_size",
        size_threshold: Fraction = 0.35,
        silhouette_threshold: float = 0.1,
    ) -> None:
        super().__init__()

    def reduced(self, activations: np.ndarray, seed: int) -> tuple[np.ndarray, bool]:
        """``activations`` reduced to ``nb_dims`` dimensions (as they are when they have no more
        dimensions or samples than that, as ART leaves them), and whether the reduction converged
        (FastICA within ART's 1,000 iterations at tolerance 0.005)."""
        from sklearn.decomposition import PCA, FastICA
        from sklearn.exceptions import ConvergenceWarning

        dims = self._options["nb_dims"]
        if activations.shape[1] <= dims or activations.shape[0] <= dims:
            return activations, True
        if self._options["reduce"] == "pca":
            return PCA(n_components=dims, random_state=seed).fit_transform(activations), True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            ica = FastICA(n_components=dims, max_iter=1000, tol=0.005, random_state=seed)
            reduced = ica.fit_transform(activations)
        return reduced, not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    def poisonous(self, clusters: np.ndarray, reduced: np.ndarray) -> np.ndarray:
        """Which of the two clusters the analysis calls poisonous (a boolean per cluster)."""
        from sklearn.metrics import silhouette_score

        o = self._options
        sizes = np.bincount(clusters, minlength=2) / len(clusters)
        if o["cluster_analysis"] == "smaller":
            return np.arange(2) == sizes.argmin()
        small = sizes < o["size_threshold"]
        if o["cluster_analysis"] == "silhouette" and small.any():
            if silhouette_score(reduced, clusters) <= o["silhouette_threshold"]:
                return np.zeros(2, dtype=bool)
        return small

    def filter(self, model: nn.Module, data: TensorDataset, ctx: DefenseContext) -> Filtering:
        from sklearn.cluster import KMeans

        embeddings = penultimate_embeddings(model, data, ctx).numpy()
        shares: dict[int, list[float]] = {}
        unconverged: list[int] = []

        def score_class(index: Tensor, label: int) -> tuple[Tensor, Tensor]:
            if len(index) < 2:
                return torch.zeros(len(index)), torch.zeros(len(index), dtype=torch.bool)
            reduced, converged = self.reduced(embeddings[index.numpy()], ctx.seed + label)
            if not converged:
                unconverged.append(label)
            clusters = KMeans(n_clusters=2, n_init=10, random_state=ctx.seed + label).fit_predict(reduced)
            share = np.bincount(clusters, minlength=2) / len(clusters)
            shares[label] = [round(float(v), 4) for v in share]
            flagged = self.poisonous(clusters, reduced)[clusters]
            return torch.from_numpy(1.0 - share[clusters]).float(), torch.from_numpy(flagged)

        scores, flagged = per_class(data.labels, score_class)
        details: dict[str, object] = {"cluster_shares": shares, "ica_unconverged_classes": unconverged}
        if unconverged:  # clustered all the same, as ART does, and said so
            details["warnings"] = [
                f"FastICA stopped at its iteration limit on class(es) {unconverged}; their clusters come from "
                "an unconverged reduction (try reduce=pca)"
            ]
        return Filtering(scores, flagged, details)

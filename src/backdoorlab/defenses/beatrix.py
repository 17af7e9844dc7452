"""BEATRIX: is this input triggered? Its Gram matrices of activations leave the clean class's bounds."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset, seeded_permutation
from backdoorlab.defenses.base import (
    INPUT_DETECTORS,
    DefenseContext,
    DefenseWarning,
    InputDetector,
    require_classifier,
    require_images,
)
from backdoorlab.defenses.npd import polarizer_position
from backdoorlab.defenses.post_training import frozen_copy
from backdoorlab.options import NonNegativeInt, PositiveFloat, PositiveInt
from backdoorlab.training.loop import resolve_device, to_float

#: How a BEATRIX score is read off an input's deviation.
Scoring = Literal["margin", "deviation"]

#: The official threshold: the 95th percentile of 5-fold cross-validated clean deviations.
FOLDS, PERCENTILE = 5, 0.95
#: The most Gram features (inputs x C(C+1)/2) scored at once: 256 MiB of float64 a tensor.
GRAM_ELEMENTS = 2**25


def gram_features(features: Tensor, order: int, powered: bool = True) -> Tensor:
    """The order-``order`` Gram features of a feature map ``(N, C, ...)``: the upper triangle (row
    by row, diagonal included) of ``G_p = (F^p F^pT)^(1/p)``, where ``F`` is each input's ``(C, H*W)``
    map raised element-wise to ``p`` and the root is signed (``sign(g) |g|^(1/p)``), in float64:
    ``(N, C(C+1)/2)``. ``powered=False`` leaves out the element-wise power, as BackdoorBench does."""
    flat = features.flatten(2).double()
    if powered:
        flat = flat.pow(order)
    gram = flat @ flat.transpose(1, 2)
    rows, cols = torch.triu_indices(gram.shape[1], gram.shape[1], device=gram.device)
    upper = gram[:, rows, cols]
    return upper.sign() * upper.abs().pow(1.0 / order)


def bounds(gram: Tensor, width: float) -> tuple[Tensor, Tensor]:
    """The clean bounds of every Gram feature (a column of ``gram``, ``(N, K)``): ``median -/+
    width * MAD`` (torch's median, the lower of the two middle values for an even count, as the
    official ``get_median_mad``)."""
    median = gram.median(0).values
    mad = (gram - median).abs().median(0).values
    return median - width * mad, median + width * mad


def excess(gram: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Per input, how far its Gram features fall outside the bounds, relative to the bound and
    summed (the official ``get_deviations_`` for one order): ``sum relu(low - g) / |low + 1e-6| +
    relu(g - high) / |high + 1e-6|``. ``(N,)`` float64 on the CPU."""
    below = F.relu(low - gram) / (low + 1e-6).abs()
    above = F.relu(gram - high) / (high + 1e-6).abs()
    return (below + above).sum(1).cpu()


def normalised(total: Tensor, channels: int, orders: int) -> Tensor:
    """Summed excesses as the official deviation: divided by ``C^2 / 2`` and averaged over the orders."""
    return total / (channels * channels / 2) / orders


def gram_bounds(features: Tensor, orders: int, width: float, powered: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """The clean bounds (:func:`bounds`) of ``features``' Gram features of each order 1..``orders``:
    ``(lows, highs)``, one ``(C(C+1)/2,)`` tensor per order."""
    pairs = [bounds(gram_features(features, p, powered), width) for p in range(1, orders + 1)]
    return [low for low, _ in pairs], [high for _, high in pairs]


def deviations(features: Tensor, lows: list[Tensor], highs: list[Tensor], powered: bool = True) -> Tensor:
    """BEATRIX's deviation of each input (the official ``get_deviations_``): the :func:`excess`
    of its Gram features of each order over the clean bounds, :func:`normalised`. ``(N,)`` float64.
    Inputs go ``GRAM_ELEMENTS // C(C+1)/2`` at a time (ResNet-50's 1024 channels: 63)."""
    channels = features.shape[1]
    rows = max(1, GRAM_ELEMENTS // (channels * (channels + 1) // 2))
    total = torch.cat(
        [
            sum(
                excess(gram_features(chunk, p, powered), low, high)
                for p, (low, high) in enumerate(zip(lows, highs, strict=True), 1)
            )
            for chunk in features.split(rows)
        ]
    )
    return normalised(total, channels, len(lows))


def cross_validated_threshold(features: Tensor, orders: int, width: float, powered: bool = True) -> float:
    """The official ``threshold_determine``: in each of 5 folds (consecutive blocks of
    ``len // 5`` inputs; the remainder is never held out), fit the bounds on the other inputs and
    measure the held-out ones' deviations; the threshold is the sorted deviations' entry at
    ``int(0.95 * count)``."""
    size = len(features) // FOLDS
    if size == 0:
        raise ValueError(f"BEATRIX's threshold needs at least {FOLDS} clean inputs of a class, got {len(features)}")
    total = torch.zeros(FOLDS * size, dtype=torch.float64)
    for p in range(1, orders + 1):
        gram = gram_features(features, p, powered)  # once per order, shared by the folds
        for fold in range(FOLDS):
            keep = torch.ones(len(features), dtype=torch.bool, device=gram.device)
            keep[fold * size : (fold + 1) * size] = False
            total[fold * size : (fold + 1) * size] += excess(gram[~keep], *bounds(gram[keep], width))
    ranked = normalised(total, features.shape[1], orders).sort().values
    return float(ranked[int(len(ranked) * PERCENTILE)])


def feature_position(model: nn.Module) -> int:
    """The body index whose input BEATRIX reads by default: the input of the body's last module
    holding a convolution (PreAct-ResNet18's ``layer4``, as the official code hooks)."""
    try:
        return polarizer_position(model)
    except ValueError:
        raise ValueError(
            "BEATRIX needs a convolution in the model's body to read the feature map before; set position"
        ) from None


@INPUT_DETECTORS.register(
    "beatrix",
    "BEATRIX (Ma et al. 2023): Gram matrices of an input's activations outside its predicted class's clean "
    "bounds flag a trigger",
    modality="image",
)
class Beatrix(InputDetector):
    """Read the feature map at the input of body module ``position`` (by default the last stage
    holding a convolution: PreAct-ResNet18's ``layer4``, whose input the official code hooks), and
    its Gram matrices of orders p = 1..``orders`` (8): ``G_p = (F^p F^pT)^(1/p)`` over the channels,
    upper triangle. For each class, the trusted inputs the model predicts as that class give each
    Gram feature a median and a MAD, and bounds ``median -/+ mad_width * MAD`` (10); an input's
    deviation is how far its Gram features fall outside the bounds of its predicted class,
    relative to the bound, averaged over the features and orders. A trigger's activations
    correlate unlike the target class's clean ones. Each class's threshold is the 95th percentile
    of its clean inputs' deviations under 5-fold cross-validation. Source: Ma et al., "The
    'Beatrix' Resurrections: Robust Backdoor Detection via Gram Matrices" (NDSS 2023), official code
    ``wanlunsec/Beatrix`` (``defenses/Beatrix/Beatrix.py``: ``Feature_Correlations`` with mode
    ``mad``, ``get_deviations_``, ``threshold_determine``), as BackdoorBench runs it
    (``detection_pretrain/beatrix.py``); its defaults are the official code's.

    Here, as in the paper, it scores test inputs after calibrating on the trusted split. Reconstructed:
    ``score="margin"`` (deviation minus the class's threshold: noisy with a dozen trusted inputs a
    class, so not the default); a class with under 5 trusted inputs takes the bounds of all of them
    (the codes fail there). More, and measurements: docs/detection.md, "BEATRIX".

    Args:
        orders: Gram orders used, 1 to this.
        mad_width: the bounds' half-width, in MADs.
        position: the body index whose input is read; ``None``: :func:`feature_position`.
        clean_per_class: the most trusted inputs per predicted class used (the official code's
            30); ``None``: all.
        score: ``"deviation"`` or ``"margin"`` (deviation minus the predicted class's threshold).
        powered: raise the features element-wise to ``p`` before the Gram product (the paper;
            ``False``: BackdoorBench's).
        batch_size: inputs run through the model together.
    """

    def __init__(
        self,
        orders: PositiveInt = 8,
        mad_width: PositiveFloat = 10.0,
        position: NonNegativeInt | None = None,
        clean_per_class: PositiveInt | None = None,
        score: Scoring = "deviation",
        powered: bool = True,
        batch_size: PositiveInt = 256,
    ) -> None:
        self.model: nn.Module | None = None

    def fit(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> None:
        """Keep a frozen copy of ``model``; fit each predicted class's bounds and threshold on ``trusted``."""
        require_images(trusted, "BEATRIX", "reads the Gram matrices of image feature maps")
        require_classifier(model, "BEATRIX", min_body=1)
        o = self._options
        self.device = resolve_device(ctx.device)
        self.model = frozen_copy(model).to(self.device)
        position = o["position"] if o["position"] is not None else feature_position(self.model)
        if position > len(self.model.body):
            raise ValueError(
                f"BEATRIX position must be 0 to {len(self.model.body)} (the body's length), got {position}"
            )
        self.position = position
        order = seeded_permutation(len(trusted), ctx.seed)  # the official code shuffles its clean features
        features, predicted = self.all_features(trusted.inputs[order])
        self.classes: dict[int, tuple[list[Tensor], list[Tensor], float]] = {}
        few = []
        for label in range(len(trusted.classes)):
            members = (predicted == label).nonzero()[:, 0][: o["clean_per_class"]]
            if len(members) < FOLDS:
                few.append(label)
                continue
            self.classes[label] = self.calibrate(features[members])
        self.pooled = self.calibrate(features) if few else None
        if few:
            warnings.warn(
                f"BEATRIX: classes {', '.join(map(str, few))} have fewer than {FOLDS} trusted inputs predicted as "
                "them; they take the bounds and threshold of all trusted inputs: raise --trusted-size",
                DefenseWarning,
                stacklevel=2,
            )

    def calibrate(self, features: Tensor) -> tuple[list[Tensor], list[Tensor], float]:
        """``(lows, highs, threshold)`` of clean ``features``."""
        o = self._options
        lows, highs = gram_bounds(features, o["orders"], o["mad_width"], o["powered"])
        return lows, highs, cross_validated_threshold(features, o["orders"], o["mad_width"], o["powered"])

    @torch.no_grad()
    def features(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """The feature map at ``position`` (float32, on the device) and the predicted class of each input."""
        if self.model is None:
            raise RuntimeError("BEATRIX.score before fit: fit it on the suspect model and trusted data first")
        h = self.model.forward_body(self.model.normalize(to_float(inputs.to(self.device))), 0, self.position)
        maps = h.float().clone()  # the next module may work in place
        return maps, self.model.forward_head(self.model.forward_body(h, self.position)).argmax(1)

    def all_features(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`features` of ``inputs``, ``batch_size`` at a time."""
        parts = [self.features(chunk) for chunk in inputs.split(self._options["batch_size"])]
        return torch.cat([maps for maps, _ in parts]), torch.cat([labels for _, labels in parts])

    def score(self, inputs: Tensor) -> Tensor:
        return torch.cat([self.score_batch(chunk) for chunk in inputs.split(self._options["batch_size"])])

    def score_batch(self, inputs: Tensor) -> Tensor:
        """:meth:`score` of one batch."""
        features, predicted = self.features(inputs)
        scores = torch.empty(len(inputs), dtype=torch.float64)
        powered, margin = self._options["powered"], self._options["score"] == "margin"
        for label in predicted.unique().tolist():
            members = (predicted == label).nonzero()[:, 0]
            lows, highs, threshold = self.classes.get(label, self.pooled)
            scores[members.cpu()] = deviations(features[members], lows, highs, powered) - (threshold if margin else 0.0)
        return scores.float()

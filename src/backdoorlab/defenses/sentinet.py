"""SentiNet: is this input triggered? Its salient region, transplanted onto clean images, takes them over."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset, seeded_permutation
from backdoorlab.defenses.base import INPUT_DETECTORS, DefenseContext, InputDetector, require_classifier, require_images
from backdoorlab.defenses.post_training import frozen_copy
from backdoorlab.options import Fraction, PositiveInt
from backdoorlab.training.loop import predict_logits, resolve_device, to_float

#: How a SentiNet score is read off an input's (average confidence, fooled share) point.
Scoring = Literal["boundary", "confidence"]

#: Width of the confidence bins the boundary's points are picked in, and how many per bin (Beatrix).
BIN_WIDTH, PER_BIN = 0.04, 2


def grad_cam(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Grad-CAM (Selvaraju et al. 2017) of float ``inputs`` for the class the model predicts: the
    model's last feature map (``forward_features``) weighted per channel by the spatial mean of the
    predicted logit's gradient, ReLU, resized to the input (bilinear; linear for series) and scaled
    to [0, 1] per input (``(cam - min) / (max + 1e-7)``, as ``pytorch_grad_cam``, which BackdoorBench
    uses). Any :class:`~backdoorlab.models.Classifier` works: the gradient only runs through
    ``forward_head``, so the body runs without autograd. Returns ``(cams, predicted classes)``:
    cams shaped like one input channel, ``(N, H, W)`` (or ``(N, L)``)."""
    with torch.no_grad():
        features = model.forward_features(inputs)
    if features.dim() < 3:
        raise ValueError(
            f"Grad-CAM needs a feature map (N, C, H, W) from forward_features, got {tuple(features.shape)}: "
            "give as_classifier the last unpooled map as features (a ResNet's 'layer4')"
        )
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(features)
        classes = logits.argmax(1)
        (grads,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), features)
    weights = grads.flatten(2).mean(-1)
    cam = torch.einsum("nc,nc...->n...", weights, features.detach()).clamp_(min=0)
    mode = "bilinear" if cam.dim() == 3 else "linear"
    cam = F.interpolate(cam[:, None], size=inputs.shape[2:], mode=mode, align_corners=False)[:, 0]
    flat = cam.flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    flat = flat / (flat.amax(1, keepdim=True) + 1e-7)
    return flat.view_as(cam), classes


def transplant(inputs: Tensor, masks: Tensor, backgrounds: Tensor) -> Tensor:
    """Each input's masked region pasted onto every background: ``(len(inputs), len(backgrounds), C, ...)``
    for ``masks`` ``(N, ...)`` (one per input, shared by its channels) and backgrounds
    ``(P, C, ...)`` or one set per input ``(N, P, C, ...)``."""
    if backgrounds.dim() == inputs.dim():
        backgrounds = backgrounds[None]
    return torch.where(masks[:, None, None], inputs[:, None], backgrounds)


@INPUT_DETECTORS.register(
    "sentinet",
    "SentiNet (Chou et al. 2020): the Grad-CAM region of a triggered input takes over clean images it is pasted on",
    modality="image",
)
class SentiNet(InputDetector):
    """Find the region the model looks at (Grad-CAM at its last feature map, for the predicted
    class, thresholded at ``mask_threshold``), paste it onto ``clean_images`` trusted clean images
    and onto as many images of uniform noise (the inert pattern), and measure two things: the share
    of clean images that then get the input's predicted class ("fooled") and the model's mean top
    softmax probability on the noise images ("average confidence"). A trigger is small and takes over
    any image, so its region fools many clean images and the model is confident even on noise.
    Source: Chou, Tramèr and Pellegrino, "SentiNet: Detecting Localized Universal Attacks Against
    Deep Learning Systems" (IEEE S&P Workshops 2020); BackdoorBench's ``detection_infer/sentinet.py``
    (``clean_sample_num=100``, ``mask_cond=0.85``), itself from ``wanlunsec/Beatrix``'s
    ``defenses/SentiNet``.

    As BackdoorBench, but the clean images come from the trusted split (BackdoorBench: the clean
    test set). ``score``: ``"boundary"`` (default, reconstructed) is the paper's decision boundary,
    a quadratic fitted at :meth:`fit` on trusted clean inputs as Beatrix's ``DecisionBoundary``
    does (Beatrix only plots it), and an input's signed distance above it; ``"confidence"`` is
    BackdoorBench's average confidence alone. Either way the evaluation sets the threshold on
    trusted clean inputs the detector did not fit on. Details: docs/detection.md, "SentiNet".

    Args:
        clean_images: clean images each region is pasted on (``clean_sample_num``), class-balanced.
        mask_threshold: the Grad-CAM value (scaled to [0, 1]) from which a pixel is in the region.
        score: ``"boundary"`` (distance above the clean boundary) or ``"confidence"`` (BackdoorBench's).
        boundary_inputs: trusted inputs the boundary is fitted on (200, Beatrix's ``n_test``).
        batch_size: inputs scored together (each with ``2 * clean_images`` pasted images).
    """

    def __init__(
        self,
        clean_images: PositiveInt = 100,
        mask_threshold: Fraction = 0.85,
        score: Scoring = "boundary",
        boundary_inputs: PositiveInt = 200,
        batch_size: PositiveInt = 16,
    ) -> None:
        if clean_images < 1 or boundary_inputs < 1 or batch_size < 1 or not 0 <= mask_threshold <= 1:
            raise ValueError(
                "SentiNet needs clean_images, boundary_inputs, batch_size >= 1 and 0 <= mask_threshold <= 1"
            )
        if score not in ("boundary", "confidence"):
            raise ValueError(f"SentiNet score must be 'boundary' or 'confidence', got {score!r}")
        self.model: nn.Module | None = None
        self.boundary: np.ndarray | None = None

    def fit(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> None:
        """Keep a frozen copy of ``model``, draw the clean images, and fit the boundary on trusted inputs."""
        require_images(trusted, "SentiNet", "pastes saliency regions of images")
        require_classifier(model, "SentiNet")
        self.device = resolve_device(ctx.device)
        self.model = frozen_copy(model).to(self.device)
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.clean = to_float(trusted.inputs[self.draw_clean(trusted.labels, len(trusted.classes))]).to(self.device)
        if self._options["score"] == "boundary":
            chosen = seeded_permutation(len(trusted), ctx.seed)[: self._options["boundary_inputs"]]
            confidence, fooled = self.measure(trusted.inputs[chosen])
            self.boundary = fit_boundary(confidence.numpy(), fooled.numpy())

    def draw_clean(self, labels: Tensor, classes: int) -> Tensor:
        """Indices of ``clean_images // classes`` (at least 1) inputs of each class present, drawn with replacement."""
        per_class = max(1, self._options["clean_images"] // classes)
        drawn = []
        for label in labels.unique():
            members = (labels == label).nonzero()[:, 0]
            drawn.append(members[torch.randint(len(members), (per_class,), generator=self.generator)])
        return torch.cat(drawn)

    def measure(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Each input's average confidence on noise and fooled share of clean images, on the CPU."""
        if self.model is None:
            raise RuntimeError("SentiNet.score before fit: fit it on the suspect model and trusted data first")
        confidence, fooled = [], []
        for chunk in inputs.split(self._options["batch_size"]):
            x = to_float(chunk.to(self.device))
            cams, predicted = grad_cam(self.model, x)
            masks = cams >= self._options["mask_threshold"]
            pasted = transplant(x, masks, self.clean)
            noise = torch.randint(255, (len(x), *self.clean.shape), generator=self.generator) / 255.0
            inert = transplant(x, masks, noise.to(self.device))
            count = len(self.clean)
            labels = predict_logits(self.model, pasted.flatten(0, 1), device=self.device).argmax(1)
            fooled.append((labels.view(len(x), count) == predicted.cpu()[:, None]).float().mean(1))
            probabilities = predict_logits(self.model, inert.flatten(0, 1), device=self.device).softmax(1)
            confidence.append(probabilities.amax(1).view(len(x), count).mean(1))
        return torch.cat(confidence), torch.cat(fooled)

    def score(self, inputs: Tensor) -> Tensor:
        confidence, fooled = self.measure(inputs)
        if self._options["score"] == "confidence":
            return confidence
        return torch.from_numpy(distance_above(self.boundary, confidence.numpy(), fooled.numpy())).float()


def fit_boundary(confidence: np.ndarray, fooled: np.ndarray) -> np.ndarray:
    """Polynomial coefficients (highest power first) of the quadratic through the ``PER_BIN`` most
    fooled clean points of each ``BIN_WIDTH`` confidence bin; a lower degree where fewer distinct
    confidences are picked (reconstructed: a quadratic needs three)."""
    bins = np.ceil(confidence / BIN_WIDTH).astype(int)
    picked = []
    for b in np.unique(bins):
        members = np.flatnonzero(bins == b)
        picked.extend(members[np.argsort(fooled[members], kind="stable")[-PER_BIN:]])
    x, y = confidence[picked], fooled[picked]
    degree = min(2, len(np.unique(x)) - 1)
    return np.polyfit(x, y, degree) if degree > 0 else np.array([y.max()])


def distance_above(coefficients: np.ndarray, confidence: np.ndarray, fooled: np.ndarray) -> np.ndarray:
    """Euclidean distance of each (confidence, fooled) point to the curve, signed: positive above it.
    The nearest point is searched on the curve over confidences -1..2 in steps of 0.001."""
    grid = np.linspace(-1.0, 2.0, 3001)
    curve = np.polyval(coefficients, grid)
    nearest = np.sqrt(np.min((confidence[:, None] - grid) ** 2 + (fooled[:, None] - curve) ** 2, axis=1))
    return np.where(fooled > np.polyval(coefficients, confidence), nearest, -nearest)

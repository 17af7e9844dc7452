"""STRIP: is this input triggered? A trigger keeps its prediction under superimposition."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import INPUT_DETECTORS, DefenseContext, InputDetector
from backdoorlab.defenses.post_training import frozen_copy
from backdoorlab.options import PositiveFloat, PositiveInt
from backdoorlab.training.loop import predict_logits, to_float


@INPUT_DETECTORS.register(
    "strip", "STRIP (Gao et al. 2019): low prediction entropy under superimposed clean inputs flags a trigger"
)
class STRIP(InputDetector):
    """Superimpose each input with ``overlays`` (100) trusted clean inputs and average the entropy
    of the model's predictions over them: a clean input's prediction scatters, a triggered one
    keeps the target (the trigger survives the blend), so its entropy is low. The score is the
    negated mean entropy (higher means more likely triggered). Source: Gao et al., "STRIP: A
    Defence Against Trojan Attacks on Deep Neural Networks" (ACSAC 2019), official code
    ``garrisongys/STRIP``.

    Superimposition: images are summed in pixel space at weight ``alpha`` (1.0) and saturate at
    white, as the official code's ``cv2.addWeighted(background, 1, overlay, 1, 0)`` on uint8
    images does; series are summed without a bound (reconstructed: the paper has images only). Each batch of
    ``batch_size`` inputs shares one draw of overlays, as BackdoorBench's ``detection_infer/strip.py``
    does (``N=100``, ``strip_alpha=1.0``); BackdoorBench sums normalised tensors without saturation
    and draws its clean pool from the test set; here the pool is the trusted split. The threshold
    (a false-positive rate on clean inputs) is not the detector's: the evaluation sets it on trusted
    clean inputs the detector did not fit on (``evaluation.assess_input_detector``).

    Args:
        overlays: clean inputs superimposed on each input (N).
        alpha: the overlay's weight in the sum.
        batch_size: inputs scored together (each with ``overlays`` blends).
    """

    def __init__(self, overlays: PositiveInt = 100, alpha: PositiveFloat = 1.0, batch_size: PositiveInt = 64) -> None:
        if overlays < 1 or alpha <= 0 or batch_size < 1:
            raise ValueError("STRIP needs overlays >= 1, batch_size >= 1 and alpha > 0")
        self.model: nn.Module | None = None

    def fit(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> None:
        """Keep a frozen copy of ``model`` and the trusted inputs as the overlay pool."""
        self.model, self.device = frozen_copy(model), ctx.device
        self.pool, self.images = to_float(trusted.inputs), trusted.modality == "image"
        self.generator = torch.Generator().manual_seed(ctx.seed)

    def superimpose(self, inputs: Tensor, overlays: Tensor) -> Tensor:
        """Every input blended with every overlay: ``(len(overlays) * len(inputs), ...)``, overlay-major."""
        blended = inputs[None] + self._options["alpha"] * overlays[:, None]
        blended = blended.flatten(0, 1)
        return blended.clamp_(max=1.0) if self.images else blended

    def score(self, inputs: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError("STRIP.score before fit: fit it on the suspect model and trusted data first")
        o = self._options
        scores = []
        for chunk in to_float(inputs).split(o["batch_size"]):
            index = torch.randint(len(self.pool), (o["overlays"],), generator=self.generator)
            logits = predict_logits(self.model, self.superimpose(chunk, self.pool[index]), device=self.device)
            log_p = logits.log_softmax(1)
            entropy = -(log_p.exp() * log_p).sum(1).view(o["overlays"], len(chunk))
            scores.append(-entropy.mean(0))
        return torch.cat(scores)

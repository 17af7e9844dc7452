"""TeCo: is this input triggered? A trigger's robustness to corruptions is inconsistent across them."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from backdoorlab.data.corruptions import COMMON_CORRUPTIONS, SEVERITIES, Corruption, corrupt
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import INPUT_DETECTORS, DefenseContext, InputDetector, require_images
from backdoorlab.defenses.post_training import frozen_copy
from backdoorlab.options import PositiveInt, Range
from backdoorlab.training.loop import predict


@INPUT_DETECTORS.register(
    "teco",
    "TeCo (Liu et al. 2023): the spread, over image corruptions, of the severity that first changes "
    "the prediction flags a trigger",
    modality="image",
)
class TeCo(InputDetector):
    """Corrupt each input by each of the 15 ImageNet-C corruptions at severities 1 to 5 and note,
    per corruption, the first severity at which the model's hard label leaves the label of the
    uncorrupted input (``severities + 1`` where it never does). A clean input's robustness is
    about the same under every corruption; a trigger survives some corruptions (noise) to the
    last severity and is broken by others (blur) at the first, so the score, the standard
    deviation (population, ``np.std``) of those first-flip severities over the corruptions, is
    high. Source: Liu et al., "Detecting Backdoors During the Inference Stage Based on Corruption
    Robustness Consistency" (CVPR 2023), official code ``CGCL-codes/TeCo``, as BackdoorBench runs
    it (``detection_infer/teco.py``, ``config/detection/teco/cifar10.yaml``): the 15 corruptions
    in its order, severities 1-5, ``max=6`` for a corruption that never flips, hard labels only.

    The corruptions (:mod:`backdoorlab.data.corruptions`) are the ``imagecorruptions`` package's,
    rewritten in torch for batches and any image size (the package refuses images under 32x32);
    all are reproduced but frost, whose photos are replaced by a texture of their measured
    statistics. Both official scripts corrupt their image lists in place, so each corruption
    and severity there is applied on top of all the earlier ones (from ``gaussian_noise`` 1 to
    ``jpeg_compression`` 5); the paper corrupts the original image each time. ``compound=True``
    reproduces the scripts; the default follows the paper. TeCo fits nothing: the threshold (a
    false-positive rate on clean inputs) is set by the evaluation on trusted clean inputs
    (``evaluation.assess_input_detector``). Labels are the model's plain predictions, without
    test-time augmentation. How BackdoorBench reports it, and the measurements: docs/detection.md.

    Args:
        corruptions: the corruptions applied, in order (ImageNet-C's 15 common ones).
        severities: severities tried, 1 to this (the package has 5).
        compound: apply each corruption on top of the previous ones, as the official scripts do.
        batch_size: inputs corrupted together (each gives ``severities`` images per corruption).
    """

    def __init__(
        self,
        corruptions: tuple[Corruption, ...] = COMMON_CORRUPTIONS,
        severities: Annotated[int, Range(1, SEVERITIES)] = SEVERITIES,
        compound: bool = False,
        batch_size: PositiveInt = 256,
    ) -> None:
        unknown = sorted(set(corruptions) - set(COMMON_CORRUPTIONS))
        if unknown or not corruptions:
            raise ValueError(
                f"TeCo corruptions must be a non-empty list of {', '.join(COMMON_CORRUPTIONS)}; got {list(corruptions)}"
            )
        if not 1 <= severities <= SEVERITIES or batch_size < 1:
            raise ValueError(f"TeCo needs severities in 1-{SEVERITIES} and batch_size >= 1")
        self.model: nn.Module | None = None

    def fit(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> None:
        """Keep a frozen copy of ``model``; TeCo learns nothing from the trusted inputs."""
        require_images(trusted, "TeCo", "corrupts images")
        self.model, self.device = frozen_copy(model), ctx.device
        self.generator = torch.Generator().manual_seed(ctx.seed)

    def first_flips(self, inputs: Tensor) -> Tensor:
        """``(N, corruptions)``: per input and corruption, the first severity whose prediction
        differs from the uncorrupted input's, ``severities + 1`` where none does."""
        if self.model is None:
            raise RuntimeError("TeCo.score before fit: fit it on the suspect model and trusted data first")
        if inputs.dim() != 4:
            raise ValueError(f"TeCo scores images (N, C, H, W), got shape {tuple(inputs.shape)}")
        o = self._options
        flips = []
        for chunk in inputs.split(o["batch_size"]):
            original = predict(self.model, chunk, device=self.device)
            state, rows = chunk, []
            for name in o["corruptions"]:
                corrupted = []
                for severity in range(1, o["severities"] + 1):
                    image = corrupt(state if o["compound"] else chunk, name, severity, self.generator)
                    state = image if o["compound"] else state
                    corrupted.append(image)
                labels = predict(self.model, torch.cat(corrupted), device=self.device).view(len(corrupted), len(chunk))
                rows.append(first_change(labels, original))
            flips.append(torch.stack(rows, 1))
        return torch.cat(flips)

    def score(self, inputs: Tensor) -> Tensor:
        return deviation(self.first_flips(inputs))


def first_change(labels: Tensor, original: Tensor) -> Tensor:
    """``labels (severities, N)`` against ``original (N,)``: the first severity (1-based) whose
    label differs, ``severities + 1`` where none does."""
    changed = labels != original[None]
    first = changed.int().argmax(0) + 1  # argmax: the first True
    return torch.where(changed.any(0), first, torch.full_like(first, len(labels) + 1))


def deviation(first_flips: Tensor) -> Tensor:
    """TeCo's score: the population standard deviation (``np.std``) of each row's first-flip
    severities, as float32."""
    return first_flips.double().std(1, correction=0).float()

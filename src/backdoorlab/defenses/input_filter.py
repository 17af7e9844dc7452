"""An input detector as a training-set filter: BackdoorBench's ``detection_pretrain/strip.py``,
``beatrix.py`` and ``cd.py`` run its inference-time detectors over the poisoned training set."""

from __future__ import annotations

from torch import nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import (
    INPUT_CALIBRATION_SHARE,
    INPUT_DETECTORS,
    INPUT_FPR,
    SAMPLE_FILTERS,
    DefenseContext,
    Filtering,
    SampleFilter,
)
from backdoorlab.defenses.post_training import holdout_split
from backdoorlab.defenses.sample_filtering import require_trusted
from backdoorlab.options import OpenFraction


@SAMPLE_FILTERS.register(
    "input_detector",
    "An input detector (STRIP by default; BEATRIX, Cognitive Distillation...) scoring every training "
    "sample, flagged above a threshold set on trusted data at 5% false positives",
)
class InputDetectorFilter(SampleFilter):
    """Fit the input detector ``detector`` (any of ``backdoorlab list input-detectors``, at its
    defaults) on the victim and part of the trusted split, set the threshold so that a share
    ``fpr`` of the rest of the trusted split scores above it, and flag every training sample that
    scores above it; the score is the detector's.

    As BackdoorBench's pre-training detection with STRIP, BEATRIX and Cognitive Distillation
    (``detection_pretrain/strip.py``: ``defense_fpr`` 0.05 on clean samples, the training set's
    samples beyond the threshold flagged). Difference, stated: BackdoorBench draws its clean samples
    from the test set and fits and calibrates on the same ones; here they are the trusted split,
    fitted on and calibrated on disjoint halves (``calibration_share`` 0.5), as the run's input
    detectors (``defenses.base.INPUT_CALIBRATION_SHARE``); the threshold is
    :meth:`InputDetector.threshold`, as the run's.

    Args:
        detector: the input detector's name.
        fpr: the share of held-out trusted samples flagged, which sets the threshold.
        calibration_share: the share of the trusted split the threshold is set on (the detector
            fits on the rest).
    """

    uses_trusted = True

    def __init__(
        self,
        detector: str = "strip",
        fpr: OpenFraction = INPUT_FPR,
        calibration_share: OpenFraction = INPUT_CALIBRATION_SHARE,
    ) -> None:
        super().__init__()
        INPUT_DETECTORS.get(detector)  # an unknown name is refused with the valid ones

    def filter(
        self, model: nn.Module, data: TensorDataset, ctx: DefenseContext, trusted: TensorDataset | None = None
    ) -> Filtering:
        o = self._options
        trusted = require_trusted(trusted, f"the input-detector filter ({o['detector']})")
        fit_on, calibration = holdout_split(trusted, o["calibration_share"], ctx.seed)
        detector = INPUT_DETECTORS.create(o["detector"])
        detector.fit(model, fit_on, ctx)
        threshold = detector.threshold(calibration, o["fpr"])
        scores = detector.score(data.inputs).float()
        details = {"threshold": threshold, "calibration_size": len(calibration)}
        return Filtering(scores, scores > threshold, details)

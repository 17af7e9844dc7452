"""The five kinds of defense, and the context every defense hook gets.

- A **training-time defense** (:class:`TrainingDefense`, registry ``TRAINING_DEFENSES``) gets the untrusted
  (possibly poisoned) training set and a factory for fresh models of the run's architecture (``run``
  passes an ``experiments.run.ModelSpec``: the model's name, options and the data's shape facts,
  nothing else). It returns a trained model and, where it isolates samples, its own verdict as a
  mask over the training set; how good that verdict is (isolation precision and recall) is measured
  by the evaluation, which alone holds the truth.
- A **repair** (:class:`Repair`, ``REPAIRS``) gets a trained (suspect) model and the trusted clean
  split (by default 1% of the training set, carved off before poisoning) and returns a repaired model;
  a repair whose ``reads`` is ``"training"`` (EP) gets the training set, without its mask, instead.
- A **detector** (:class:`Detector`, ``DETECTORS``) gets the same and returns a score: higher means
  more likely backdoored.
- A **sample filter** (:class:`SampleFilter`, ``SAMPLE_FILTERS``; data filtering) gets the untrusted
  training set and a model trained on it (and the trusted split, where it says it uses one), and
  returns a suspicion score per training sample and the samples it flags; the run retrains a fresh
  model on the rest. How good the verdict is (precision, recall, AUROC against the poison mask) is
  measured by the evaluation.
- An **input detector** (:class:`InputDetector`, ``INPUT_DETECTORS``) gets the same to calibrate
  on, then scores the inputs it is shown at inference: higher means more likely triggered. It is
  never told which inputs carry the trigger; its threshold is set on trusted clean data only.

None of them gets the poison mask, the trigger, the target class or the test set (DESIGN.md). Each
hook takes its kind's own data and one :class:`DefenseContext`: the run's recipe, device and seed,
and for a repair the evaluation's ``observer``. Where a repair is watched while it works
(fine-tuning's persistence curve), it calls the observer with the model at each checkpoint; the
observer only copies the model's weights (``experiments.run.CheckpointSnapshots``) and returns
nothing, and the evaluation measures the copies after the repair has returned, so no measurement
exists while the repair runs.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.options import Configurable
from backdoorlab.registry import Registry
from backdoorlab.training.loop import TrainConfig

#: Training-time defenses by name: ``cls(**options)``.
TRAINING_DEFENSES: Registry[type[TrainingDefense]] = Registry("defense")
#: Repair defenses by name: ``cls(**options)``.
REPAIRS: Registry[type[Repair]] = Registry("repair defense")
#: Detectors by name: ``cls(**options)``.
DETECTORS: Registry[type[Detector]] = Registry("detector")
#: Sample filters (poisoned-sample detection) by name: ``cls(**options)``.
SAMPLE_FILTERS: Registry[type[SampleFilter]] = Registry("sample filter")
#: Input detectors by name: ``cls(**options)``.
INPUT_DETECTORS: Registry[type[InputDetector]] = Registry("input detector")

ModelFactory = Callable[[], nn.Module]

#: ``observer(model, checkpoint) -> None``: called by a repair at its checkpoints (0 = before
#: repairing); it keeps a copy of the model's weights and nothing the repair could read back.
Observer = Callable[[nn.Module, int], None]


#: The false-positive rate an input detector's threshold is set to, on trusted clean inputs.
INPUT_FPR = 0.05
#: The share of the trusted split an input detector's threshold is set on (it fits on the rest).
INPUT_CALIBRATION_SHARE = 0.5


class DefenseWarning(UserWarning):
    """A defense ran but could not act: it returns the model as undefended training (or the suspect
    model, for a repair) would. Shown once per place in the code; turn it into an error with
    ``warnings.simplefilter("error", DefenseWarning)``."""


@dataclass(frozen=True)
class DefenseContext:
    """What every defense hook gets besides its data: the run's training ``recipe`` (a defense that
    trains uses its augmentation and device settings), the ``device``, the ``seed``, and, for a
    repair the evaluation watches, its ``observer``."""

    recipe: TrainConfig
    device: torch.device
    seed: int
    observer: Observer | None = None

    def observe(self, model: nn.Module, checkpoint: int) -> None:
        """Hand ``model`` at ``checkpoint`` to the observer, where there is one."""
        if self.observer is not None:
            self.observer(model, checkpoint)


@dataclass
class DefenseOutcome:
    """What a training-time defense or a repair returns: the model to deploy, the samples it
    isolated (a boolean mask over the training set it got, or ``None``), and method-specific
    details (stored with the result)."""

    model: nn.Module
    isolated: Tensor | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Detection:
    """A detector's verdict: ``score`` (higher = more likely backdoored), whether it crosses the
    method's own threshold (``None`` when the method has none), and details (per-class scores...)."""

    score: float
    flagged: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Filtering:
    """A sample filter's verdict over the training set it got: ``scores`` (one float per sample,
    higher = more likely poisoned), ``flagged`` (a boolean mask: the samples it removes) and
    method-specific details; ``details["warnings"]`` (sentences), where given, become the run's
    warnings."""

    scores: Tensor
    flagged: Tensor
    details: dict[str, Any] = field(default_factory=dict)


def require_classifier(model: nn.Module, method: str, *, min_body: int = 0) -> None:
    """Refuse, with what to do instead, a model that is not a backdoorlab ``Classifier`` (for a
    method that reads features: ``forward_features``, ``forward_head``, ``body``), or whose body is
    not an ``nn.Sequential`` of at least ``min_body`` modules (for one that cuts the body)."""
    body = getattr(model, "body", None)
    needed = ("forward_features", "forward_head", "normalize", "body")
    if all(hasattr(model, name) for name in needed) and (
        min_body == 0 or (isinstance(body, nn.Sequential) and len(body) >= min_body)
    ):
        return
    shape = f" whose body is an nn.Sequential of at least {min_body} modules" if min_body > 1 else ""
    shape = " whose body is an nn.Sequential" if min_body == 1 else shape
    raise TypeError(
        f"{method} reads the model's features: it needs a backdoorlab Classifier{shape} "
        f"(normalisation, body, pooled linear head), got {type(model).__name__}; wrap your network with "
        "as_classifier(module, features=..., head=..., blocks=[...]) or build Classifier(body, num_features, "
        "num_classes, mean, std) (docs/library.md)"
    )


class _Method(Configurable, ABC):
    """What every defense shares: its constructor's options, recorded by :class:`Configurable`."""


class TrainingDefense(_Method):
    """Base class of training-time defenses."""

    @abstractmethod
    def train(self, data: TensorDataset, build_model: ModelFactory, ctx: DefenseContext) -> DefenseOutcome:
        """Train a model built by ``build_model`` on ``data`` (untrusted) defensively."""


class SampleFilter(_Method):
    """Base class of poisoned-sample filters (data filtering)."""

    #: Whether :meth:`filter` takes the trusted clean split as a keyword ``trusted`` (``run`` passes
    #: it to such a filter only; ASSET offsets its losses against it).
    uses_trusted: ClassVar[bool] = False

    @abstractmethod
    def filter(self, model: nn.Module, data: TensorDataset, ctx: DefenseContext) -> Filtering:
        """Score every sample of ``data`` (untrusted, as the victim trained on it) with ``model``
        (trained on it, left unchanged) and flag the ones to remove. A filter that
        :attr:`uses_trusted` adds a keyword ``trusted: TensorDataset | None = None``."""


class _PostTraining(_Method):
    """What repairs and detectors share: a check of the trusted split before any training."""

    def check_trusted(self, trusted: TensorDataset) -> None:
        """Refuse, before any training, a trusted split too small for this method (a
        ``ValueError`` that says how small it is); the default asks for two samples."""
        if len(trusted) < 2:
            raise ValueError(
                f"{type(self).__name__} needs a trusted split of at least 2 samples, got {len(trusted)}: "
                "raise --trusted-size"
            )


class Repair(_PostTraining):
    """Base class of post-training repairs."""

    #: What the checkpoints passed to an ``observer`` count: epochs of clean fine-tuning here.
    checkpoint_unit: ClassVar[str] = "epoch"
    #: The data :meth:`repair` gets: ``"trusted"``, the trusted clean split (every repair but one),
    #: or ``"training"``, the training set the suspect model was trained on, poisoned or not and
    #: without its poison mask (EP, which reads the training data's pre-activations, as its paper
    #: assumes the defender holds them).
    reads: ClassVar[Literal["trusted", "training"]] = "trusted"

    @abstractmethod
    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        """Return a repaired model (``model`` itself is left unchanged)."""


class Detector(_PostTraining):
    """Base class of backdoor detectors."""

    @abstractmethod
    def detect(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> Detection:
        """Score ``model`` (left unchanged)."""

    def detect_repaired(
        self, model: nn.Module, repair: Repair, outcome: DefenseOutcome, trusted: TensorDataset, ctx: DefenseContext
    ) -> Detection:
        """Score the suspect ``model`` in a run that also repaired it (``repair`` gave ``outcome``
        from the same trusted split and context): a detector that calibrates with a repair (CTI)
        uses this one where it is the repair it would run itself; the others ignore it."""
        return self.detect(model, trusted, ctx)


class InputDetector(_PostTraining):
    """Base class of input detectors: :meth:`fit` once on the suspect model and trusted clean data,
    then :meth:`score` any inputs (uint8 images or float series, as the dataset stores them)."""

    @abstractmethod
    def fit(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> None:
        """Calibrate on ``model`` (left unchanged) and the trusted clean split."""

    @abstractmethod
    def score(self, inputs: Tensor) -> Tensor:
        """One float score per input (on the CPU): higher means more likely triggered."""

    def threshold(self, calibration: TensorDataset, fpr: float = INPUT_FPR) -> float:
        """The score above which an input is flagged, set so that a share ``fpr`` of
        ``calibration`` (trusted clean inputs it did not fit on) scores above it. A threshold set on
        fewer than ``2 / fpr`` inputs is warned about (``DefenseWarning``)."""
        if len(calibration) < 2 / fpr:
            warnings.warn(
                f"the input detector's threshold is set on {len(calibration)} trusted clean inputs: a {fpr:.0%} "
                f"false-positive rate needs at least {math.ceil(2 / fpr)} to be more than a guess; raise --trusted-size",
                DefenseWarning,
                stacklevel=3,
            )
        return float(torch.quantile(self.score(calibration.inputs).double(), 1.0 - fpr))


#: The name repairs had before the three kinds moved here.
RepairDefense = Repair


def create_defense(name: str, **options: Any) -> TrainingDefense:
    """Build a registered training-time defense; unknown options are refused with the valid ones listed."""
    return TRAINING_DEFENSES.create(name, **options)


def create_sample_filter(name: str, **options: Any) -> SampleFilter:
    """Build a registered sample filter; unknown options are refused with the valid ones listed."""
    return SAMPLE_FILTERS.create(name, **options)


def create_input_detector(name: str, **options: Any) -> InputDetector:
    """Build a registered input detector; unknown options are refused with the valid ones listed."""
    return INPUT_DETECTORS.create(name, **options)


def create_repair(name: str, **options: Any) -> Repair:
    """Build a registered repair; unknown options are refused with the valid ones listed."""
    return REPAIRS.create(name, **options)


def create_detector(name: str, **options: Any) -> Detector:
    """Build a registered detector; unknown options are refused with the valid ones listed."""
    return DETECTORS.create(name, **options)


def lowest(scores: Tensor, ratio: float) -> Tensor:
    """Boolean mask of the ``ratio`` share (at least one) of samples with the lowest scores."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"an isolation ratio must be in (0, 1), got {ratio}")
    count = max(1, round(ratio * len(scores)))
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[scores.argsort()[:count]] = True
    return mask


def require_images(data: TensorDataset, method: str, why: str = "inverts triggers in pixel space") -> None:
    """Refuse series for a method that works in pixel space; ``why`` says what it does to images
    (e.g. "rotates and translates images to split the data")."""
    if data.modality != "image":
        raise ValueError(f"{method} {why}: it takes images, not {data.modality} data")

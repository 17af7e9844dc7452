"""Defenses, of five kinds (their interfaces: :mod:`backdoorlab.defenses.base`).

- Training-time defenses (ABL, E2ABL, PT, D-BR, D-ST, NAB, DBD) get only the untrusted training
  set and a model factory, and return a model plus the samples they isolated (``TrainingDefense``,
  ``TRAINING_DEFENSES``).
- Repair defenses (fine-tuning, Fine-Pruning, NAD, Neural Cleanse, Pivotal Tuning, FT-SAM, CLP, BNP,
  ANP, I-BAU, RNP,
  SAU, NPD, MCR) get a suspect
  model and the trusted clean split and return a repaired model (``Repair``, ``REPAIRS``).
- Detectors (Neural Cleanse, Calibrated Trigger Inversion) get the same and return a score
  (``Detector``, ``DETECTORS``).
- Sample filters (Activation Clustering, Spectral Signatures, SPECTRE, ASSET) get the untrusted training set and a
  model trained on it, and flag the samples they suspect; the run retrains on the rest
  (``SampleFilter``, ``SAMPLE_FILTERS``).
- Input detectors (STRIP, SentiNet, TeCo, BEATRIX, Cognitive Distillation) calibrate on the same,
  then score inputs at inference: is this input triggered? (``InputDetector``, ``INPUT_DETECTORS``).

Each hook also gets a :class:`DefenseContext`: the run's recipe, device, seed and observer.
"""

from typing import Any, Literal

from backdoorlab.defenses import (  # noqa: F401  (registers the defenses)
    abl,
    activation_clustering,
    anp,
    asset,
    beatrix,
    channel_pruning,
    cognitive_distillation,
    cti,
    dbd,
    dbr_dst,
    e2abl,
    fine_pruning,
    fine_tuning,
    ft_sam,
    i_bau,
    input_filter,
    mcr,
    nab,
    nad,
    neural_cleanse,
    npd,
    partial_training,
    pivotal_tuning,
    rnp,
    sau,
    scan,
    sentinet,
    spectral_signatures,
    spectre,
    strip,
    teco,
)
from backdoorlab.defenses.base import (
    DETECTORS,
    INPUT_DETECTORS,
    REPAIRS,
    SAMPLE_FILTERS,
    TRAINING_DEFENSES,
    DefenseContext,
    DefenseOutcome,
    DefenseWarning,
    Detection,
    Detector,
    Filtering,
    InputDetector,
    ModelFactory,
    Observer,
    Repair,
    RepairDefense,
    SampleFilter,
    TrainingDefense,
    create_defense,
    create_detector,
    create_input_detector,
    create_repair,
    create_sample_filter,
    lowest,
)
from backdoorlab.registry import Registry, UnknownNameError


def defense_kind(name: str) -> Literal["training", "repair", "filter"]:
    """Whether ``name`` is a training-time defense, a repair or a sample filter; an unknown name
    lists all three kinds."""
    if name in TRAINING_DEFENSES:
        return "training"
    if name in REPAIRS:
        return "repair"
    if name in SAMPLE_FILTERS:
        return "filter"
    raise UnknownNameError(
        f"unknown defense '{name}'; training-time defenses: {', '.join(TRAINING_DEFENSES.names())}; "
        f"repair defenses: {', '.join(REPAIRS.names())}; sample filters: {', '.join(SAMPLE_FILTERS.names())}"
    )


def registry_for(name: str) -> Registry[Any]:
    """The registry (``TRAINING_DEFENSES``, ``REPAIRS`` or ``SAMPLE_FILTERS``) that holds defense ``name``."""
    return {"training": TRAINING_DEFENSES, "repair": REPAIRS, "filter": SAMPLE_FILTERS}[defense_kind(name)]


__all__ = [
    "TRAINING_DEFENSES",
    "DETECTORS",
    "INPUT_DETECTORS",
    "REPAIRS",
    "SAMPLE_FILTERS",
    "DefenseContext",
    "DefenseOutcome",
    "DefenseWarning",
    "Detection",
    "Detector",
    "Filtering",
    "InputDetector",
    "ModelFactory",
    "Observer",
    "Repair",
    "RepairDefense",
    "SampleFilter",
    "TrainingDefense",
    "create_defense",
    "create_detector",
    "create_input_detector",
    "create_repair",
    "create_sample_filter",
    "defense_kind",
    "lowest",
    "registry_for",
]

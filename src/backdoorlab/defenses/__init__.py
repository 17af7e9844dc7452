"""Defenses, of four kinds (their interfaces: :mod:`backdoorlab.defenses.base`).

- Training-time defenses (ABL, E2ABL, PT) get only the untrusted training set and a model factory,
  and return a model plus the samples they isolated (``TrainingDefense``, ``TRAINING_DEFENSES``).
- Repair defenses (fine-tuning, Fine-Pruning, NAD, Neural Cleanse, Pivotal Tuning) get a suspect
  model and the trusted clean split and return a repaired model (``Repair``, ``REPAIRS``).
- Detectors (Neural Cleanse, Calibrated Trigger Inversion) get the same and return a score
  (``Detector``, ``DETECTORS``).
- Input detectors (STRIP) calibrate on the same, then score inputs at inference: is this input
  triggered? (``InputDetector``, ``INPUT_DETECTORS``).

Each hook also gets a :class:`DefenseContext`: the run's recipe, device, seed and observer.
"""

from typing import Any, Literal

from backdoorlab.defenses import (  # noqa: F401  (registers the defenses)
    abl,
    cti,
    e2abl,
    fine_pruning,
    fine_tuning,
    nad,
    neural_cleanse,
    partial_training,
    pivotal_tuning,
    strip,
)
from backdoorlab.defenses.base import (
    DETECTORS,
    INPUT_DETECTORS,
    REPAIRS,
    TRAINING_DEFENSES,
    DefenseContext,
    DefenseOutcome,
    DefenseWarning,
    Detection,
    Detector,
    InputDetector,
    ModelFactory,
    Observer,
    Repair,
    RepairDefense,
    TrainingDefense,
    create_defense,
    create_detector,
    create_input_detector,
    create_repair,
    lowest,
)
from backdoorlab.registry import Registry, UnknownNameError


def defense_kind(name: str) -> Literal["training", "repair"]:
    """Whether ``name`` is a training-time or a repair defense; an unknown name lists both kinds."""
    if name in TRAINING_DEFENSES:
        return "training"
    if name in REPAIRS:
        return "repair"
    raise UnknownNameError(
        f"unknown defense '{name}'; training-time defenses: {', '.join(TRAINING_DEFENSES.names())}; "
        f"repair defenses: {', '.join(REPAIRS.names())}"
    )


def registry_for(name: str) -> Registry[Any]:
    """The registry (``TRAINING_DEFENSES`` or ``REPAIRS``) that holds defense ``name``."""
    return TRAINING_DEFENSES if defense_kind(name) == "training" else REPAIRS


__all__ = [
    "TRAINING_DEFENSES",
    "DETECTORS",
    "INPUT_DETECTORS",
    "REPAIRS",
    "DefenseContext",
    "DefenseOutcome",
    "DefenseWarning",
    "Detection",
    "Detector",
    "InputDetector",
    "ModelFactory",
    "Observer",
    "Repair",
    "RepairDefense",
    "TrainingDefense",
    "create_defense",
    "create_detector",
    "create_input_detector",
    "create_repair",
    "defense_kind",
    "lowest",
    "registry_for",
]

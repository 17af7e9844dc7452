"""Defenses.

- Training-time defenses (ABL, E2ABL, PT) get only the untrusted training set, a model factory and
  the recipe, and return a model plus the samples they isolated (``DEFENSES``).
- Repair defenses (fine-tuning, Fine-Pruning, NAD, Neural Cleanse, Pivotal Tuning) get a suspect
  model and the trusted clean split and return a repaired model (``REPAIRS``).
- Detectors (Neural Cleanse, Calibrated Trigger Inversion) get the same and return a score
  (``DETECTORS``).
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
    pivotal_tuning,
    pt,
)
from backdoorlab.defenses.base import (
    DEFENSES,
    DefenseOutcome,
    DefenseWarning,
    ModelFactory,
    TrainingDefense,
    create_defense,
    lowest,
)
from backdoorlab.defenses.post_training import (
    DETECTORS,
    REPAIRS,
    Detection,
    Detector,
    Observer,
    RepairDefense,
    create_detector,
    create_repair,
)
from backdoorlab.registry import Registry, UnknownNameError


def defense_kind(name: str) -> Literal["training", "repair"]:
    """Whether ``name`` is a training-time or a repair defense; an unknown name lists both kinds."""
    if name in DEFENSES:
        return "training"
    if name in REPAIRS:
        return "repair"
    raise UnknownNameError(
        f"unknown defense '{name}'; training-time defenses: {', '.join(DEFENSES.names())}; "
        f"repair defenses: {', '.join(REPAIRS.names())}"
    )


def registry_for(name: str) -> Registry[Any]:
    """The registry (``DEFENSES`` or ``REPAIRS``) that holds defense ``name``."""
    return DEFENSES if defense_kind(name) == "training" else REPAIRS


__all__ = [
    "DEFENSES",
    "DETECTORS",
    "REPAIRS",
    "DefenseOutcome",
    "DefenseWarning",
    "Detection",
    "Detector",
    "ModelFactory",
    "Observer",
    "RepairDefense",
    "TrainingDefense",
    "create_defense",
    "create_detector",
    "create_repair",
    "defense_kind",
    "lowest",
    "registry_for",
]

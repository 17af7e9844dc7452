"""Defenses. Training-time defenses (ABL, ...) get only the untrusted training set, a model factory
and the recipe, and return a model plus the samples they isolated."""

from backdoorlab.defenses import abl, e2abl, pt  # noqa: F401  (registers the defenses)
from backdoorlab.defenses.base import (
    DEFENSES,
    DefenseOutcome,
    ModelFactory,
    TrainingDefense,
    create_defense,
    lowest,
)

__all__ = ["DEFENSES", "DefenseOutcome", "ModelFactory", "TrainingDefense", "create_defense", "lowest"]

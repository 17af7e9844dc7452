"""Attacks: triggers (pure tensor functions) and poisoning strategies."""

from backdoorlab.attacks import (  # noqa: F401  (registers the attacks)
    adaptive,
    blind,
    bpp,
    ctrl,
    ftrojan,
    input_aware,
    lira,
    low_frequency,
    optimized,
    poison_ink,
    refool,
    series,
    sig,
    ssba,
    structured,
    wanet,
)
from backdoorlab.attacks.poisoning import (
    MODES,
    PoisonedDataset,
    PoisonSpec,
    TriggeredTestSet,
    poison_dataset,
    triggered_test_set,
)
from backdoorlab.attacks.triggers import ATTACKS, BadNets, Blended, Trigger, attacks_for, create_trigger

__all__ = [
    "ATTACKS",
    "MODES",
    "BadNets",
    "Blended",
    "PoisonSpec",
    "PoisonedDataset",
    "Trigger",
    "attacks_for",
    "TriggeredTestSet",
    "create_trigger",
    "poison_dataset",
    "triggered_test_set",
]

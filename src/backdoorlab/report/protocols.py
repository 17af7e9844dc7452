"""Choosing a repair's setting and checkpoint over a grid, under two reporting protocols.

A repair measured at checkpoints (Pivotal Tuning: every ``eval_every`` steps, on the held-out share
of its trusted split, ``details["held_out_curve"]``; the evaluation's test CA and ASR at the same
checkpoints, ``details["persistence"]``) and run at several settings can be reported two ways:

- :func:`clean_only_choice` (reconstructed): among the checkpoints whose held-out accuracy is
  within the tolerance of the suspect's, the one that moved the weights farthest from the
  suspect's (``parameter_distance``): tune as far as the clean data allows. Only trusted data
  enters the choice, so it is what a defender can do.
- :func:`reference_choice`: the rule of the "Pick your Poison" reference tooling (its grid-evaluate
  observers): the lowest test ASR among checkpoints within ``delta`` (3 points) of the best test
  CA. It chooses on the labelled test set, with the trigger: a way to set numbers beside the
  paper's, never a default.

``scripts/pivotal_protocols.py`` tabulates both for ``examples/pivotal_protocols.yaml``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: One checkpoint of one repair: the setting (its options), the step, the held-out and test points.
Checkpoint = dict[str, Any]


def checkpoints(result: Mapping[str, Any]) -> list[Checkpoint]:
    """Every measured checkpoint after step 0 of a stored repair result (``result.json``), with its
    held-out point and the evaluation's test point."""
    details = result["details"]
    test = {point["checkpoint"]: point for point in details["persistence"]}
    options = result["config"].get("defense_options") or {}
    return [
        {"options": options, "step": point["step"], "held_out": point, "test": test[point["step"]]}
        for point in details["held_out_curve"]
        if point["step"] > 0
    ]


def clean_only_choice(points: Iterable[Checkpoint], start_accuracy: float, tolerance: float) -> Checkpoint | None:
    """The farthest-moved checkpoint whose held-out accuracy is within ``tolerance`` of
    ``start_accuracy`` (the suspect's); ``None`` when none is."""
    admissible = [p for p in points if p["held_out"]["accuracy"] >= start_accuracy - tolerance - 1e-9]
    return max(admissible, key=lambda p: p["held_out"]["parameter_distance"], default=None)


def reference_choice(points: Iterable[Checkpoint], delta: float = 0.03) -> Checkpoint:
    """The lowest test ASR among the checkpoints within ``delta`` of the best test CA (ties: the
    higher CA). Reads the test set and the trigger: for comparison with the reference, never a default."""
    points = list(points)
    if not points:
        raise ValueError("the reference rule needs at least one checkpoint")
    best = max(p["test"]["clean_accuracy"] for p in points)
    near = [p for p in points if p["test"]["clean_accuracy"] >= best - delta - 1e-9]
    return min(near, key=lambda p: (p["test"]["attack_success_rate"], -p["test"]["clean_accuracy"]))

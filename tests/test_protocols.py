"""The two reporting protocols of a repair over a grid (``backdoorlab.report.protocols``)."""

from __future__ import annotations

import pytest

from backdoorlab.report.protocols import checkpoints, clean_only_choice, reference_choice


def point(step: int, held_out: float, distance: float, ca: float, asr: float, lr: float = 0.01) -> dict:
    return {
        "options": {"lr": lr},
        "step": step,
        "held_out": {"step": step, "accuracy": held_out, "parameter_distance": distance},
        "test": {"checkpoint": step, "clean_accuracy": ca, "attack_success_rate": asr},
    }


def test_clean_only_takes_the_farthest_checkpoint_within_the_held_out_tolerance_and_never_reads_the_test_set():
    near, far, too_far = (
        point(50, 0.99, 1e-6, 0.98, 0.6),
        point(100, 0.98, 5e-6, 0.97, 0.3),
        point(150, 0.95, 9e-6, 0.9, 0.0),
    )
    assert clean_only_choice([near, far, too_far], start_accuracy=1.0, tolerance=0.02) is far
    blind = [{**p, "test": {"clean_accuracy": 0.0, "attack_success_rate": 1.0}} for p in (near, far, too_far)]
    assert clean_only_choice(blind, 1.0, 0.02)["step"] == 100, "the test figures change nothing"
    assert clean_only_choice([too_far], 1.0, 0.02) is None, "none within the tolerance: no choice"


def test_the_reference_rule_takes_the_lowest_asr_within_delta_of_the_best_test_ca():
    best, inside, outside = point(50, 1, 0, 0.99, 0.8), point(100, 1, 0, 0.965, 0.1), point(150, 1, 0, 0.95, 0.0)
    assert reference_choice([best, inside, outside], delta=0.03) is inside
    assert reference_choice([best, inside, outside], delta=0.05) is outside
    with pytest.raises(ValueError, match="at least one checkpoint"):
        reference_choice([])


def test_checkpoints_pair_the_held_out_curve_with_the_evaluations_test_points_after_step_0():
    details = {
        "held_out_curve": [{"step": s, "accuracy": 1.0, "parameter_distance": s * 1e-8} for s in (0, 50, 100)],
        "persistence": [
            {"checkpoint": s, "clean_accuracy": 0.9, "attack_success_rate": 1 - s / 100} for s in (0, 50, 100)
        ],
    }
    points = checkpoints({"config": {"defense_options": {"lr": 0.01}}, "details": details})
    assert [p["step"] for p in points] == [50, 100]
    assert points[1]["test"]["attack_success_rate"] == 0.0 and points[0]["options"] == {"lr": 0.01}

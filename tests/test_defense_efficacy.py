"""Each image defense that can work on sklearn's 8x8 digits removes, or isolates, a backdoor there,
so that a fresh clone without the data folder tests every defense's efficacy (issue 37, case 12).

Setting: the digits recipe (small CNN, 20 epochs), seed 0, 10% poisoning of target class 0, and a
10% trusted split (144 digits: the repairs need a few per class; 1% of digits is 14 images).

- The repairs start from one BadNets model (the default 2x2 white patch), trained once for the
  module and handed to ``run(config, suspect=model)``, which rebuilds the same data and trusted
  split from the config.
- ABL and PT train on BadNets with Gu et al.'s checkerboard pattern instead: on 8x8 digits a white
  2x2 square is learnt about as fast as the clean digits, so their lowest-loss 1% is near chance
  (measured, seed 0: ABL precision 0.38, ASR 0.997 -> 0.917; PT 0.31, ASR -> 0.611), while the
  checkerboard's poisoned digits are the ones they fit first: ABL's 1% is all poisoned there.

Where a defense needs options other than its defaults on digits, its test says which and what the
defaults gave. Figures measured on this project's shared 2-core CPU machine at 1 and 2 torch
threads (the models train differently with the thread count); each test's numbers are in its
docstring (ASR / CA, suspect -> defended). About 50 s in all at 2 threads.
"""

from __future__ import annotations

import pytest

from backdoorlab.experiments import RunConfig, run
from backdoorlab.experiments.run import RunResult

pytestmark = pytest.mark.slow

#: The repairs' victim; ABL's and PT's swaps the white patch for the checkerboard.
PATCH = {"dataset": "digits", "device": "cpu", "trusted_size": 0.1, "seed": 0}
CHECKERBOARD = {**PATCH, "attack_options": {"pattern": "checkerboard"}}
TARGET = 0

#: Neural Cleanse on digits (see ``neural_cleanse_repair``): 300 steps of 16 digits per class.
NC_OPTIONS = {"steps": 300, "batch_size": 16, "threshold": 1.5}


def backdoored(config: dict) -> RunResult:
    """The undefended run of ``config``: the backdoor must take before a defense can be judged."""
    result = run(RunConfig(**config))
    assert result.metrics["attack_success_rate"] > 0.95 and result.metrics["clean_accuracy"] > 0.95, result.metrics
    return result


@pytest.fixture(scope="module")
def patch_victim() -> RunResult:
    """BadNets (2x2 white patch); measured CA 0.989, ASR 0.997."""
    return backdoored(PATCH)


@pytest.fixture(scope="module")
def checkerboard_victim() -> RunResult:
    """BadNets (2x2 checkerboard); measured CA 0.989, ASR 1.000 (0.994 at 2 threads)."""
    return backdoored(CHECKERBOARD)


def repair(victim: RunResult, name: str, options: dict) -> RunResult:
    """``name`` applied to the victim model; its suspect metrics must be the victim's own."""
    result = run(RunConfig(**PATCH, defense=name, defense_options=options), suspect=victim.model)
    assert result.metrics["suspect_attack_success_rate"] == victim.metrics["attack_success_rate"], (
        "the same model and data"
    )
    return result


@pytest.mark.parametrize(
    ("name", "options", "max_asr", "max_ca_drop"),
    [
        pytest.param("fine_tuning", {}, 0.7, 0.03, id="fine_tuning"),
        pytest.param("fine_pruning", {}, 0.2, 0.04, id="fine_pruning"),
        pytest.param("nad", {"scale_betas": True}, 0.2, 0.04, id="nad-scale_betas"),
        pytest.param(
            "pivotal_tuning",
            {"steps": 300, "lr": 0.01, "parameter_weight": 0.0, "eval_every": 50, "held_out": 0.3},
            0.7,
            0.05,
            id="pivotal_tuning-lr0.01",
            marks=pytest.mark.filterwarnings("ignore:the held-out share has 43 images"),
        ),
    ],
)
def test_repair_lowers_asr_and_keeps_clean_accuracy(patch_victim, name, options, max_asr, max_ca_drop):
    """ASR below ``max_asr`` (from 0.997) and CA within ``max_ca_drop`` of the suspect's 0.989.
    Measured ASR / CA at 1 thread and at 2 (the victim trains differently with the thread count):

    - fine_tuning (defaults: 20 epochs at lr 0.1): 0.565 / 0.975 and 0.383 / 0.972. It lowers ASR
      but does not remove the backdoor with 144 digits (with MNIST's 500 it does, test_repair.py).
    - fine_pruning (defaults; about 40 of 128 channels pruned): 0.046 / 0.972 and 0.049 / 0.967.
    - nad with ``scale_betas`` (the betas rescaled to the small CNN's 8x8, 4x4, 2x2 attention maps,
      the option's purpose): 0.015 / 0.972 and 0.019 / 0.975; on a 2-thread AMD EPYC (2026-12-07)
      CA 0.953, a drop of 0.036, so its bound is 0.04. At the defaults (betas set for
      WRN's 32x32 maps) the attention term swamps the cross-entropy: CA 0.194.
    - pivotal_tuning at lr 0.01 without the weight anchor, 300 steps, 30% of the trusted split held
      out (43 digits): 0.454 / 0.969 and 0.451 / 0.958, ASR falling steadily over the steps (0.96,
      0.88, 0.81, 0.67, 0.55, 0.45). At its defaults (lr 1e-4, 2000 steps) it leaves the backdoor
      (0.994 / 0.978). Faster settings swing: lr 0.02 with a tenth of the anchor gave 0.216 / 0.978
      on one victim and 0.022 / 0.925 on the other, the default 10% held out (14 digits) scoring
      1.0 at both CAs. The held-out share draws its resolution warning, rightly.
    """
    suspect = patch_victim.metrics
    repaired = repair(patch_victim, name, options).metrics
    assert repaired["attack_success_rate"] < max_asr, repaired
    assert repaired["clean_accuracy"] >= suspect["clean_accuracy"] - max_ca_drop, repaired


@pytest.fixture(scope="module")
def neural_cleanse_repair(patch_victim) -> RunResult:
    """Neural Cleanse's repair on the victim, at 300 steps of 16 digits per class (the default batch
    of 128 makes ten classes x 300 steps take minutes on 2 cores; the batch also sets the unlearning
    fine-tuning's) and an anomaly-index threshold of 1.5 instead of the paper's 2. On 8x8 digits
    the target's index measured 1.86-2.16 across four step and batch settings with the cost
    multiplier at 1.5, and 2.33 (1 thread) / 2.37 (2 threads) here with the official example's 2:
    too close to 2 to test on. Clean models of the same config scored 0.80-1.09 at 300 steps."""
    return repair(patch_victim, "neural_cleanse", NC_OPTIONS)


def test_neural_cleanse_flags_the_target_and_scores_the_backdoored_model_above_a_clean_one(neural_cleanse_repair):
    """Measured: the backdoored model's reversed masks have L1 norm 7.6 for the target (the trigger
    is 4 pixels) and 9.8-16.4 for the other classes, anomaly index 2.33 (1 thread) and 2.37 (2);
    the clean model of the same config (poison rate 0) scores 1.09 and 1.03, no class flagged."""
    details = neural_cleanse_repair.details
    anomaly = details["anomaly_indices"]
    assert max(range(len(anomaly)), key=anomaly.__getitem__) == TARGET, anomaly
    assert details["flagged_classes"] == details["unlearned_classes"] == [TARGET]
    clean = run(RunConfig(**PATCH, poison_rate=0, detector="neural_cleanse", detector_options=NC_OPTIONS))
    assert clean.metrics["attack_success_rate"] < 0.1, "the clean control carries no backdoor"
    assert clean.metrics["detection_score"] < max(anomaly) - 0.5, (clean.metrics["detection_score"], anomaly)
    assert not clean.details["detection"]["flagged"]


def test_neural_cleanse_repair_unlearns_the_reversed_trigger(neural_cleanse_repair):
    """Fine-tuning on the trusted split with 20% of it stamped with the reversed trigger of the
    flagged class. Measured ASR / CA from 0.997 / 0.989: 0.000 / 0.967 (1 thread) and 0.003 / 0.967
    (2 threads) here; 0.000 / 0.950 at the default steps and batch (with the earlier cost
    multiplier)."""
    metrics = neural_cleanse_repair.metrics
    assert metrics["attack_success_rate"] < 0.2, metrics
    assert metrics["clean_accuracy"] >= metrics["suspect_clean_accuracy"] - 0.05, metrics


@pytest.mark.parametrize(
    ("name", "options", "min_precision"),
    [pytest.param("abl", {}, 0.8, id="abl"), pytest.param("pt", {"trained": 1}, 0.5, id="pt-trained1")],
)
def test_training_time_defense_isolates_the_poison_and_lowers_asr(checkerboard_victim, name, options, min_precision):
    """Isolation precision against the poison mask (the poisoned share is 10%, so chance is 0.1),
    ASR against the undefended run of the same seed (1.000 at 1 thread, 0.994 at 2) and CA within 5
    points of its 0.989. Measured at 1 and 2 threads:

    - ABL at its defaults: the 1% it isolates is 13 of 13 poisoned (precision 1.00) at both; ASR
      0.552 / 0.611, CA 0.981 / 0.961. Its 5 unlearning epochs at lr 5e-4 halve ASR; the paper's 20
      (``unlearning_epochs``) took it to 0.003 at 13 points of CA (0.861).
    - PT with ``trained=1`` (only the first body module and the head learn in the partial model):
      precision 0.69 / 0.62, ASR 0.164 / 0.451, CA 0.956 / 0.956. At its defaults (``trained`` =
      half the body, 3 of 5 modules) the small CNN fits clean 8x8 digits with its first half too:
      precision 0.38, ASR 0.583, CA 0.981.
    """
    undefended = checkerboard_victim.metrics
    defended = run(RunConfig(**CHECKERBOARD, defense=name, defense_options=options)).metrics
    assert defended["isolation_precision"] >= min_precision, defended
    assert defended["attack_success_rate"] < undefended["attack_success_rate"] - 0.3, defended
    assert defended["clean_accuracy"] >= undefended["clean_accuracy"] - 0.05, defended

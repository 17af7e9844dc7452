from __future__ import annotations

import pytest
import torch

from backdoorlab.attacks import BadNets, PoisonSpec, poison_dataset, triggered_test_set
from backdoorlab.data import DataError


@pytest.fixture
def trigger(digits):
    return BadNets(digits.train.input_shape)


def test_all_to_one_picks_exact_count_from_non_target(digits, trigger):
    clean = digits.train
    result = poison_dataset(clean, trigger, PoisonSpec(rate=0.1, target=3), seed=0)
    mask = result.mask
    assert int(mask.sum()) == round(0.1 * len(clean)) == result.num_poisoned
    assert (result.original_labels[mask] != 3).all(), "all-to-one never poisons target-class samples"
    assert (result.data.labels[mask] == 3).all()
    assert torch.equal(result.data.labels[~mask], clean.labels[~mask])
    # the mask is exactly the set of changed images (the 2x2 patch changes every digit image?)
    changed = (result.data.inputs != clean.inputs).flatten(1).any(1)
    assert not changed[~mask].any()
    assert torch.equal(result.data.inputs[mask], trigger(clean.inputs[mask]))
    assert torch.equal(result.original_labels, clean.labels)


def test_count_rate_and_seed(digits, trigger):
    a = poison_dataset(digits.train, trigger, PoisonSpec(rate=25), seed=1)
    b = poison_dataset(digits.train, trigger, PoisonSpec(rate=25), seed=1)
    c = poison_dataset(digits.train, trigger, PoisonSpec(rate=25), seed=2)
    assert a.num_poisoned == 25 and torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)


def test_all_to_all_relabels_to_next_class(digits, trigger):
    result = poison_dataset(digits.train, trigger, PoisonSpec(rate=0.2, mode="all-to-all"), seed=0)
    mask = result.mask
    assert torch.equal(result.data.labels[mask], (digits.train.labels[mask] + 1) % 10)
    assert set(digits.train.labels[mask].tolist()) == set(range(10)), "all classes are eligible"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PoisonSpec(rate=1.5), r"poison rate must be in \[0, 1\]"),
        (PoisonSpec(rate=-0.5), r"poison rate must be in \[0, 1\]"),
        (PoisonSpec(rate=-3), "poison count must be >= 0"),
        (PoisonSpec(target=10), "outside the dataset's classes 0..9"),
        (PoisonSpec(target=-1), "outside the dataset's classes"),
        (PoisonSpec(mode="one-to-one"), "valid: all-to-one, all-to-all"),
    ],
)
def test_bad_specs_are_refused(digits, trigger, spec, message):
    with pytest.raises(ValueError, match=message):
        poison_dataset(digits.train, trigger, spec, seed=0)


def test_more_than_eligible_is_refused(digits, trigger):
    with pytest.raises(DataError, match="only .* are eligible"):
        poison_dataset(digits.train, trigger, PoisonSpec(rate=1.0, target=0), seed=0)


def test_triggered_test_set_excludes_target_class(digits, trigger):
    test = digits.test
    t = triggered_test_set(test, trigger, PoisonSpec(target=4), seed=0)
    assert len(t.true_labels) == int((test.labels != 4).sum())
    assert (t.true_labels != 4).all() and (t.target_labels == 4).all()
    assert torch.equal(t.inputs, trigger(test.inputs[test.labels != 4]))
    t_all = triggered_test_set(test, trigger, PoisonSpec(mode="all-to-all"), seed=0)
    assert len(t_all.true_labels) == len(test)
    assert torch.equal(t_all.target_labels, (test.labels + 1) % 10)

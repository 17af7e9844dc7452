"""docs/library.md's promise: its blocks run in order, on data the toolkit does not register and a
model the user writes, and do what its comments say."""

from __future__ import annotations

import re

import pytest

from backdoorlab.defenses import REPAIRS
from backdoorlab.evaluation import MAX_REPAIR_CA_DROP

from .conftest import REPO


@pytest.mark.slow
def test_the_library_tutorial_runs_and_its_backdoor_takes_and_is_repaired(capsys):
    """About five minutes: every repair at its defaults (ANP and Neural Cleanse most of it), and a
    two-cell grid in two spawned worker processes."""
    text = (REPO / "docs" / "library.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5, "the tutorial's blocks"
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/library.md block {number}", "exec"), namespace)
    assert "(1, 8, 8) 1330 70" in capsys.readouterr().out
    victim, after = namespace["victim"], namespace["after"]
    assert victim["clean_accuracy"] > 0.9 and victim["attack_success_rate"] > 0.9, victim
    assert after["attack_success_rate"] < 0.2 and after["clean_accuracy"] > victim["clean_accuracy"] - 0.1, after
    assert namespace["auroc"] > 0.6, namespace["auroc"]

    # every repair ran on the user's model, and the evaluation warned exactly where one lost too much
    results, warned = namespace["results"], namespace["warned"]
    assert sorted(results) == REPAIRS.names()
    for name, metrics in results.items():
        destroyed = victim["clean_accuracy"] - metrics["clean_accuracy"] > MAX_REPAIR_CA_DROP
        assert destroyed == any("the repair lost" in message for message in warned[name]), (name, metrics)

    # the grid's two cells ran in worker processes, on the parquet files of the user's arrays
    summary, cells = namespace["summary"], namespace["cells"]
    assert (summary.done, summary.failed) == (2, 0) and len(cells) == 2
    for label, metrics in cells.items():
        assert metrics["clean_accuracy"] > 0.9 and metrics["attack_success_rate"] > 0.9, (label, metrics)

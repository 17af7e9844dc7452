"""Write the BackdoorBench leaderboard comparison into docs/backdoorbench.md from a results store of
examples/backdoorbench_leaderboard_cpu.yaml (or the GPU grid), without running anything: finished
cells are shown, the others read "not yet run", so the table can be regenerated while the sweep is
still going.

Usage::

    BACKDOORLAB_DATA=../shared/data backdoorlab sweep examples/backdoorbench_leaderboard_cpu.yaml \\
        --output benchmarks/results/backdoorbench-leaderboard-cpu
    BACKDOORLAB_DATA=../shared/data python scripts/leaderboard_table.py --store benchmarks/results/backdoorbench-leaderboard-cpu

The grid's cells are expanded to find their keys, which checks their trigger files (Hello Kitty):
hence the data root, though nothing is read from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from doc_blocks import DOCS, replace_block

from backdoorlab.experiments.grid import load_grid
from backdoorlab.experiments.store import ResultStore

#: BackdoorBench's published CIFAR-10 row for BadNets at 10% (PreAct-ResNet18, 100 epochs):
#: (CA %, ASR %, RA %), as quoted in issue 38 from its leaderboard.
PUBLISHED = {
    ("badnets", "none"): (91.32, 95.03, 4.67),
    ("badnets", "fine_tuning"): (89.96, 1.48, 89.39),
    ("badnets", "fine_pruning"): (91.31, 57.13, 41.62),
    ("badnets", "nad"): (89.87, 2.14, 88.71),
    ("badnets", "neural_cleanse"): (89.05, 1.27, 89.16),
    ("badnets", "abl"): (83.32, 0.00, 89.02),
}


def percent(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}"


def rows(store_path: str, grid_path: str) -> list[str]:
    """One table row per cell of the grid, in grid order: ours beside the published numbers."""
    grid = load_grid(grid_path)
    with ResultStore(store_path) as store:
        by_key = {r.key: r for r in store.records()}
    lines = [
        "| attack | defense | BackdoorBench CA / ASR / RA | ours CA / ASR / RA | wall time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cell in grid.cells:
        config = cell.config
        attack, defense = config.attack, config.defense or "none"
        published = PUBLISHED.get((attack, defense))
        theirs = " / ".join(f"{v:.2f}" for v in published) if published else "not quoted here"
        record = by_key.get(cell.key)
        if record is not None and record.status == "done" and record.metrics:
            m = record.metrics
            ours = " / ".join(percent(m.get(k)) for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy"))
            seconds = (record.timings or {}).get("total")
            when = f"{seconds / 60:.0f} min" if seconds else "-"
            if record.warnings:
                ours += " (warned: " + "; ".join(record.warnings) + ")"
        else:
            ours, when = "not yet run", "-"
        lines.append(f"| {attack} | {defense} | {theirs} | {ours} | {when} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="benchmarks/results/backdoorbench-leaderboard-cpu")
    parser.add_argument("--grid", default=str(DOCS.parent / "examples" / "backdoorbench_leaderboard_cpu.yaml"))
    parser.add_argument("--doc", default=str(DOCS / "backdoorbench.md"), help="the page holding the block")
    args = parser.parse_args()
    lines = rows(args.store, args.grid)
    replace_block(Path(args.doc), "leaderboard-table", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

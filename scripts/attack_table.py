"""Regenerate an attack results table in docs/attacks.md from a grid: every attack on each dataset at
a CPU-sized schedule (examples/attack_table.yaml, block ``table``) or on the full training sets
(examples/attack_table_full.yaml, block ``table-gpu``), against a clean model of the same recipe.

Dirty-label attacks poison 10% of the training set; clean-label attacks (SIG, label-consistent) 8%
(all from the target class, which holds only about 10% of MNIST and CIFAR-10). The cells are
stored in ``OUTPUT/results.sqlite``; finished ones are skipped, so the table resumes.

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/attack_table.py --output runs/attack-table
    BACKDOORLAB_DATA=../shared/data python scripts/attack_table.py --grid examples/attack_table_full.yaml \\
        --block table-gpu --device cuda --output runs/attack-table-full
    BACKDOORLAB_DATA=../shared/data python scripts/attack_table.py --grid examples/attack_table_mnist_full.yaml \\
        --block table-mnist-full --detail --output benchmarks/results/attack-table-mnist-full [--stored]
"""

from __future__ import annotations

import argparse

from doc_blocks import DOCS, flagged, footnotes, grid_arguments, replace_block, sweep_results

CLEAN = "clean"


def table(results: dict[str, dict[str, dict]], attacks: list[str], detail: bool = False) -> list[str]:
    """The table's lines: per dataset CA and ASR (with ``detail`` also RA and the cell's minutes)."""
    columns = ("CA", "ASR", "RA", "min") if detail else ("CA", "ASR")
    lines = [
        "| attack | label | poisoned | " + " | ".join(f"{d} {c}" for d in results for c in columns) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in results for _ in columns) + " |",
    ]
    notes: list[str] = []
    for attack in attacks:
        cells = []
        first = next(iter(results.values()))[attack]
        label = "-" if attack == CLEAN else ("clean" if first["config"]["clean_label"] else "dirty")
        poisoned = f"{100 * first['data']['poisoned'] / first['data']['train']:.0f}%"
        for dataset, per_dataset in results.items():
            r = per_dataset[attack]["metrics"]
            ca = flagged(f"{r['clean_accuracy']:.3f}", per_dataset[attack], notes, f"{dataset}, {attack}")
            cell = f"{ca} | {r['attack_success_rate']:.3f}"
            if detail:
                minutes = per_dataset[attack]["timings"]["total"] / 60
                cell += f" | {r['robust_accuracy']:.3f} | {minutes:.1f}"
            cells.append(cell)
        name = "clean model (BadNets trigger at test)" if attack == CLEAN else f"`{attack}`"
        lines.append(f"| {name} | {label} | {poisoned} | " + " | ".join(cells) + " |")
    return lines + footnotes(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid_arguments(parser, "attack_table.yaml", "runs/attack-table")
    parser.add_argument("--block", default="table", help="the marked block of docs/attacks.md to fill")
    parser.add_argument("--detail", action="store_true", help="RA and each cell's minutes too")
    args = parser.parse_args()
    results: dict[str, dict[str, dict]] = {}
    attacks: list[str] = []
    for r in sweep_results(args):
        c = r["config"]
        attack = CLEAN if c["poison_rate"] == 0 else c["attack"]
        results.setdefault(c["dataset"], {})[attack] = r
        if attack not in attacks:
            attacks.append(attack)
    if not args.no_docs:
        doc = DOCS / "attacks.md"
        replace_block(doc, args.block, table(results, attacks, args.detail))
        print(f"wrote the table into {doc}")


if __name__ == "__main__":
    main()

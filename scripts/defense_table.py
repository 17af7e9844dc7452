"""Regenerate the training-time defense table in docs/defenses.md from the grid
examples/defense_table.yaml: each attack at 10% poisoning against no defense, each training-time
defense and each regulariser, on each dataset.

The cells are stored in ``OUTPUT/results.sqlite``; finished ones are skipped, so the table resumes.

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/defense_table.py --output runs/defense-table [--device cuda]
    BACKDOORLAB_DATA=../shared/data python scripts/defense_table.py --grid examples/defense_table_cpu.yaml \
        --output runs/defense-table-cpu --block defense-table-cpu
"""

from __future__ import annotations

import argparse

from doc_blocks import DOCS, grid_arguments, replace_block, sweep_results

from backdoorlab.report.tables import method_label


def table(results: dict, datasets: list[str], attacks: list[str], methods: list[str]) -> list[str]:
    head = "| dataset | attack | method | CA | ASR | isolated | precision | recall | time |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for dataset in datasets:
        for attack in attacks:
            for label in methods:
                r = results[dataset, attack, label]
                m, t = r["metrics"], r["timings"]
                seconds = t.get("defense", t.get("train", 0.0))
                iso = (
                    f"{m['isolated']} | {m['isolation_precision']:.2f} | {m['isolation_recall']:.2f}"
                    if "isolated" in m
                    else "- | - | -"
                )
                lines.append(
                    f"| {dataset} | {attack} | {label} | {m['clean_accuracy']:.3f} | "
                    f"{m['attack_success_rate']:.3f} | {iso} | {seconds:.1f} s |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid_arguments(parser, "defense_table.yaml", "runs/defense-table")
    parser.add_argument("--block", default="defense-table", help="the docs/defenses.md block to fill")
    args = parser.parse_args()
    results: dict = {}
    order: dict[str, list[str]] = {"dataset": [], "attack": [], "method": []}
    for r in sweep_results(args):
        c = r["config"]
        key = (c["dataset"], c["attack"], method_label(c))
        for name, value in zip(order, key):
            if value not in order[name]:
                order[name].append(value)
        results[key] = r
    if not args.no_docs:
        replace_block(
            DOCS / "defenses.md", args.block, table(results, order["dataset"], order["attack"], order["method"])
        )
        print(f"wrote the table into docs/defenses.md (block {args.block})")


if __name__ == "__main__":
    main()

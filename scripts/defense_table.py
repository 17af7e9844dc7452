"""Regenerate the training-time defense table in docs/defenses.md from the grid
examples/defense_table.yaml: each attack at 10% poisoning against no defense, each training-time
defense and each regulariser, on each dataset.

The cells are stored in ``OUTPUT/results.sqlite``; finished ones are skipped, so the table resumes.

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/defense_table.py --output runs/defense-table [--device cuda]
    BACKDOORLAB_DATA=../shared/data python scripts/defense_table.py --grid examples/defense_table_cpu.yaml \
        --output runs/defense-table-cpu --block defense-table-cpu
    BACKDOORLAB_DATA=../shared/data python scripts/defense_table.py --grid examples/training_defenses_series.yaml \
        --output benchmarks/results/training-defenses-series --doc time_series.md --block training-defenses-series

A defense run with several option settings in one grid is labelled by the options that differ
(``abl (unlearning_norm=eval)``).
"""

from __future__ import annotations

import argparse

from doc_blocks import DOCS, flagged, footnotes, grid_arguments, replace_block, sweep_results

from backdoorlab.defenses import create_defense
from backdoorlab.report.tables import method_label


def table(results: dict, datasets: list[str], attacks: list[str], methods: list[str]) -> list[str]:
    head = "| dataset | attack | method | CA | ASR | isolated | precision | recall | time |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes: list[str] = []
    for dataset in datasets:
        for attack in attacks:
            for label in methods:
                if (dataset, attack, label) not in results:  # not run yet (``--stored``)
                    continue
                r = results[dataset, attack, label]
                m, t = r["metrics"], r["timings"]
                seconds = t.get("defense", t.get("train", 0.0))
                iso = (
                    f"{m['isolated']} | {m['isolation_precision']:.2f} | {m['isolation_recall']:.2f}"
                    if "isolated" in m
                    else "- | - | -"
                )
                ca = flagged(f"{m['clean_accuracy']:.3f}", r, notes, f"{dataset}, {attack}, {label}")
                lines.append(
                    f"| {dataset} | {attack} | {label} | {ca} | {m['attack_success_rate']:.3f} | {iso} | {seconds:.1f} s |"
                )
    return lines + footnotes(notes)


def label(config: dict, cells: list[dict]) -> str:
    """:func:`method_label`, with the defense options that differ between the grid's runs of it."""
    name = method_label(config)
    defaults = create_defense(config["defense"]).config() if config.get("defense") else {}
    settings = [
        {**defaults, **(r["config"].get("defense_options") or {})} for r in cells if method_label(r["config"]) == name
    ]
    options = {**defaults, **(config.get("defense_options") or {})}
    varying = [k for k in options if len({repr(s.get(k)) for s in settings}) > 1]
    return f"{name} ({', '.join(f'{k}={options[k]}' for k in varying)})" if varying else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid_arguments(parser, "defense_table.yaml", "runs/defense-table")
    parser.add_argument("--doc", default="defenses.md", help="the page under docs/ to fill (default: %(default)s)")
    parser.add_argument("--block", default="defense-table", help="the block of that page to fill")
    args = parser.parse_args()
    results: dict = {}
    order: dict[str, list[str]] = {"dataset": [], "attack": [], "method": []}
    cells = sweep_results(args)
    for r in cells:
        c = r["config"]
        key = (c["dataset"], c["attack"], label(c, cells))
        for name, value in zip(order, key):
            if value not in order[name]:
                order[name].append(value)
        results[key] = r
    if not args.no_docs:
        replace_block(DOCS / args.doc, args.block, table(results, order["dataset"], order["attack"], order["method"]))
        print(f"wrote the table into docs/{args.doc} (block {args.block})")


if __name__ == "__main__":
    main()

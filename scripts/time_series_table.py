"""Regenerate the time-series table in docs/time_series.md from the grid examples/time_series.yaml:
for each dataset, clean training, then each series trigger at 10% poisoning with no defense, ABL and
E2ABL (the default recipe: FCN, 100 epochs).

The cells are stored in ``OUTPUT/results.sqlite``; finished ones are skipped, so the table resumes.

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/time_series_table.py --output runs/time-series
    BACKDOORLAB_DATA=../shared/data python scripts/time_series_table.py --grid examples/time_series_larger.yaml \
        --output runs/time-series-larger --block time-series-larger-table
"""

from __future__ import annotations

import argparse

from doc_blocks import DOCS, grid_arguments, replace_block, sweep_results

from backdoorlab.report.tables import method_label

METHODS = ("none", "abl", "e2abl")


def _cell(r: dict) -> str:
    m = r["metrics"]
    return f"{m['clean_accuracy']:.3f} / {m['attack_success_rate']:.3f}"


def _isolation(r: dict) -> str:
    m = r["metrics"]
    return f"{m['isolated']} ({m['isolation_precision']:.2f} / {m['isolation_recall']:.2f})"


def table(results: dict, datasets: list[str], attacks: list[str]) -> list[str]:
    lines = [
        "| dataset | train / test, length, classes | trigger | clean CA | poisoned CA / ASR | ABL CA / ASR | ABL isolated (prec. / rec.) | E2ABL CA / ASR | E2ABL flagged (prec. / rec.) | time none / ABL / E2ABL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dataset in datasets:
        clean = results[dataset, "clean"]
        d = clean["data"]
        shape = f"{d['train'] + d['trusted']} / {d['test']}"
        for attack in attacks:
            none, abl, e2abl = (results[dataset, attack, k] for k in METHODS)
            seconds = " / ".join(
                f"{r['timings'].get('defense', r['timings'].get('train', 0.0)):.0f}" for r in (none, abl, e2abl)
            )
            lines.append(
                f"| {dataset} | {shape}, {results[dataset, 'shape']} | {attack} | {clean['metrics']['clean_accuracy']:.3f} | "
                f"{_cell(none)} | {_cell(abl)} | {_isolation(abl)} | {_cell(e2abl)} | {_isolation(e2abl)} | {seconds} s |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid_arguments(parser, "time_series.yaml", "runs/time-series")
    parser.add_argument("--block", default="time-series-table", help="the docs/time_series.md block to fill")
    args = parser.parse_args()
    from backdoorlab.data import load_dataset

    results: dict = {}
    datasets, attacks = [], []
    for r in sweep_results(args):
        c = r["config"]
        dataset = c["dataset"]
        if dataset not in datasets:
            datasets.append(dataset)
            train = load_dataset(dataset, args.data_root).train
            results[dataset, "shape"] = f"{train.input_shape[1]} x {train.input_shape[0]} ch, {train.num_classes}"
        if c["poison_rate"] == 0:
            results[dataset, "clean"] = r
            continue
        if c["attack"] not in attacks:
            attacks.append(c["attack"])
        results[dataset, c["attack"], method_label(c)] = r
    if not args.no_docs:
        replace_block(DOCS / "time_series.md", args.block, table(results, datasets, attacks))
        print(f"wrote the table into docs/time_series.md (block {args.block})")


if __name__ == "__main__":
    main()

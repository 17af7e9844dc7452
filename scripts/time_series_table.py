"""Regenerate the time-series table in docs/time_series.md: for each dataset, clean training, then
each series trigger at 10% poisoning with no defense, ABL and E2ABL (the default recipe: FCN,
100 epochs).

Each run is stored as ``OUTPUT/<dataset>/<attack>/<method>/result.json`` and skipped when present.

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/time_series_table.py --output runs/time-series
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from doc_blocks import DOCS, replace_block

from backdoorlab.experiments import RunConfig, run_cached

DATASETS = ["gunpoint", "arrowhead", "italypowerdemand", "basicmotions", "ucr:ECG200", "ucr:CBF"]
ATTACKS = ["ts_pattern", "ts_sine", "ts_frequency"]
#: ABL isolates after 20 of the recipe's 100 epochs: the official code's 10 isolation epochs to 60
#: of training, rounded up (its default, all of the recipe's epochs, doubles the cost).
METHODS = {"none": {}, "abl": {"defense": "abl", "defense_options": {"isolation_epochs": 20}}, "e2abl": {"defense": "e2abl"}}


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
            seconds = " / ".join(f"{r['timings'].get('defense', r['timings'].get('train', 0.0)):.0f}" for r in (none, abl, e2abl))
            lines.append(
                f"| {dataset} | {shape}, {results[dataset, 'shape']} | {attack} | {clean['metrics']['clean_accuracy']:.3f} | "
                f"{_cell(none)} | {_cell(abl)} | {_isolation(abl)} | {_cell(e2abl)} | {_isolation(e2abl)} | {seconds} s |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", nargs="+", default=DATASETS)
    parser.add_argument("--attack", nargs="+", default=ATTACKS)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--output", default="runs/time-series")
    parser.add_argument("--no-docs", action="store_true", help="run, but leave docs/time_series.md alone")
    args = parser.parse_args()
    from backdoorlab.data import load_dataset

    results: dict = {}
    for dataset in args.dataset:
        train = load_dataset(dataset, args.data_root).train
        results[dataset, "shape"] = f"{train.input_shape[1]} x {train.input_shape[0]} ch, {train.num_classes}"
        base = {"dataset": dataset, "device": args.device, "seed": args.seed, "data_root": args.data_root}
        out = Path(args.output) / dataset.replace(":", "-")
        results[dataset, "clean"] = run_cached(RunConfig(poison_rate=0.0, **base), out / "clean")
        for attack in args.attack:
            for label, fields in METHODS.items():
                tick = time.perf_counter()
                config = RunConfig(attack=attack, poison_rate=args.rate, **base, **fields)
                results[dataset, attack, label] = r = run_cached(config, out / attack / label)
                print(f"{dataset:18s} {attack:13s} {label:6s} {r['metrics']} {time.perf_counter() - tick:.0f} s", flush=True)
    if not args.no_docs:
        replace_block(DOCS / "time_series.md", "time-series-table", table(results, args.dataset, args.attack))
        print("wrote the table into docs/time_series.md")


if __name__ == "__main__":
    main()

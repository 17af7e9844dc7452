"""Regenerate the training-time defense table in docs/defenses.md: each attack at 10% poisoning
against no defense, each training-time defense and each regulariser, on each dataset.

Each run is stored as ``OUTPUT/<dataset>/<attack>/<defense>/result.json`` and skipped when present.

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/defense_table.py --dataset mnist cifar10 \\
        --output runs/defense-table [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from doc_blocks import DOCS, replace_block

from backdoorlab.defenses import DEFENSES
from backdoorlab.experiments import RunConfig, run_cached
from backdoorlab.training.regularizers import REGULARIZERS

NONE = "none"


def methods() -> list[tuple[str, dict]]:
    """(label, RunConfig fields) for no defense, every defense, every regulariser."""
    out = [(NONE, {})]
    out += [(name, {"defense": name}) for name in DEFENSES.names()]
    out += [(f"reg:{name}", {"regularizer": name}) for name in REGULARIZERS.names()]
    return out


def table(results: dict, datasets: list[str], attacks: list[str]) -> list[str]:
    head = "| dataset | attack | method | CA | ASR | isolated | precision | recall | time |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for dataset in datasets:
        for attack in attacks:
            for label, _ in methods():
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
    parser.add_argument("--dataset", nargs="+", default=["mnist", "cifar10"])
    parser.add_argument("--attack", nargs="+", default=["badnets", "blended", "wanet"])
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--train-size", type=int, default=None, help="default: the whole training set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--output", default="runs/defense-table")
    parser.add_argument("--no-docs", action="store_true", help="run, but leave docs/defenses.md alone")
    args = parser.parse_args()
    results = {}
    for dataset in args.dataset:
        for attack in args.attack:
            for label, fields in methods():
                config = RunConfig(
                    dataset=dataset, attack=attack, poison_rate=args.rate, train_size=args.train_size,
                    device=args.device, seed=args.seed, data_root=args.data_root, **fields,
                )  # fmt: skip
                tick = time.perf_counter()
                out = Path(args.output) / dataset / attack / label.replace(":", "-")
                results[dataset, attack, label] = r = run_cached(config, out)
                print(f"{dataset:8s} {attack:8s} {label:28s} {r['metrics']} {time.perf_counter() - tick:.0f} s", flush=True)
    if not args.no_docs:
        replace_block(DOCS / "defenses.md", "defense-table", table(results, args.dataset, args.attack))
        print("wrote the table into docs/defenses.md")


if __name__ == "__main__":
    main()

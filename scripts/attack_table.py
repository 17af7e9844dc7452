"""Regenerate the attack results table in docs/attacks.md: every registered attack on each dataset
at a CPU-sized schedule, against a clean model trained with the same recipe.

Each run is stored as ``OUTPUT/<dataset>/<attack>/result.json`` and skipped when present, so an
interrupted table resumes where it stopped. Dirty-label attacks poison ``--rate`` of the training
set; clean-label attacks (SIG, label-consistent) poison ``--clean-label-rate`` (all from the target
class, which holds only about 10% of MNIST and CIFAR-10).

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/attack_table.py --dataset mnist cifar10 \\
        --train-size mnist=20000 cifar10=10000 --output runs/attack-table
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from doc_blocks import DOCS, replace_block

from backdoorlab.attacks import ATTACKS
from backdoorlab.experiments import RunConfig, run_cached

CLEAN = "clean"


def run_cell(dataset: str, attack: str, args: argparse.Namespace) -> dict:
    clean_label = ATTACKS.get(attack if attack != CLEAN else "badnets").clean_label
    rate = 0 if attack == CLEAN else (args.clean_label_rate if clean_label else args.rate)
    config = RunConfig(
        dataset=dataset, attack="badnets" if attack == CLEAN else attack, poison_rate=rate,
        train_size=args.train_sizes[dataset], device=args.device, seed=args.seed, data_root=args.data_root,
    )  # fmt: skip
    tick = time.perf_counter()
    result = run_cached(config, Path(args.output) / dataset / attack)
    print(f"{dataset:8s} {attack:18s} {result['metrics']} {time.perf_counter() - tick:.0f} s", flush=True)
    return result


def table(results: dict[str, dict[str, dict]]) -> list[str]:
    lines = [
        "| attack | label | poisoned | "
        + " | ".join(f"{d} CA | {d} ASR" for d in results)
        + " |",
        "| --- | --- | --- | " + " | ".join("--- | ---" for _ in results) + " |",
    ]
    for attack in [CLEAN, *ATTACKS.names()]:
        cells = []
        first = next(iter(results.values()))[attack]
        label = "-" if attack == CLEAN else ("clean" if first["config"]["clean_label"] else "dirty")
        poisoned = f"{100 * first['data']['poisoned'] / first['data']['train']:.0f}%"
        for per_dataset in results.values():
            r = per_dataset[attack]["metrics"]
            cells.append(f"{r['clean_accuracy']:.3f} | {r['attack_success_rate']:.3f}")
        name = "clean model (BadNets trigger at test)" if attack == CLEAN else f"`{attack}`"
        lines.append(f"| {name} | {label} | {poisoned} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", nargs="+", default=["mnist", "cifar10"])
    parser.add_argument("--attack", nargs="*", default=None, help="default: every registered attack")
    parser.add_argument(
        "--train-size", nargs="+", default=["20000"],
        help="training images per run: one count for all datasets, or NAME=COUNT pairs",
    )  # fmt: skip
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--clean-label-rate", type=float, default=0.08)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--output", default="runs/attack-table")
    parser.add_argument("--no-docs", action="store_true", help="run, but leave docs/attacks.md alone")
    parser.add_argument("--block", default="table", help="the marked block of docs/attacks.md to fill")
    args = parser.parse_args()
    sizes = dict(item.split("=", 1) if "=" in item else ("*", item) for item in args.train_size)
    args.train_sizes = {d: int(sizes.get(d, sizes.get("*", 0))) or None for d in args.dataset}
    attacks = [CLEAN, *(args.attack or ATTACKS.names())]
    results = {d: {a: run_cell(d, a, args) for a in attacks} for d in args.dataset}
    if args.no_docs or args.attack:
        return
    doc = DOCS / "attacks.md"
    replace_block(doc, args.block, table(results))
    print(f"wrote the table into {doc}")


if __name__ == "__main__":
    main()

"""Write the BackdoorBench comparison into docs/experiments.md: BackdoorBench's published CIFAR-10
leaderboard numbers (PreAct-ResNet18, 100 epochs, 10% poisoning) beside our reduced CPU schedule of
the same grid (examples/backdoorbench_cifar10_cpu.yaml), or the full protocol
(examples/backdoorbench_cifar10.yaml, for a GPU) with ``--grid``.

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/backdoorbench_table.py --output runs/backdoorbench-cpu \\
        [--only attack=badnets]
"""

from __future__ import annotations

import argparse

from doc_blocks import DOCS, grid_arguments, replace_block, sweep_results

from backdoorlab.report.tables import method_label

#: BackdoorBench leaderboard, CIFAR-10, PreAct-ResNet18, 10% poisoning: (CA %, ASR %), as quoted in
#: issue 8 from backdoorbench.github.io/leaderboard.
PUBLISHED = {
    ("badnets", "none"): (91.32, 95.03),
    ("badnets", "fine_tuning"): (89.96, 1.48),
    ("badnets", "nad"): (89.87, 2.14),
    ("badnets", "abl"): (83.32, 0.00),
}


def table(results: dict, pairs: list[tuple[str, str]], label: str) -> list[str]:
    lines = [
        f"| attack | defense | BackdoorBench CA | BackdoorBench ASR | {label} CA | {label} ASR |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for pair in pairs:
        ours = results.get(pair)
        published = PUBLISHED.get(pair)
        theirs = f"{published[0]:.2f} | {published[1]:.2f}" if published else "not published here | -"
        mine = (
            f"{100 * ours['clean_accuracy']:.2f} | {100 * ours['attack_success_rate']:.2f}"
            if ours
            else "not run | not run"
        )
        lines.append(f"| {pair[0]} | {pair[1]} | {theirs} | {mine} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid_arguments(parser, "backdoorbench_cifar10_cpu.yaml", "runs/backdoorbench-cpu")
    parser.add_argument("--label", default="reduced CPU", help="the column title of our numbers")
    args = parser.parse_args()
    results = {}
    for r in sweep_results(args):
        c = r["config"]
        results[c["attack"], method_label(c)] = r["metrics"]
    pairs = list(dict.fromkeys([*PUBLISHED, *results]))
    if not args.no_docs:
        replace_block(DOCS / "experiments.md", "backdoorbench-table", table(results, pairs, args.label))
        print("wrote the table into docs/experiments.md")


if __name__ == "__main__":
    main()

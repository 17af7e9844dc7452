"""Pivotal Tuning under two reporting protocols, side by side (grid examples/pivotal_protocols.yaml).

Each model of the grid (one ``none`` cell per seed) is repaired with Pivotal Tuning at the
reference's defaults and at each setting of a small grid (learning rate x anchor weight), every
setting measured every 50 steps on the held-out share of the trusted split and, by the
evaluation, on the test set. From the same runs, per model (``backdoorlab.report.protocols``):

- **clean-only** (reconstructed): among every setting's checkpoints within the repair's tolerance
  (2 points) of the suspect's held-out accuracy, the one farthest from the suspect's weights;
- **reference rule** (the reference tooling's): the lowest test ASR within ``--delta`` (3 points)
  of the best test CA, over every setting and checkpoint; it reads the test set, never a default;
- **defaults**: the checkpoint Pivotal Tuning itself returns at the reference's defaults.

The cells are stored in ``OUTPUT/results.sqlite`` and reused (finished ones are skipped); the
suspect is trained once per seed. The tables go into docs/defenses.md's block
``pivotal-protocols-<dataset>`` (``--no-docs`` leaves it alone). ``--set FIELD=VALUE`` replaces a
field of the grid (as ``backdoorlab sweep --set``). Usage::

    python scripts/pivotal_protocols.py --output runs/pivotal-protocols
    BACKDOORLAB_DATA=../shared/data python scripts/pivotal_protocols.py --output runs/pivotal-protocols-mnist \\
        --set dataset=mnist --set train_size=10000 --set trusted_size=0.05 --set recipe=quick
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

from doc_blocks import DOCS, grid_arguments, replace_block, sweep_results

from backdoorlab.defenses import create_repair
from backdoorlab.report.protocols import Checkpoint, checkpoints, clean_only_choice, reference_choice


def setting_label(options: dict[str, Any]) -> str:
    """``lr 0.01, weight 2000, 600 steps``."""
    return f"lr {options['lr']:g}, weight {options['parameter_weight']:g}, {options['steps']} steps"


def cell(point: Checkpoint | None) -> list[str]:
    """A chosen checkpoint's setting and step, test CA and test ASR."""
    if point is None:
        return ["none within tolerance", "", ""]
    test = point["test"]
    setting = f"{setting_label(point['options'])}, step {point['step']}"
    return [setting, f"{test['clean_accuracy']:.3f}", f"{test['attack_success_rate']:.3f}"]


def tables(results: list[dict[str, Any]], delta: float) -> list[str]:
    """The per-model protocols table, then the grid table (each setting's own ``latest`` checkpoint)."""
    defaults = create_repair("pivotal_tuning").config()  # stored results carry every option
    tolerance = defaults["max_accuracy_drop"]
    suspects = {r["config"]["seed"]: r for r in results if r["config"]["defense"] is None}
    repairs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r["config"]["defense"] == "pivotal_tuning":
            repairs[r["config"]["seed"]].append(r)
    lines = [
        "| seed | suspect CA / ASR | defaults: CA / ASR | clean-only: setting | CA | ASR "
        f"| reference rule (test set, delta {delta:g}): setting | CA | ASR |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seed, suspect in sorted(suspects.items()):
        runs = repairs[seed]
        default = next(r for r in runs if r["config"]["defense_options"] == defaults)
        held_out = default["details"]["held_out_curve"]
        points = [p for r in runs for p in checkpoints(r)]
        m, d = suspect["metrics"], default["metrics"]
        lines.append(
            "| "
            + " | ".join(
                [
                    str(seed),
                    f"{m['clean_accuracy']:.3f} / {m['attack_success_rate']:.3f}",
                    f"{d['clean_accuracy']:.3f} / {d['attack_success_rate']:.3f}",
                    *cell(clean_only_choice(points, held_out[0]["accuracy"], tolerance)),
                    *cell(reference_choice(points, delta)),
                ]
            )
            + " |"
        )
    lines += ["", "| setting | " + " | ".join(f"seed {s}: CA / ASR" for s in sorted(suspects)) + " |"]
    lines.append("| --- |" + " --- |" * len(suspects))
    settings = dict.fromkeys(
        setting_label(r["config"].get("defense_options") or {}) for rs in repairs.values() for r in rs
    )
    for label in settings:
        row = [label]
        for seed in sorted(suspects):
            r = next(r for r in repairs[seed] if setting_label(r["config"]["defense_options"]) == label)
            fallback = " (collapsed)" if r["details"].get("fallback") else ""
            row.append(f"{r['metrics']['clean_accuracy']:.3f} / {r['metrics']['attack_success_rate']:.3f}{fallback}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid_arguments(parser, "pivotal_protocols.yaml", "runs/pivotal-protocols")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="replace a grid field")
    parser.add_argument("--delta", type=float, default=0.03, help="the reference rule's CA window (default 0.03)")
    args = parser.parse_args()
    results = sweep_results(args, args.set)
    lines = tables(results, args.delta)
    print("\n".join(lines))
    if not args.no_docs:
        dataset = results[0]["config"]["dataset"]
        replace_block(DOCS / "defenses.md", f"pivotal-protocols-{dataset}", lines)
        print(f"wrote pivotal-protocols-{dataset} into {Path(DOCS / 'defenses.md').name}")


if __name__ == "__main__":
    main()

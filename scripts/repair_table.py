"""Regenerate the repair tables and persistence plots of docs/defenses.md (grid examples/repair_table.yaml).

Per dataset and attack, a backdoored model (``none``), then each repair of the grid on it with the
run's trusted clean split.

The cells are stored in ``OUTPUT/results.sqlite``; finished ones are skipped, so the table resumes.
The sweep trains each victim once and shares it with the repairs of the same attack config
(``OUTPUT/suspects/``), as ``backdoorlab sweep examples/repair_table.yaml`` does.

Each dataset's table goes into its own block of docs/defenses.md (``repair-table-<dataset>``) and
its persistence curves (``details.persistence`` of its ``fine_tuning`` results) into
``docs/gallery/persistence-<dataset>.png``, so one dataset can be regenerated without the other.

The shortcut options replace the grid's fields where given: ``--dataset`` and ``--attack`` (axes),
``--recipe``, ``--rate`` (``poison_rate``), ``--train-size``, ``--test-size``, ``--trusted-size``,
``--seed``, and ``--repairs`` (the repairs after ``none``; a partial table, so with ``--no-docs``, as
``--only``).

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/repair_table.py --dataset mnist --output runs/repair-table \\
        [--device cuda]
    BACKDOORLAB_DATA=../shared/data python scripts/repair_table.py --dataset cifar10 --recipe fast \\
        --test-size 2000 --output runs/repair-table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from doc_blocks import DOCS, flagged, footnotes, grid_arguments, replace_block, sweep_results

from backdoorlab.defenses import REPAIRS
from backdoorlab.registry import UnknownNameError
from backdoorlab.report.tables import method_label

#: Shortcut option (its argparse dest) -> the grid field it replaces.
SHORTCUTS = {
    "dataset": "dataset",
    "attack": "attack",
    "recipe": "recipe",
    "rate": "poison_rate",
    "train_size": "train_size",
    "test_size": "test_size",
    "trusted_size": "trusted_size",
    "seed": "seed",
}

Key = tuple[str, str, str]


def overrides(args: argparse.Namespace) -> list[str]:
    """The grid fields the shortcut options replace, as ``field=value`` (the value as YAML)."""
    values: dict[str, Any] = {field: getattr(args, dest) for dest, field in SHORTCUTS.items()}
    if args.repairs:
        values["defense"] = [None, *args.repairs]
    return [f"{field}={json.dumps(value)}" for field, value in values.items() if value is not None]


def table(results: dict[Key, dict], keys: list[Key]) -> list[str]:
    """One row per cell of ``keys`` (dataset, attack, repair or ``none``), in that order."""
    lines = ["| dataset | attack | repair | CA | ASR | RA | time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    notes: list[str] = []
    for key in keys:
        m, t = results[key]["metrics"], results[key]["timings"]
        seconds = t.get("defense", t.get("train", 0.0))
        ca = flagged(f"{m['clean_accuracy']:.3f}", results[key], notes, ", ".join(key))
        lines.append(
            f"| {' | '.join(key)} | {ca} | {m['attack_success_rate']:.3f} | {m['robust_accuracy']:.3f} | {seconds:.0f} s |"
        )
    return lines + footnotes(notes)


def persistence_plot(results: dict[Key, dict], pairs: list[tuple[str, str]], path: Path) -> None:
    """CA and ASR after each epoch of clean fine-tuning, one line pair per (dataset, attack) with a
    ``fine_tuning`` result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_asr, ax_ca) = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for dataset, attack in (pair for pair in pairs if (*pair, "fine_tuning") in results):
        curve = results[dataset, attack, "fine_tuning"]["details"]["persistence"]
        epochs = [p["checkpoint"] for p in curve]
        ax_asr.plot(epochs, [p["attack_success_rate"] for p in curve], marker=".", label=f"{dataset} {attack}")
        ax_ca.plot(epochs, [p["clean_accuracy"] for p in curve], marker=".", label=f"{dataset} {attack}")
    ax_asr.set(xlabel="epochs of clean fine-tuning", ylabel="attack success rate", ylim=(-0.02, 1.02))
    ax_ca.set(xlabel="epochs of clean fine-tuning", ylabel="clean accuracy")
    ax_asr.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(results: dict[Key, dict], doc: Path, gallery: Path) -> None:
    """Each dataset's table into ``doc``'s block ``repair-table-<dataset>`` and its persistence plot
    into ``gallery/persistence-<dataset>.png``."""
    for dataset in dict.fromkeys(key[0] for key in results):
        keys = [key for key in results if key[0] == dataset]
        pairs = list(dict.fromkeys(key[:2] for key in keys))
        replace_block(doc, f"repair-table-{dataset}", table(results, keys))
        persistence_plot(results, pairs, gallery / f"persistence-{dataset}.png")
        print(f"wrote repair-table-{dataset} into {doc.name} and {gallery.name}/persistence-{dataset}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    grid_arguments(parser, "repair_table.yaml", "runs/repair-table")
    parser.add_argument("--dataset", nargs="+", default=None, help="datasets (default: the grid's)")
    parser.add_argument("--attack", nargs="+", default=None, help="attacks (default: the grid's)")
    parser.add_argument("--recipe", default=None, help="training recipe (default: the grid's)")
    parser.add_argument("--rate", type=float, default=None, help="poison rate (default: the grid's)")
    parser.add_argument("--train-size", type=int, default=None, help="default: the grid's")
    parser.add_argument("--test-size", type=int, default=None, help="default: the grid's")
    parser.add_argument("--trusted-size", type=float, default=None, help="default: the grid's")
    parser.add_argument("--seed", type=int, default=None, help="default: the grid's")
    parser.add_argument("--repairs", nargs="+", default=None, help="only these repairs (default: the grid's)")
    args = parser.parse_args()
    for name in args.repairs or []:
        try:
            REPAIRS.get(name)
        except UnknownNameError as err:
            parser.error(f"--repairs: {err}")
    if (args.repairs or args.only) and not args.no_docs:
        parser.error("--repairs and --only make a partial table: add --no-docs")
    results: dict[Key, dict] = {}
    for r in sweep_results(args, overrides(args)):
        c = r["config"]
        results[c["dataset"], c["attack"], method_label(c)] = r
    if not args.no_docs:
        write_docs(results, DOCS / "defenses.md", DOCS / "gallery")


if __name__ == "__main__":
    main()

"""Regenerate the repair table and the persistence plot in docs/defenses.md: a backdoored model per
dataset and attack, then every repair defense on it with the run's trusted clean split.

The victim of each (dataset, attack) is trained once and stored as
``OUTPUT/<dataset>/<attack>/victim.safetensors`` (with its ``none/result.json``); each repair is
stored as ``OUTPUT/<dataset>/<attack>/<repair>/result.json`` and skipped when present.

Each dataset's table goes into its own block of docs/defenses.md (``repair-table-<dataset>``) and
its persistence curves into ``docs/gallery/persistence-<dataset>.png``, so one dataset can be
regenerated without the other.

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/repair_table.py --dataset mnist --recipe quick \\
        --train-size 10000 --trusted-size 0.05 --output runs/repair-table [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from doc_blocks import DOCS, replace_block

from backdoorlab.defenses import REPAIRS
from backdoorlab.experiments import RunConfig, load_model, run, run_cached, save_model
from backdoorlab.experiments.recipes import DEFAULT_RECIPE

NONE = "none"


def victim(config: RunConfig, directory: Path) -> Path:
    """Train (once) and store the backdoored model of ``config``; return its model file."""
    model_file = directory / "victim.safetensors"
    if not model_file.exists():
        result = run(config)
        result.write(directory / NONE)
        save_model(model_file, result.model, config)
    return model_file


def table(results: dict, keys: list[tuple[str, str]]) -> list[str]:
    lines = ["| dataset | attack | repair | CA | ASR | RA | time |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for dataset, attack in keys:
        for label in [NONE, *REPAIRS.names()]:
            r = results[dataset, attack, label]
            m, t = r["metrics"], r["timings"]
            seconds = t.get("defense", t.get("train", 0.0))
            lines.append(
                f"| {dataset} | {attack} | {label} | {m['clean_accuracy']:.3f} | {m['attack_success_rate']:.3f} | "
                f"{m['robust_accuracy']:.3f} | {seconds:.0f} s |"
            )
    return lines


def persistence_plot(results: dict, keys: list[tuple[str, str]], path: Path) -> None:
    """CA and ASR after each epoch of clean fine-tuning, one line pair per (dataset, attack)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_asr, ax_ca) = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for dataset, attack in keys:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", nargs="+", default=["mnist"])
    parser.add_argument("--attack", nargs="+", default=["badnets", "blended", "wanet"])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="training recipe (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--trusted-size", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--output", default="runs/repair-table")
    parser.add_argument("--repairs", nargs="+", default=None, help="only these repairs (default: every one)")
    parser.add_argument("--no-docs", action="store_true", help="run, but leave docs/defenses.md alone")
    args = parser.parse_args()
    repairs = args.repairs or REPAIRS.names()
    for name in repairs:
        REPAIRS.get(name)  # an unknown name fails here, listing the valid ones
    if args.repairs and not args.no_docs:
        parser.error("--repairs makes a partial table: add --no-docs")
    results, keys = {}, []
    for dataset in args.dataset:
        for attack in args.attack:
            config = RunConfig(
                dataset=dataset,
                recipe=args.recipe,
                attack=attack,
                poison_rate=args.rate,
                train_size=args.train_size,
                test_size=args.test_size,
                trusted_size=args.trusted_size,
                device=args.device,
                seed=args.seed,
                data_root=args.data_root,
            )
            directory = Path(args.output) / dataset / attack
            model_file = victim(config, directory)
            keys.append((dataset, attack))
            results[dataset, attack, NONE] = run_cached(config, directory / NONE)
            for name in repairs:
                tick = time.perf_counter()
                suspect, stored = load_model(model_file)
                stored.device = args.device
                repaired = replace(stored, defense=name)
                results[dataset, attack, name] = r = run_cached(repaired, directory / name, suspect=suspect)
                print(
                    f"{dataset:8s} {attack:8s} {name:16s} {r['metrics']} {time.perf_counter() - tick:.0f} s", flush=True
                )
    if not args.no_docs:
        for dataset in args.dataset:
            mine = [key for key in keys if key[0] == dataset]
            replace_block(DOCS / "defenses.md", f"repair-table-{dataset}", table(results, mine))
            persistence_plot(results, mine, DOCS / "gallery" / f"persistence-{dataset}.png")
            print(f"wrote repair-table-{dataset} into docs/defenses.md and docs/gallery/persistence-{dataset}.png")


if __name__ == "__main__":
    main()

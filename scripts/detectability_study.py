"""Regenerate the robustness-detectability table and plot in the docs (the study of "Pick
your Poison"): for each poison rate, ASR before and after Pivotal Tuning, and the ROC AUC of CTI and
Neural Cleanse scores against clean models trained with other seeds on the same training subset
and trusted split (``--own-splits``: each model on its own seed's).

The study's cells go into the results store ``OUTPUT/results.sqlite`` and resume like a sweep's;
a detector added later scores the stored suspect models (``OUTPUT/suspects/``). Users run the same
study with ``backdoorlab detectability``; this script also fills the docs' blocks (``--doc``: by
default the study's note, docs/notes/2026-11-23-detectability-study.md).

Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/detectability_study.py --dataset digits \\
        --rates 0.005 0.01 0.05 0.1 --seeds 0 1 --clean-seeds 100 101 102 103 --output runs/detectability
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from doc_blocks import DOCS, replace_block

from backdoorlab.experiments import RunConfig
from backdoorlab.experiments.detectability import detectability_study
from backdoorlab.experiments.recipes import DEFAULT_RECIPE
from backdoorlab.report.plots import detectability_plot
from backdoorlab.report.tables import detectability, detectability_table

#: Where the study's measurements and their generated blocks live.
STUDY_NOTE = DOCS / "notes" / "2026-11-23-detectability-study.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="training recipe (backdoorlab list recipes)")
    parser.add_argument("--model", default=None, help="model name; default: the recipe's (backdoorlab list models)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.005, 0.01, 0.05, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--clean-seeds", type=int, nargs="+", default=[100, 101, 102, 103])
    parser.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="the one training subset and trusted split every model draws (default 0)",
    )
    parser.add_argument(
        "--own-splits",
        action="store_true",
        help="each model draws the split of its own seed instead (the earlier design)",
    )
    parser.add_argument("--detectors", nargs="+", default=["cti", "neural_cleanse"])
    parser.add_argument(
        "--detector-options",
        type=json.loads,
        default={},
        help='JSON by detector name, e.g. {"cti": {"batch_size": 32}}',
    )
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--trusted-size", type=float, default=0.05)
    parser.add_argument("--repair", default="pivotal_tuning")
    parser.add_argument("--repair-options", type=json.loads, default={}, help='JSON, e.g. {"steps": 500}')
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--output", default="runs/detectability")
    parser.add_argument("--no-docs", action="store_true", help="run, but leave the docs alone")
    parser.add_argument(
        "--doc", type=Path, default=STUDY_NOTE, help="the Markdown file whose block to fill (default: %(default)s)"
    )
    parser.add_argument("--block", default="detectability-table", help="the --doc block to fill")
    parser.add_argument("--plot", default="detectability.png", help="the plot's file name in docs/gallery; '' for none")
    parser.add_argument("--workers", type=int, default=1, help="cells at once")
    args = parser.parse_args()
    base = RunConfig(
        dataset=args.dataset,
        attack=args.attack,
        recipe=args.recipe,
        model=args.model,
        train_size=args.train_size,
        test_size=args.test_size,
        trusted_size=args.trusted_size,
        device=args.device,
        data_root=args.data_root,
    )
    summary, records = detectability_study(
        base,
        args.rates,
        args.seeds,
        args.clean_seeds,
        args.output,
        workers=args.workers,
        data_seed=None if args.own_splits else args.data_seed,
        repair=args.repair,
        repair_options=args.repair_options,
        detectors=args.detectors,
        detector_options=args.detector_options,
    )
    if summary.failed or summary.interrupted:
        raise SystemExit(f"{summary.failed} cell(s) failed or the study was interrupted: the table would be partial")
    rows = detectability(records)
    table = detectability_table(rows)
    print(table)
    if not args.no_docs:
        replace_block(args.doc, args.block, table.splitlines())
        print(f"wrote the table into {args.doc} (block {args.block})")
        if args.plot:
            detectability_plot(rows, DOCS / "gallery" / args.plot, f"{args.attack} on {args.dataset}, {args.repair}")
            print(f"wrote docs/gallery/{args.plot}")


if __name__ == "__main__":
    main()

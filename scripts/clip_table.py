"""Regenerate docs/clip.md's study table (block ``clip-table``) and its curve plot
(docs/gallery/clip_tradeoff.png) from a CLIP study's results store, running nothing.

Usage::

    BACKDOORLAB_DATA=../shared/data OMP_NUM_THREADS=1 backdoorlab clip study \\
        --output benchmarks/results/clip-study-cifar10 --device cpu
    python scripts/clip_table.py --store benchmarks/results/clip-study-cifar10
"""

from __future__ import annotations

import argparse

from doc_blocks import DOCS, replace_block

from backdoorlab.experiments.store import ResultStore
from backdoorlab.files import write_bytes
from backdoorlab.report.plots import clip_tradeoff
from backdoorlab.report.tables import clip_study, clip_study_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="benchmarks/results/clip-study-cifar10", help="the study's output folder")
    parser.add_argument("--no-docs", action="store_true", help="print the table, leave the docs alone")
    args = parser.parse_args()
    with ResultStore(args.store) as store:
        rows = clip_study(store.records())
    if not rows:
        raise SystemExit(f"{args.store}: no finished CLIP study cell")
    table = clip_study_table(rows)
    print(table)
    if args.no_docs:
        return
    replace_block(DOCS / "clip.md", "clip-table", table.splitlines())
    image = clip_tradeoff(rows)
    if image:
        write_bytes(DOCS / "gallery" / "clip_tradeoff.png", image)
    print("wrote docs/clip.md (block clip-table) and docs/gallery/clip_tradeoff.png")


if __name__ == "__main__":
    main()

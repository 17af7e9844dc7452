"""Helpers of the scripts that write tables into the docs: run an example grid into a results store,
and replace a generated block of a Markdown file (the lines between two HTML-comment markers)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs"
EXAMPLES = DOCS.parent / "examples"


def grid_arguments(parser: argparse.ArgumentParser, grid: str, output: str) -> None:
    """The options every table script takes: the grid, where to store it, and how to run it."""
    parser.add_argument("--grid", default=str(EXAMPLES / grid), help="the grid file (default: %(default)s)")
    parser.add_argument("--output", default=output, help="results store folder (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--only", nargs="+", action="extend", default=[], metavar="FIELD=VALUE", help="run only the matching cells"
    )
    parser.add_argument("--no-docs", action="store_true", help="run, but leave the docs alone")
    parser.add_argument(
        "--stored", action="store_true", help="run nothing: the table of the cells the store has finished"
    )


def sweep_results(args: argparse.Namespace, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Sweep ``args.grid`` (the cells matching ``args.only``) into ``args.output`` (finished cells are
    skipped, so a table resumes) and return their ``result.json`` documents, in grid order; stops if
    a cell failed. With ``args.stored``, run nothing and return the finished cells' documents.
    ``overrides`` (``field=value``, as ``sweep --set``) replace fields of the grid."""
    from backdoorlab.cli import parse_selection
    from backdoorlab.experiments.grid import load_grid, select
    from backdoorlab.experiments.store import ResultStore
    from backdoorlab.experiments.sweep import sweep

    grid = load_grid(args.grid, overrides=overrides)
    if args.only:
        grid = select(grid, parse_selection(args.only))

    if getattr(args, "stored", False):
        with ResultStore(args.output) as store:
            done = {r.key: r for r in store.records() if r.status == "done"}
        return [done[c.key].result for c in grid.cells if c.key in done]  # type: ignore[misc]

    def show(cell: Any, outcome: dict[str, Any]) -> None:
        text = outcome["error"].strip().splitlines()[-1] if "error" in outcome else outcome["result"]["metrics"]
        print(f"{cell.label}: {text}", flush=True)

    summary = sweep(grid, args.output, workers=args.workers, device=args.device, data_root=args.data_root, on_cell=show)
    if summary.interrupted:
        raise SystemExit(130)
    with ResultStore(args.output) as store:
        by_key = {r.key: r for r in store.records()}
    failed = [by_key[c.key].label for c in grid.cells if by_key[c.key].status != "done"]
    if failed:
        raise SystemExit(
            f"{len(failed)} cell(s) did not finish ({'; '.join(failed[:3])}); see {args.output}/results.sqlite"
        )
    return [by_key[c.key].result for c in grid.cells]  # type: ignore[misc]


def flagged(text: str, result: dict[str, Any], notes: list[str], where: str) -> str:
    """``text`` (a table cell) with a footnote mark ``[n]`` when ``result`` carries health warnings
    (a collapsed or chance-level model, ...), whose text joins ``notes`` as ``where: warnings``; a
    flagged number never reads as a plain result. :func:`footnotes` writes the notes."""
    warnings = result.get("warnings") or []
    if not warnings:
        return text
    notes.append(f"{where}: " + "; ".join(warnings))
    return f"{text} [{len(notes)}]"


def footnotes(notes: list[str]) -> list[str]:
    """The lines under a table for :func:`flagged`'s notes (none without notes)."""
    return ["", *(f"[{i}] The run's health check warned ({note})." for i, note in enumerate(notes, 1))] if notes else []


def replace_block(doc: Path, name: str, lines: list[str]) -> None:
    """Put ``lines`` between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``doc``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = doc.read_text()
    if start not in content or end not in content:
        raise ValueError(f"{doc} has no {start} ... {end} block")
    before, _, rest = content.partition(start)
    _, _, after = rest.partition(end)
    doc.write_text(before + "\n".join([start, "", *lines, "", end]) + after)


def table_script(
    description: str, grid: str, output: str, doc: str, block: str, table: Callable[[list[dict[str, Any]]], list[str]]
) -> None:
    """The main of a script that sweeps one example grid into one table: parse the common options
    (and ``--set FIELD=VALUE``), sweep, print the table and put it into ``DOCS/doc`` as block
    ``<block>-<dataset>``, the dataset read from the table's first row's first column."""
    parser = argparse.ArgumentParser(description=description)
    grid_arguments(parser, grid, output)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="replace a grid field")
    args = parser.parse_args()
    lines = table(sweep_results(args, args.set))
    print("\n".join(lines))
    if not args.no_docs:
        dataset = lines[2].split("|")[1].strip()
        replace_block(DOCS / doc, f"{block}-{dataset}", lines)

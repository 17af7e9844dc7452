"""``write_report(output)``: a self-contained HTML page (inline CSS, images as data URIs, no
scripts) of a sweep's results store, with CSV and Parquet exports beside it.

Rows with cells the health checks flagged (``Record.warnings``) are marked (a yellow row, a
``warnings`` column saying which check and in how many of the row's cells), and a section lists
every flagged cell's warnings, so that a broken model's numbers never read as a plain result."""

from __future__ import annotations

import base64
import datetime
import html
import os
from collections import Counter
from pathlib import Path
from typing import Any

from backdoorlab import __version__
from backdoorlab.experiments.store import STORE_NAME, Record, ResultStore
from backdoorlab.report import plots
from backdoorlab.report.tables import Summary, detectability, format_metric, format_value, summarize, write_exports

REPORT_NAME = "report.html"

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figcaption { font-size: 12px; color: #555; }
.failed td { background: #fff0f0 !important; } .note { color: #666; font-size: 13px; }
tr.warned td { background: #fff6d6 !important; } td.warning { text-align: left; color: #8a5a00; font-size: 12px; }
pre { white-space: pre-wrap; font-size: 12px; margin: 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(
    head: list[str], rows: list[list[str]], text_columns: int, cls: str = "", marked: list[bool] | None = None
) -> str:
    """An HTML table of escaped ``rows``; ``marked[i]`` gives row ``i`` the ``warned`` class and its
    last cell the ``warning`` class (a flagged result)."""

    def cell(tag: str, i: int, value: str, last: bool = False) -> str:
        if last:
            return f'<{tag} class="warning">{value}</{tag}>'
        return f'<{tag} class="text">{value}</{tag}>' if i < text_columns else f"<{tag}>{value}</{tag}>"

    marked = marked or [False] * len(rows)
    out = [
        f'<table class="{cls}"><thead><tr>'
        + "".join(cell("th", i, _e(h)) for i, h in enumerate(head))
        + "</tr></thead><tbody>"
    ]
    for row, mark in zip(rows, marked, strict=True):
        cells = "".join(cell("td", i, v, mark and i == len(row) - 1) for i, v in enumerate(row))
        out.append(f'<tr class="warned">{cells}</tr>' if mark else f"<tr>{cells}</tr>")
    return "".join(out) + "</tbody></table>"


def _warning_cell(warnings: list[tuple[str, int]], n: int) -> str:
    """A summary row's warnings: each text once, with how many of its ``n`` cells have it."""
    return "<br>".join(f"{_e(text)}" + (f" ({count} of {n} cells)" if n > 1 else "") for text, count in warnings)


def _results_table(summary: Summary) -> str:
    warned = any(row["warned"] for row in summary.rows)
    head = (
        [*summary.columns, "seeds"]
        + [title for _, title in summary.metrics]
        + ["time (s)"]
        + (["warnings"] if warned else [])
    )
    rows = []
    for row in summary.rows:
        cells = [_e(format_value(row["values"][c])) for c in summary.columns] + [str(row["n"])]
        cells += [format_metric(row[key], row["n"]) for key, _ in summary.metrics]
        cells.append(f"{row['seconds']:.1f}")
        if warned:
            cells.append(_warning_cell(row["warnings"], row["n"]))
        rows.append(cells)
    return _table(head, rows, len(summary.columns), "results", [bool(row["warned"]) for row in summary.rows])


def _detectability_table(rows: list[dict[str, Any]]) -> str:
    warned = any(r.get("warned") for r in rows)
    head = [
        "dataset",
        "model",
        "attack",
        "poison rate",
        "detector",
        "AUROC",
        "p",
        "backdoored / clean models",
        "ASR",
        "repair",
        "ASR after repair",
    ] + (["warnings"] if warned else [])
    body = [
        [
            _e(r["dataset"]),
            _e(r["model"]),
            _e(r["attack"]),
            f"{r['poison_rate']:g}",
            _e(r["detector"]),
            f"{r['auroc']:.3f}",
            f"{r['p']:.2g}",
            f"{r['n']} / {r['n_clean']}",
            format_metric((r["asr"], 0.0), 1) if r["asr"] is not None else "—",
            _e(r["repair"] or "—"),
            format_metric((r["asr_repaired"], 0.0), 1) if r["asr_repaired"] is not None else "—",
        ]
        + ([f"{r['warned']} flagged cell(s): see Warnings" if r.get("warned") else ""] if warned else [])
        for r in rows
    ]
    return _table(head, body, 5, "detectability", [bool(r.get("warned")) for r in rows])


def _warnings_table(records: list[Record]) -> str:
    rows = [[_e(r.label or r.key), "<br>".join(_e(w) for w in r.warnings)] for r in records]
    return _table(["cell", "warnings"], rows, 1, "warnings", [True] * len(rows))


def _failed_table(records: list[Record]) -> str:
    rows = [
        [
            _e(r.label or r.key),
            f"<pre>{_e((r.error or '').strip().splitlines()[-1] if r.error else '')}</pre>",
            str(r.attempts),
        ]
        for r in records
    ]
    return _table(["cell", "error (last line; the store has the traceback)", "attempts"], rows, 2, "failed")


def _gallery(records: list[Record], data_root: str | None) -> str:
    seen: dict[str, tuple[str, str, dict]] = {}
    for r in records:
        c = r.config
        if r.status == "done" and float(c["poison_rate"]) > 0:
            seen.setdefault(
                f"{c['dataset']} · {c['attack']} {c['attack_options'] or ''}",
                (c["dataset"], c["attack"], c["attack_options"]),
            )
    figures = []
    for caption, (dataset, attack, options) in seen.items():
        try:
            png = plots.trigger_gallery(dataset, attack, options, data_root)
        except Exception as err:  # noqa: BLE001 - the gallery is optional: say why it is missing
            figures.append(f'<p class="note">{_e(caption)}: no picture ({_e(type(err).__name__)}: {_e(err)})</p>')
            continue
        figures.append(
            f"<figure>{_image(png, caption)}<figcaption>{_e(caption)}: clean (top), triggered (below)</figcaption></figure>"
        )
    return "".join(figures)


def _section(grid: str, records: list[Record], data_root: str | None, gallery: bool) -> str:
    counts = Counter(r.status for r in records)
    parts = [
        f"<h2>{_e(grid)}</h2>",
        f'<p class="note">{len(records)} cells: ' + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "</p>",
    ]
    summary = summarize(grid, records)
    if summary.rows:
        parts += ["<h3>Results (mean ± std over seeds)</h3>", _results_table(summary)]
    figures = [
        ("CA against ASR", plots.ca_vs_asr(summary)),
        ("Persistence under clean fine-tuning", plots.persistence(summary)),
    ]
    detect = detectability(records)
    if detect:
        parts += ["<h3>Robustness and detectability</h3>", _detectability_table(detect)]
        figures.append(("Robustness against detectability", plots.robustness_detectability(detect)))
    for title, png in figures:
        if png is not None:
            parts.append(f"<figure>{_image(png, title)}<figcaption>{_e(title)}</figcaption></figure>")
    flagged = [r for r in records if r.status == "done" and r.warnings]
    if flagged:
        parts += [
            "<h3>Warnings</h3>",
            '<p class="note">Cells whose model the health checks flagged: their numbers '
            "above are marked and are not evidence about a backdoor.</p>",
            _warnings_table(flagged),
        ]
    failed = [r for r in records if r.status == "failed"]
    if failed:
        parts += ["<h3>Failed cells</h3>", _failed_table(failed)]
    if gallery:
        parts += ["<h3>Triggers</h3>", _gallery(records, data_root)]
    return "\n".join(parts)


def write_report(
    output: str | Path, path: str | Path | None = None, *, gallery: bool = True, data_root: str | None = None
) -> Path:
    """Write ``report.html`` (or ``path``), ``results.csv`` and ``results.parquet`` for the store in
    the folder ``output``; return the HTML file's path. ``gallery``: draw each attack's trigger on
    test samples (needs the data; a picture that cannot be drawn says why)."""
    output = Path(output)
    if not (output / STORE_NAME).is_file():
        raise FileNotFoundError(f"{output} has no {STORE_NAME}: run `backdoorlab sweep GRID --output {output}` first")
    with ResultStore(output) as store:
        records = store.records()
    write_exports(records, output)
    data_root = data_root or os.environ.get("BACKDOORLAB_DATA")
    grids = list(dict.fromkeys(r.grid for r in records))
    sections = [_section(g, [r for r in records if r.grid == g], data_root, gallery) for g in grids]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    path = Path(path) if path is not None else output / REPORT_NAME
    exports = {
        name: Path(os.path.relpath(output / name, path.parent)).as_posix()
        for name in ("results.csv", "results.parquet")
    }
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>backdoorlab report: {_e(output.name)}</title>
<style>{_CSS}</style></head><body>
<h1>backdoorlab report: {_e(output.name)}</h1>
<p class="note">{len(records)} cells in {len(grids)} grid(s) · written {now} by backdoorlab {__version__} ·
exports: <a href="{_e(exports["results.csv"])}">results.csv</a>, <a href="{_e(exports["results.parquet"])}">results.parquet</a></p>
{"".join(sections)}
</body></html>
"""
    path.write_text(page)
    return path

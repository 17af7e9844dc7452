"""Results as rows and tables: one flat row per stored cell, and mean ± std over seeds.

A grid's table has one row per group of cells that differ only in their seed; its columns are the
config fields that vary within the grid (so a table shows exactly what the grid compared), then
the metrics. A cell's health warnings (``Record.warnings``: a collapsed or chance-level model, a
repair that lost too much clean accuracy) travel with it: ``flagged`` and ``warnings`` columns in
the exports, and ``warned`` / ``warnings`` in each summary row, so a flagged number is never shown
as a plain result.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backdoorlab.experiments.store import Record
from backdoorlab.metrics import dumps_json

#: Config fields that do not say what a cell computed, or repeat another field.
HIDDEN_FIELDS = frozenset(
    {
        "seed",
        "data_seed",
        "device",
        "data_root",
        "train.epochs",
        "train.batch_size",
        "train.lr",
        "train.regularizer",
        "train.regularizer_options",
    }
)
#: (metric key, column title), in table order; a column shows where any cell has the metric.
METRIC_COLUMNS = (
    ("suspect_clean_accuracy", "CA before"),
    ("suspect_attack_success_rate", "ASR before"),
    ("clean_accuracy", "CA"),
    ("attack_success_rate", "ASR"),
    ("robust_accuracy", "RA"),
    ("retrieval_attack_success_rate", "retrieval ASR"),
    ("isolation_precision", "isolation precision"),
    ("isolation_recall", "isolation recall"),
    ("isolation_auroc", "isolation AUROC"),
    ("detection_score", "detection score"),
    ("input_auroc", "input AUROC"),
    ("input_tpr", "input TPR"),
    ("input_fpr", "input FPR"),
    ("filtered_clean_accuracy", "filtered CA"),
    ("filtered_attack_success_rate", "filtered ASR"),
)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"attack_options": {"size": 3}}`` -> ``{"attack_options.size": 3}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, dict):
            continue
        else:
            out[name] = value
    return out


def method_label(config: dict[str, Any]) -> str:
    """What defended the model: the defense, ``reg:<regulariser>``, a CLIP cleaning, or ``none``."""
    if config.get("defense"):
        return str(config["defense"])
    if config.get("cleaning"):
        return str(config["cleaning"]["method"])
    if config.get("regularizer"):
        return f"reg:{config['regularizer']}"
    return "none"


def export_rows(records: list[Record]) -> list[dict[str, Any]]:
    """One flat row per cell: key, grid, status, seed, ``config.*``, metrics, ``time.*``, error,
    ``flagged`` (whether the cell has health warnings) and ``warnings`` (joined by `` | ``, or empty).
    Values that are lists or mappings become JSON text, so every column has one type."""
    rows = []
    for record in records:
        row: dict[str, Any] = {
            "key": record.key,
            "grid": record.grid,
            "status": record.status,
            "seed": record.seed,
            "version": record.version,
            "attempts": record.attempts,
            "method": method_label(record.config),
        }
        row.update({f"config.{k}": v for k, v in flatten(record.config).items()})
        row.update(
            {k: v for k, v in (record.metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        )
        row.update({f"time.{k}": v for k, v in (record.timings or {}).items()})
        row["model_path"] = record.model_path
        row["error"] = record.error.strip().splitlines()[-1] if record.error else None
        row["flagged"] = bool(record.warnings)
        row["warnings"] = " | ".join(record.warnings) or None
        rows.append({k: dumps_json(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for column in columns:  # a column mixing numbers and text (a count vs a fraction is fine) becomes text
        kinds = {type(row[column]) for row in rows if row.get(column) is not None}
        if str in kinds and len(kinds) > 1:
            for row in rows:
                if row.get(column) is not None:
                    row[column] = str(row[column])
    return [{c: row.get(c) for c in columns} for row in rows]


def write_exports(records: list[Record], directory: str | Path) -> list[Path]:
    """``results.csv`` and ``results.parquet`` (every cell, :func:`export_rows`) in ``directory``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    directory = Path(directory)
    table = pa.Table.from_pylist(export_rows(records))
    paths = [directory / "results.csv", directory / "results.parquet"]
    pacsv.write_csv(table, paths[0])
    pq.write_table(table, paths[1])
    return paths


@dataclass
class Summary:
    """A grid's results: one row per seed group."""

    grid: str
    columns: list[str]  # the varying config fields
    metrics: list[tuple[str, str]]  # (metric key, title) that some cell has
    # {"values": {column: value}, "config", "n", metric: (mean, std), "seconds", "warned": cells with
    # warnings, "warnings": [(text, cells with it)]}
    rows: list[dict[str, Any]]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(grid: str, records: list[Record]) -> Summary:
    """Group a grid's done cells by everything but the seed; mean ± std of each metric (metrics
    stored as ``null``, non-finite when measured, are left out of it); ``warned`` and ``warnings``
    say which cells of a group the health checks flagged, and why."""
    done = [r for r in records if r.status == "done" and r.metrics is not None]
    flat = [{k: v for k, v in flatten(r.config).items() if k not in HIDDEN_FIELDS} for r in done]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    columns = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(flat):
        groups[json.dumps([f.get(c) for c in columns], sort_keys=True, default=str)].append(i)
    metrics = [(k, title) for k, title in METRIC_COLUMNS if any(k in r.metrics for r in done)]  # type: ignore[operator]
    rows = []
    for members in groups.values():
        first = done[members[0]]
        row: dict[str, Any] = {
            "values": {c: flat[members[0]].get(c) for c in columns},
            "config": first.config,
            "n": len(members),
            "seeds": sorted(done[i].seed for i in members),
            "seconds": mean_std([float((done[i].timings or {}).get("total", 0.0)) for i in members])[0],
        }
        for key, _ in metrics:
            found = [done[i].metrics.get(key) for i in members]  # type: ignore[union-attr]
            values = [float(v) for v in found if v is not None]
            row[key] = mean_std(values) if values else None
        details = [done[i].result.get("details", {}) for i in members if done[i].result]
        row["persistence"] = [d["persistence"] for d in details if d.get("persistence")]
        row["persistence_unit"] = next(
            (d.get("persistence_unit", "epoch") for d in details if d.get("persistence")), None
        )
        row["warned"] = sum(bool(done[i].warnings) for i in members)
        texts = [w for i in members for w in dict.fromkeys(done[i].warnings)]
        row["warnings"] = [(text, texts.count(text)) for text in dict.fromkeys(texts)]
        rows.append(row)
    return Summary(grid, columns, metrics, rows)


def format_value(value: Any) -> str:
    """A config value as a table cell."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_metric(value: tuple[float, float] | None, n: int) -> str:
    """``0.953 ± 0.004`` (``0.953`` for one seed; ``—`` where absent)."""
    if value is None:
        return "—"
    mean, std = value
    return f"{mean:.3f}" if n < 2 else f"{mean:.3f} ± {std:.3f}"


def detectability(records: list[Record]) -> list[dict[str, Any]]:
    """The robustness–detectability rows of one grid, where it has the cells for them.

    Detectability: the ROC AUC of a detector's scores on backdoored models (cells with a detector and
    poison rate > 0; a detector scores the suspect model, also in a cell that repairs it) against its
    scores on clean models (poison rate 0) of the same dataset and model, with the one-sided
    Mann-Whitney p-value (``p``; :func:`backdoorlab.metrics.detection_auroc`). Robustness: the ASR of
    the same attack and rate before and after a repair (cells with a repair defense; ``ca_repaired``
    the CA after it), where the grid has them; each suspect model (seed) counts once. ``warned``: how
    many of the row's cells (scored, or repaired) carry health warnings.
    """
    from backdoorlab.metrics import detection_auroc

    done = [r for r in records if r.status == "done" and r.metrics]
    scores: dict[tuple, list[float]] = defaultdict(list)
    scored: dict[tuple, set[str]] = defaultdict(set)  # as ``scores``: the cells behind them
    suspect_asr: dict[tuple, dict[int, float]] = defaultdict(dict)  # by seed: one value per suspect model
    repaired: dict[tuple, list[tuple[float, float]]] = defaultdict(list)  # (ASR, CA) after the repair
    repaired_cells: dict[tuple, set[str]] = defaultdict(set)
    repairs: dict[tuple, str] = {}
    warned = {r.key for r in done if r.warnings}
    for r in done:
        c, m = r.config, r.metrics or {}
        rate = float(c["poison_rate"])
        key = (c["dataset"], c["model"], c["attack"], rate)
        suspect = "suspect_attack_success_rate" in m  # a repair or filter: its suspect metrics
        if m.get("detection_score") is not None and (suspect or not c.get("defense")):
            score_key = (c["dataset"], c["model"], c["detector"], c["attack"] if rate else None, rate)
            scores[score_key].append(m["detection_score"])
            scored[score_key].add(r.key)
        if suspect or (m.get("detection_score") is not None and not c.get("defense")):
            suspect_asr[key][r.seed] = m["suspect_attack_success_rate" if suspect else "attack_success_rate"]
        if suspect:
            repaired[key].append((m["attack_success_rate"], m["clean_accuracy"]))
            repaired_cells[key].add(r.key)
            repairs[key] = c["defense"]
    rows = []
    for (dataset, model, detector, attack, rate), values in sorted(scores.items(), key=lambda kv: str(kv[0])):
        clean_keys = [k for k in scores if (k[0], k[1], k[2], k[4]) == (dataset, model, detector, 0.0)]
        clean = [s for k in clean_keys for s in scores[k]]
        if not rate or not clean:
            continue
        auroc, p = detection_auroc(clean, values)
        key = (dataset, model, attack, rate)
        after = repaired.get(key, [])
        cells = scored[dataset, model, detector, attack, rate].union(*(scored[k] for k in clean_keys))
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "attack": attack,
                "poison_rate": rate,
                "detector": detector,
                "auroc": auroc,
                "p": p,
                "n": len(values),
                "n_clean": len(clean),
                "asr": mean_std(list(suspect_asr[key].values()))[0] if suspect_asr.get(key) else None,
                "repair": repairs.get(key),
                "asr_repaired": mean_std([a for a, _ in after])[0] if after else None,
                "ca_repaired": mean_std([ca for _, ca in after])[0] if after else None,
                "warned": len((cells | repaired_cells.get(key, set())) & warned),
            }
        )
    return rows


def detectability_table(rows: list[dict[str, Any]]) -> str:
    """:func:`detectability`'s rows as Markdown: one line per attack and poison rate, the ASR before
    and after the repair, the CA after it, and each detector's AUROC with its p-value in brackets;
    a rate whose cells carry health warnings is marked with the count."""
    detectors = sorted({r["detector"] for r in rows})
    lines_by: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        lines_by[r["dataset"], r["model"], r["attack"], r["poison_rate"]][r["detector"]] = r
    several = len({k[:3] for k in lines_by}) > 1
    head = [*(["dataset", "model", "attack"] if several else []), "poison rate", "models", "ASR before"]
    head += ["ASR after", "CA after", *(f"AUROC {d} (p)" for d in detectors), "warnings"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]

    def number(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    for (dataset, model, attack, rate), by_detector in sorted(
        lines_by.items(), key=lambda kv: (str(kv[0][:3]), kv[0][3])
    ):
        first = next(iter(by_detector.values()))
        cells = [*([dataset, model, attack] if several else []), f"{100 * rate:g}%", str(first["n"])]
        cells += [number(first["asr"]), number(first["asr_repaired"]), number(first["ca_repaired"])]
        for d in detectors:
            r = by_detector.get(d)
            cells.append("—" if r is None else f"{r['auroc']:.2f} ({r['p']:.2g})")
        flagged = max(r["warned"] for r in by_detector.values())
        cells.append(f"{flagged} flagged" if flagged else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The CLIP study's stages, in table order, before its cleanings.
CLIP_STAGES = ("clean", "poisoned")


def clip_study(records: list[Record]) -> list[dict[str, Any]]:
    """The CLIP study's rows (``experiments.clip_study``'s cells; others are left out): one per
    attack and stage (``clean``, ``poisoned``, then each cleaning), with the mean CA, ASR and
    retrieval ASR over its cells (``n``: how many; one per seed), the first cell's cleaning curve
    (``curve``: CA and ASR every few steps), and ``warned``: how many carry health warnings."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        if r.status == "done" and r.metrics and r.config.get("kind") == "clip":
            # ClipCellConfig.stage, read from the stored config (the report imports no training code)
            cleaning = r.config.get("cleaning")
            stage = cleaning["method"] if cleaning else "clean" if not float(r.config["poison_rate"]) else "poisoned"
            groups[(r.config["attack"], stage)].append(r)
    rows = []
    for (attack, stage), members in groups.items():
        row: dict[str, Any] = {"attack": attack, "stage": stage, "n": len(members)}
        for name, key in (
            ("ca", "clean_accuracy"),
            ("asr", "attack_success_rate"),
            ("retrieval_asr", "retrieval_attack_success_rate"),
        ):
            values = [float(m.metrics[key]) for m in members if m.metrics and m.metrics.get(key) is not None]
            row[name] = sum(values) / len(values) if values else None
        row["curve"] = ((members[0].result or {}).get("details") or {}).get("curve") or []
        row["warned"] = sum(bool(m.warnings) for m in members)
        rows.append(row)
    return rows


def clip_study_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per attack, CA / ASR / retrieval ASR of the clean reference, the poisoned
    model and each cleaning (``—`` for a cell not done; ``*`` marks a cell with health warnings)."""
    stages = [*CLIP_STAGES, *dict.fromkeys(r["stage"] for r in rows if r["stage"] not in CLIP_STAGES)]
    header = "| attack | " + " | ".join(f"{s} CA / ASR / r-ASR" for s in stages) + " |"
    lines = [header, "|" + " --- |" * (len(stages) + 1)]
    found = {(r["attack"], r["stage"]): r for r in rows}
    for attack in dict.fromkeys(r["attack"] for r in rows):
        cells = []
        for stage in stages:
            r = found.get((attack, stage))
            if r is None:
                cells.append("—")
                continue
            text = " / ".join("—" if r[k] is None else f"{r[k]:.3f}" for k in ("ca", "asr", "retrieval_asr"))
            cells.append(text + (" *" if r["warned"] else ""))
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

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
    """What defended the model: the defense, ``reg:<regulariser>``, or ``none``."""
    if config.get("defense"):
        return str(config["defense"])
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

    Detectability: the ROC AUC of a detector's scores on backdoored models (cells with a detector,
    no defense, poison rate > 0) against its scores on clean models (poison rate 0) of the same
    dataset and model. Robustness: the ASR of the same attack and rate before and after a repair
    (cells with a repair defense), where the grid has them. ``warned``: how many of the row's cells
    (scored, or repaired) carry health warnings.
    """
    from backdoorlab.metrics import detection_auroc

    done = [r for r in records if r.status == "done" and r.metrics]
    scores: dict[tuple, list[float]] = defaultdict(list)
    detected_asr: dict[tuple, list[float]] = defaultdict(list)  # suspect ASR from detection cells
    repair_asr: dict[tuple, list[float]] = defaultdict(list)  # suspect ASR from repair cells
    repaired: dict[tuple, list[float]] = defaultdict(list)
    repairs: dict[tuple, str] = {}
    flagged_scores: dict[tuple, int] = defaultdict(int)  # as ``scores``: cells with health warnings
    flagged_repairs: dict[tuple, int] = defaultdict(int)  # as ``repaired``
    for r in done:
        c, m = r.config, r.metrics or {}
        rate = float(c["poison_rate"])
        key = (c["dataset"], c["model"], c["attack"], rate)
        if m.get("detection_score") is not None and not c.get("defense"):
            score_key = (c["dataset"], c["model"], c["detector"], c["attack"] if rate else None, rate)
            scores[score_key].append(m["detection_score"])
            flagged_scores[score_key] += bool(r.warnings)
            detected_asr[key].append(m["attack_success_rate"])
        if "suspect_attack_success_rate" in m:
            flagged_repairs[key] += bool(r.warnings)
            repair_asr[key].append(m["suspect_attack_success_rate"])
            repaired[key].append(m["attack_success_rate"])
            repairs[key] = c["defense"]
    rows = []
    for (dataset, model, detector, attack, rate), values in sorted(scores.items(), key=lambda kv: str(kv[0])):
        clean_keys = [k for k in scores if (k[0], k[1], k[2], k[4]) == (dataset, model, detector, 0.0)]
        clean = [s for k in clean_keys for s in scores[k]]
        if not rate or not clean:
            continue
        auroc = detection_auroc(clean, values)[0]
        key = (dataset, model, attack, rate)
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "attack": attack,
                "poison_rate": rate,
                "detector": detector,
                "auroc": auroc,
                "n": len(values),
                "n_clean": len(clean),
                "asr": mean_std(detected_asr.get(key) or repair_asr[key])[0]
                if key in detected_asr or key in repair_asr
                else None,
                "repair": repairs.get(key),
                "asr_repaired": mean_std(repaired[key])[0] if repaired.get(key) else None,
                "warned": flagged_scores[dataset, model, detector, attack, rate]
                + sum(flagged_scores[k] for k in clean_keys)
                + flagged_repairs.get(key, 0),
            }
        )
    return rows

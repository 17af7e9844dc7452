"""The results store: every cell of every sweep in one SQLite file, ``OUTPUT/results.sqlite``.

One row per cell, keyed by :func:`~backdoorlab.experiments.grid.cell_key`: the resolved config,
seed, package version, status (``pending``, ``running``, ``done``, ``failed``), attempts, the
result's metrics and timings (and the whole ``result.json`` document), the error text of a failed
cell, the saved model's path, and times. Each change is one transaction in write-ahead-log mode, so
a sweep killed at any moment leaves the file consistent and loses no finished cell; rows it left
``running`` are run again by the next sweep.

JSON columns hold finite numbers only (NaN and infinities are stored as ``null``, see
:func:`backdoorlab.metrics.dumps_json`), so SQLite's ``json_extract`` works on every row. A done
cell's health warnings are in its result document: ``json_extract(result, '$.warnings')``, or
:attr:`Record.warnings`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from backdoorlab import __version__
from backdoorlab.metrics import dumps_json

STORE_NAME = "results.sqlite"
SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    grid TEXT NOT NULL,
    position INTEGER NOT NULL,
    label TEXT NOT NULL,
    config TEXT NOT NULL,
    seed INTEGER NOT NULL,
    version TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    metrics TEXT,
    timings TEXT,
    result TEXT,
    error TEXT,
    model_path TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS cells_status ON cells (status);
"""


class StoreError(RuntimeError):
    """A store file that is not a backdoorlab store, or of another schema version."""


@dataclass(frozen=True)
class Record:
    """One row of the store."""

    key: str
    grid: str
    position: int
    label: str
    config: dict[str, Any]
    seed: int
    version: str
    status: str
    attempts: int
    metrics: dict[str, Any] | None
    timings: dict[str, float] | None
    result: dict[str, Any] | None
    error: str | None
    model_path: str | None
    started: float | None
    finished: float | None

    @property
    def warnings(self) -> list[str]:
        """The health warnings of a done cell's result (:class:`~backdoorlab.experiments.run.RunResult`);
        empty for a healthy cell, a cell not done, or a result stored before warnings existed."""
        return [str(w) for w in ((self.result or {}).get("warnings") or [])]


def _loads(text: str | None, where: str = "a store row") -> Any:
    """A JSON column's value; a :class:`StoreError` naming ``where`` (the file, the cell and the
    column) for text that is not valid JSON."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError) as err:
        raise StoreError(f"{where} is not valid JSON ({err}); fix or delete that row to go on") from None


class ResultStore:
    """An SQLite results store (created if absent) at ``path``: a file, or a folder (a path without
    a suffix) that holds ``results.sqlite``. Safe to read while a sweep writes to it."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir() or not path.suffix:  # an output folder, existing or to be made
            path = path / STORE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{path} is not a backdoorlab results store: {err}") from None
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{path}: store schema {row[0]}, this version reads {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        # Copy the write-ahead log into the file now, not when the sweep ends: a store committed to
        # git (or copied) while a sweep runs holds every finished cell without its -wal file
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, grid: str, cells: Iterable[Any]) -> int:
        """Add cells (:class:`~backdoorlab.experiments.grid.Cell`) not yet stored, as pending;
        return how many were new."""
        now = time.time()
        rows = [
            (c.key, grid, i, c.label, json.dumps(c.config.to_dict()), c.config.seed, __version__, now)
            for i, c in enumerate(cells)
        ]
        with self._transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO cells (key, grid, position, label, config, seed, version, status, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                rows,
            )
            return db.total_changes - before

    def start(self, key: str) -> None:
        """Mark a cell running (one more attempt)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE cells SET status = 'running', attempts = attempts + 1, started = ?, error = NULL WHERE key = ?",
                (time.time(), key),
            )

    def finish(self, key: str, result: dict[str, Any], model_path: str | None = None) -> None:
        """Store a cell's result (a ``RunResult.to_dict()``) and mark it done."""
        with self._transaction() as db:
            db.execute(
                "UPDATE cells SET status = 'done', metrics = ?, timings = ?, result = ?, model_path = ?, "
                "version = ?, finished = ?, error = NULL WHERE key = ?",
                (
                    dumps_json(result["metrics"]),
                    dumps_json(result["timings"]),
                    dumps_json(result),
                    model_path,
                    result.get("version", __version__),
                    time.time(),
                    key,
                ),
            )

    def fail(self, key: str, error: str) -> None:
        """Record a cell's error and mark it failed."""
        with self._transaction() as db:
            db.execute(
                "UPDATE cells SET status = 'failed', error = ?, finished = ? WHERE key = ?", (error, time.time(), key)
            )

    def release(self, keys: Iterable[str]) -> None:
        """Put running cells back to pending (a sweep that stops before they finish)."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE cells SET status = 'pending' WHERE key = ? AND status = 'running'", [(k,) for k in keys]
            )

    def status(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        """key -> status, for ``keys`` (default: every cell)."""
        rows = self._fetch("SELECT key, status FROM cells")
        wanted = None if keys is None else set(keys)
        return {k: s for k, s in rows if wanted is None or k in wanted}

    def records(self, status: str | None = None, grid: str | None = None) -> list[Record]:
        """Every stored cell (in grid order), optionally only those of one status or grid."""
        columns = [f.name for f in fields(Record)]  # the table's columns, in Record's order
        query = f"SELECT {', '.join(columns)} FROM cells"
        clauses, params = [], []
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"unknown status '{status}'; valid: {', '.join(STATUSES)}")
            clauses.append("status = ?")
            params.append(status)
        if grid is not None:
            clauses.append("grid = ?")
            params.append(grid)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY created, position"
        out = []
        for row in self._fetch(query, params):
            values = dict(zip(columns, row))
            where = f"{self.path}: cell {values['key']}'s {{}}"
            for column in ("config", "metrics", "timings", "result"):
                values[column] = _loads(values[column], where.format(column))
            if not isinstance(values["config"], dict):
                raise StoreError(f"{where.format('config')} is not a JSON object; fix or delete that row to go on")
            out.append(Record(**values))
        return out

    def _fetch(self, query: str, params: list[Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """All rows of a read query; a damaged file (a malformed page) raises a :class:`StoreError`
        that names it instead of SQLite's bare error."""
        try:
            return self._db.execute(query, params).fetchall()
        except sqlite3.DatabaseError as err:
            raise StoreError(
                f"{self.path}: cannot read the store ({err}); restore it from a copy or start a new one"
            ) from None

"""Files that a run writes and a later run resumes from: written whole or not at all, read back
with errors that name the file, and reused only when they were made with what is asked for.

- :func:`atomic_path` (and :func:`write_text`, :func:`write_bytes`, :func:`write_json` on it):
  write to a temporary file in the target's folder, then ``os.replace`` it over the target, so a
  crash or an exception mid-write leaves the old file (or none), never a truncated one.
- :func:`read_json`: a missing, truncated or invalid JSON file raises :class:`CorruptFileError`
  (a ``ValueError``), one line with the file's path and what is wrong.
- :func:`differences` and :class:`ResumeMismatchError`: a stored config against the one asked for,
  field by field, for the refusal that names what differs.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class CorruptFileError(ValueError):
    """An input file that exists but cannot be read as what it should be (truncated, not JSON...)."""


class ResumeMismatchError(ValueError):
    """A stored file made with another config than the one asked for: it is not reused."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without an
    exception, the temporary file (flushed to disk) replaces ``path`` in one ``os.replace``;
    otherwise it is removed and ``path`` is left as it was. The folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # the data reaches the disk before the name points at it
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` as JSON (with a final newline) to ``path`` atomically; return ``path``.
    Non-finite floats are written as ``null`` (:func:`backdoorlab.metrics.dumps_json`), never as
    the ``NaN`` that strict JSON readers and SQLite's ``json_extract`` refuse."""
    from backdoorlab.metrics import dumps_json

    return write_text(path, dumps_json(value, indent=indent) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON content of ``path``; a :class:`CorruptFileError` naming the file where it cannot be
    read or is not valid JSON (a truncated write of an older version, a hand edit...)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: cannot be read ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptFileError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}; truncated or corrupt): "
            "remove it to compute it again"
        ) from None


def read_json_object(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """:func:`read_json` of a file that must hold an object with the ``required`` keys."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise CorruptFileError(
            f"{path}: expected a JSON object, found {type(value).__name__}: remove it to compute it again"
        )
    missing = [key for key in required if key not in value]
    if missing:
        raise CorruptFileError(f"{path}: no {', '.join(repr(k) for k in missing)} in it: remove it to compute it again")
    return value


def differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Where ``stored`` and ``wanted`` (JSON-like values) differ, as ``"field stored -> wanted"``
    lines; nested mappings are compared key by key with dotted names (``train.lr``), a key missing
    on one side shows as ``<none>``. Tuples and lists compare alike."""
    stored, wanted = _plain(stored), _plain(wanted)
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for key in [*stored, *(k for k in wanted if k not in stored)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            out += differences(stored.get(key, _MISSING), wanted.get(key, _MISSING), name)
        return out
    if stored == wanted:
        return []
    return [f"{prefix or 'value'} {_short(stored)} -> {_short(wanted)}"]


def mismatch_error(path: str | Path, found: list[str], what: str = "a result") -> ResumeMismatchError:
    """The one-line refusal to reuse ``path``, naming the differing fields (``found``, from
    :func:`differences`; the first six)."""
    shown = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
    return ResumeMismatchError(
        f"{path} holds {what} of another config (stored -> asked: {shown}); use another output folder or remove it"
    )


class _Missing:
    def __repr__(self) -> str:
        return "<none>"


_MISSING = _Missing()


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), ``_MISSING`` kept."""
    if value is _MISSING:
        return value
    return json.loads(json.dumps(value, default=str))


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

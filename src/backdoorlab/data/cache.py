"""A disk cache of decoded tensors, so 50k images are decoded once per source file.

The cache lives in ``$BACKDOORLAB_CACHE`` (default ``~/.cache/backdoorlab``). An entry's key is the
source file's absolute path, size and modification time, plus a format version; a changed file gets
a new entry. Entries are written atomically (temporary file, then rename), so an interrupted
decode never leaves a broken entry behind. :func:`cached_by_key` keeps anything else that is costly
to build under a key of the caller's (a fitted attack's networks, keyed by their data and options).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

FORMAT_VERSION = 1


def cache_dir() -> Path:
    """The toolkit's cache folder (created on demand)."""
    root = os.environ.get("BACKDOORLAB_CACHE") or Path.home() / ".cache" / "backdoorlab"
    return Path(root)


def cached(source: Path, tag: str, build: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Return ``build()``'s dict of tensors and strings, cached on disk against ``source``."""
    stat = source.stat()
    return cached_by_key(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}", tag, build)


def cached_by_key(key: str, tag: str, build: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Return ``build()``'s dict of tensors and strings, cached on disk under ``key`` (any string
    that names everything the value depends on; it is hashed with the format version)."""
    digest = hashlib.sha256(f"{key}|{FORMAT_VERSION}".encode()).hexdigest()[:16]
    entry = cache_dir() / f"{tag}-{digest}.pt"
    if entry.exists():
        try:
            return torch.load(entry, weights_only=True)
        except Exception:  # a truncated or foreign file: rebuild it
            entry.unlink(missing_ok=True)
    value = build()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_suffix(f".tmp{os.getpid()}")
    torch.save(value, tmp)
    os.replace(tmp, entry)
    return value

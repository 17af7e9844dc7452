"""Progress: rich bars on a terminal; plain log lines where output is not one.

On an interactive terminal, long work draws a bar. Elsewhere (nohup, a batch scheduler, CI, a
notebook's captured output) the same status goes to the ``backdoorlab`` logger as one INFO line
per status change, at most one per task every :data:`LOG_EVERY` seconds and always its last one
(``training: epoch 3/8 loss 0.412 acc 0.871 (24/64, 41 s)``: status, steps done of all, time). The command line sends those lines to
stderr (:func:`log_to_stderr`); a library user turns them on with ``logging.basicConfig(level=logging.INFO)``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

log = logging.getLogger("backdoorlab")

#: Seconds between two log lines of one task (its last status is always logged).
LOG_EVERY = 5.0


def _setting() -> bool | None:
    """``BACKDOORLAB_PROGRESS``: ``False`` for 0/false/no/empty, ``True`` for anything else, ``None`` unset."""
    setting = os.environ.get("BACKDOORLAB_PROGRESS")
    return None if setting is None else setting not in ("0", "false", "no", "")


def progress_enabled() -> bool:
    """Bars show on an interactive terminal unless ``BACKDOORLAB_PROGRESS=0``."""
    setting = _setting()
    return sys.stderr.isatty() if setting is None else setting


class _LoggedProgress(Progress):
    """A rich Progress that, where its bar is not drawn, logs each task's status instead."""

    def __init__(self, *columns: Any, log_lines: bool, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._log_lines = log_lines
        self._logged: dict[Any, tuple[float, str]] = {}  # task -> (time, status) of its last line

    def update(self, task_id: Any, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if self._log_lines and kwargs.get("status"):
            last_time, _ = self._logged.get(task_id, (-LOG_EVERY, ""))
            if time.monotonic() - last_time >= LOG_EVERY:
                self._log(task_id)

    def _log(self, task_id: Any) -> None:
        task = next(t for t in self.tasks if t.id == task_id)
        status = task.fields.get("status", "")
        steps = f"{task.completed:g}/{task.total:g}" if task.total else f"{task.completed:g}"
        log.info("%s: %s (%s, %.0f s)", task.description, status, steps, task.elapsed or 0.0)
        self._logged[task_id] = (time.monotonic(), status)

    def stop(self) -> None:
        super().stop()
        if self._log_lines:
            for task in self.tasks:
                if task.fields.get("status") and self._logged.get(task.id, (0, None))[1] != task.fields["status"]:
                    self._log(task.id)


def make_progress(enabled: bool = True) -> Progress:
    """A rich Progress with the toolkit's columns, drawing on stderr (off when not ``enabled``);
    where ``enabled`` but the bar is not drawn, its status goes to the log instead."""
    from rich.console import Console

    drawn = enabled and progress_enabled()
    return _LoggedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not drawn,
        log_lines=enabled and not drawn and _setting() is not False,
    )


def log_to_stderr() -> None:
    """Send the ``backdoorlab`` logger's INFO lines to stderr with a time stamp where no progress
    bar is drawn (what the command line does; on a terminal the bars show the same)."""
    if progress_enabled() or _setting() is False:
        return
    for handler in [h for h in log.handlers if getattr(h, "backdoorlab_stderr", False)]:
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.backdoorlab_stderr = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def progress_bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a progress bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)

"""Sweeps: run a grid's cells on an executor, storing each result as it finishes.

``sweep(grid, output)`` adds the grid's cells to ``output/results.sqlite``, skips those already
done (and failed ones unless ``retry_failed``), and runs the rest, at most ``executor.capacity`` at
a time. A cell that raises is stored as failed with its traceback and the sweep goes on; Ctrl-C or
SIGTERM stops the running cells and puts them back to pending, so rerunning the same command
resumes. One sweep at a time may write to an output folder (a lock file says so).

A cell whose training diverges raises (``TrainingDivergedError``) and is stored as failed with that
message, never as done; a done cell whose model the health checks flagged keeps its warnings in its
stored result (``Record.warnings``) and counts in ``SweepSummary.warned``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backdoorlab.experiments.executors import Executor, create_executor, run_cell
from backdoorlab.experiments.grid import Cell, Grid, suspect_config, suspect_key
from backdoorlab.experiments.store import ResultStore
from backdoorlab.progress import make_progress

MODELS_DIR = "models"
#: Trained victims shared by the cells that differ only in the repair or detector.
SUSPECTS_DIR = "suspects"


class SweepError(RuntimeError):
    """A sweep that cannot start (another sweep holds the output folder)."""


@dataclass
class SweepSummary:
    """What a sweep did: cells of the grid, done and failed now, skipped (done before), left;
    ``warned``: cells done now whose result carries health warnings (counted in ``done`` too)."""

    total: int
    done: int = 0
    warned: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def left(self) -> int:
        return self.total - self.skipped - self.done - self.failed


@contextmanager
def _output_lock(output: Path) -> Iterator[None]:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / ".sweep.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep is writing to {output}; wait for it or use another --output") from None
        handle.write(str(os.getpid()))
        handle.flush()
        yield


@contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """Let ``kill`` (SIGTERM) stop a sweep as Ctrl-C does, and SIGINT too where the shell started
    the sweep with it ignored (a background job); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _placed(cell: Cell, device: str | None, data_root: str | None) -> dict[str, Any]:
    """The config a worker gets: the cell's, run where asked (placement is not part of its key)."""
    config = cell.config
    root = data_root or config.data_root or os.environ.get("BACKDOORLAB_DATA")
    return replace(config, device=device or config.device, data_root=root).to_dict()


def sweep(
    grid: Grid,
    output: str | Path,
    *,
    executor: Executor | str = "local",
    workers: int | None = None,
    retry_failed: bool = False,
    save_models: bool = False,
    device: str | None = None,
    data_root: str | None = None,
    on_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
) -> SweepSummary:
    """Run ``grid`` into ``output`` (its ``results.sqlite``, and ``models/<key>.safetensors`` with
    ``save_models``). Cells that differ only in the repair or detector share one trained victim
    (``suspects/<suspect key>.safetensors``): the first trains it, the others wait for it and reuse it.
    A repair or detector cell keeps its victim there even alone, for one added to the grid later.
    ``device`` and ``data_root`` say where cells run without changing their keys.
    ``on_cell(cell, outcome)`` is called as each cell ends (``outcome`` as :func:`run_cell`'s).
    Returns a summary; ``summary.interrupted`` after Ctrl-C or SIGTERM."""
    output = Path(output)
    started = time.perf_counter()
    with _output_lock(output), ResultStore(output) as store:
        store.add(grid.name, grid.cells)
        status = store.status(cell.key for cell in grid.cells)
        store.release(k for k, s in status.items() if s == "running")  # left by a sweep that was killed
        wanted = {"pending", "running"} | ({"failed"} if retry_failed else set())
        todo = [cell for cell in grid.cells if status[cell.key] in wanted]
        summary = SweepSummary(total=len(grid.cells), skipped=len(grid.cells) - len(todo))
        if not todo:
            if not isinstance(executor, str):
                executor.shutdown()  # a cluster the caller's executor started is let go
            return summary
        if isinstance(executor, str):
            executor = create_executor(executor, workers=workers)
        if save_models:
            (output / MODELS_DIR).mkdir(exist_ok=True)
        running: dict[Future, Cell] = {}
        unended: set[str] = set()  # marked running in the store and not yet ended there
        queue = list(reversed(todo))
        training: dict[str, Future] = {}  # suspect key -> the running cell that trains it
        keys = [suspect_key(cell.config) for cell in grid.cells]
        # a victim is kept where cells share it, or where its cell repairs or scores it: a repair or
        # detector added to the grid later reuses it instead of training it again
        shared = {
            key
            for cell, key in zip(grid.cells, keys)
            if key is not None and (keys.count(key) > 1 or suspect_config(cell.config) != cell.config)
        }
        if shared:
            (output / SUSPECTS_DIR).mkdir(exist_ok=True)

        def next_cell() -> Cell | None:
            """The next cell whose victim is not being trained by a running cell (it waits for
            that cell, then reuses the victim instead of training it again)."""
            for i in range(len(queue) - 1, -1, -1):
                if suspect_key(queue[i].config) not in training or suspect_key(queue[i].config) not in shared:
                    return queue.pop(i)
            return None

        with make_progress() as progress, _signals_as_interrupt():
            task = progress.add_task(grid.name, total=len(todo), status="")

            def show() -> None:
                text = f"done {summary.done} · failed {summary.failed} · running {len(running)}"
                progress.update(task, completed=summary.done + summary.failed, status=text)

            try:
                while queue or running:
                    while queue and len(running) < executor.capacity and (cell := next_cell()) is not None:
                        unended.add(cell.key)  # before the store, so an interrupt at any point releases it
                        store.start(cell.key)
                        model_file = str(output / MODELS_DIR / f"{cell.key}.safetensors") if save_models else None
                        key = suspect_key(cell.config) if suspect_key(cell.config) in shared else None
                        suspect_file = str(output / SUSPECTS_DIR / f"{key}.safetensors") if key else None
                        future = executor.submit(
                            run_cell, _placed(cell, device, data_root), model_file, executor.threads, suspect_file
                        )
                        running[future] = cell
                        if key and not Path(suspect_file).exists():
                            training[key] = future
                        show()
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    broken = False
                    for future in finished:
                        cell = running.pop(future)
                        training = {k: f for k, f in training.items() if f is not future}
                        try:
                            outcome = future.result()
                        except BrokenProcessPool:
                            broken = True
                            outcome = {"error": "a worker process died while this cell ran (killed, or out of memory)"}
                        except Exception as err:  # noqa: BLE001 - e.g. a Ray task lost with its node
                            outcome = {"error": f"{type(err).__name__}: {err}"}
                        if "error" in outcome:
                            store.fail(cell.key, outcome["error"])
                            summary.failed += 1
                        else:
                            model_path = outcome.get("model_path")
                            relative = str(Path(model_path).relative_to(output)) if model_path else None
                            store.finish(cell.key, outcome["result"], relative)
                            summary.done += 1
                            summary.warned += bool(outcome["result"].get("warnings"))
                        unended.discard(cell.key)
                        if on_cell is not None:
                            on_cell(cell, outcome)
                        show()
                    if broken:
                        executor.restart()
            except KeyboardInterrupt:
                summary.interrupted = True
                executor.shutdown(cancel=True)
                # every cell marked running and not ended, including one between the store and the
                # executor, or one whose result came back but was not yet stored
                store.release(unended)
            else:
                executor.shutdown()
    summary.seconds = time.perf_counter() - started
    return summary

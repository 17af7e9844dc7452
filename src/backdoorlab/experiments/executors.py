"""Where a sweep's cells run: this process, local worker processes, or a Ray cluster.

Each executor runs :func:`run_cell` and hands back a :class:`concurrent.futures.Future`, so the sweep
loop is the same for all three; ``capacity`` is how many cells it runs at once.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol

EXECUTORS = ("local", "inline", "ray")


def run_cell(
    config: dict[str, Any], model_file: str | None = None, threads: int | None = None, suspect_file: str | None = None
) -> dict[str, Any]:
    """Run one cell from its config (``RunConfig.to_dict()``, or a CLIP study cell's, ``kind: clip``:
    :func:`~backdoorlab.experiments.clip_cells.run_clip_cell`); save its model to ``model_file``
    where given. With ``suspect_file`` (``grid.suspect_key``), the cell's trained victim is shared
    with the cells that differ from it only in the repair or detector: read from that file where it
    exists, else trained (as the same config without repair and detector) and written there first.
    Returns ``{"result": result.json document, "model_path": ...}``, or ``{"error": traceback
    text}``: a failing cell never raises, so the sweep records it and goes on."""
    try:
        import torch

        from backdoorlab.experiments.config import RunConfig
        from backdoorlab.experiments.run import run
        from backdoorlab.experiments.saved_model import load_model, save_model

        if threads:
            torch.set_num_threads(threads)
        if config.get("kind") == "clip":
            from backdoorlab.experiments.clip_cells import ClipCellConfig, run_clip_cell

            result = run_clip_cell(ClipCellConfig.from_dict(config), suspect_file, model_file)
            return {"result": result, "model_path": model_file}
        config_object = RunConfig.from_dict(config)
        if suspect_file is None:
            result = run(config_object)
        else:
            from backdoorlab.experiments.grid import suspect_config

            victim = suspect_config(config_object)
            reused = os.path.exists(suspect_file)
            if reused:
                suspect, _ = load_model(suspect_file)
            else:
                trained = run(victim)
                save_model(suspect_file, trained.model, victim)
                suspect = trained.model
            result = trained if not reused and victim == config_object else run(config_object, suspect=suspect)
            result.details["suspect"] = {"file": os.path.basename(suspect_file), "reused": reused}
        if model_file is not None:
            save_model(model_file, result.model, config_object)
        return {"result": result.to_dict(), "model_path": model_file}
    except Exception:  # noqa: BLE001 - any failure of a cell is recorded with its traceback
        return {"error": traceback.format_exc()}


class Executor(Protocol):
    """Runs functions somewhere and returns futures."""

    capacity: int
    #: torch threads each cell should use (None: torch's default).
    threads: int | None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future: ...

    def restart(self) -> None:
        """Replace workers that died (after a ``BrokenProcessPool``)."""

    def shutdown(self, cancel: bool = False) -> None:
        """Stop; with ``cancel``, stop running cells too."""


class InlineExecutor:
    """Runs each cell in this process, one at a time (debugging, tests)."""

    capacity = 1
    threads = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def restart(self) -> None:
        pass

    def shutdown(self, cancel: bool = False) -> None:
        pass


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    """Pool initializer: denormals flushed (:func:`~backdoorlab.training.loop.flush_denormals`), and
    a daemon thread that ends this worker as soon as the process that started
    it is gone (its parent id changes when it dies and the worker is re-parented), so a sweep killed
    with ``kill -9`` leaves no worker training on for minutes. Portable; Linux's
    ``PR_SET_PDEATHSIG`` is not used: it fires when the parent *thread* that started the worker
    ends, which need not be the main thread (the pool starts workers from the submitting thread)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="backdoorlab-parent-watch", daemon=True).start()
    from backdoorlab.training.loop import flush_denormals

    flush_denormals()  # a worker process of ours: before any torch work starts its CPU threads


class LocalExecutor:
    """``workers`` worker processes on this machine (spawned, so CUDA and torch's threads are safe);
    each gets an equal share of the CPU cores as torch threads, or ``OMP_NUM_THREADS`` where set. A
    worker exits within about a second of this process's death, even by ``kill -9``
    (:func:`_watch_parent`)."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.capacity = workers
        # OMP_NUM_THREADS, where set, is each worker's thread count, as for any torch process;
        # a cell whose config sets ``threads`` runs at that instead (``experiments.run``)
        self.threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // workers)
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.capacity,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_watch_parent,
            initargs=(os.getpid(),),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def restart(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    def shutdown(self, cancel: bool = False) -> None:
        processes = list(getattr(self._pool, "_processes", {}).values()) if cancel else []
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
        for process in processes:  # a cancelled sweep does not wait for running cells
            process.terminate()


class RayExecutor:
    """Cells as Ray tasks on the cluster at ``address`` (``None``: start a local one; ``"auto"``:
    the one this machine belongs to). Each cell asks for ``cpus_per_cell`` CPUs and
    ``gpus_per_cell`` GPUs; ``capacity`` defaults to what the cluster can run at once."""

    def __init__(
        self, address: str | None = None, cpus_per_cell: float = 1, gpus_per_cell: float = 0, workers: int | None = None
    ) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError("the Ray executor needs Ray: pip install 'backdoorlab[ray]'") from None
        if cpus_per_cell <= 0 or gpus_per_cell < 0:
            raise ValueError(f"cpus_per_cell must be > 0 and gpus_per_cell >= 0, got {cpus_per_cell}, {gpus_per_cell}")
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        resources = ray.cluster_resources()
        fits = [resources.get("CPU", 0) / cpus_per_cell]
        if gpus_per_cell:
            fits.append(resources.get("GPU", 0) / gpus_per_cell)
        if min(fits) < 1:
            raise RuntimeError(
                f"the Ray cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) cannot fit one "
                f"cell of {cpus_per_cell:g} CPUs and {gpus_per_cell:g} GPUs"
            )
        self.capacity = workers or int(min(fits))
        self.threads = max(1, int(cpus_per_cell))
        self._options = {"num_cpus": cpus_per_cell, "num_gpus": gpus_per_cell, "max_retries": 0}
        self._remote: dict[Callable[..., Any], Any] = {}

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(**self._options)(fn)
        return self._remote[fn].remote(*args).future()

    def restart(self) -> None:
        pass

    def shutdown(self, cancel: bool = False) -> None:
        if self._started:
            self._ray.shutdown()


def create_executor(
    name: str,
    workers: int | None = None,
    address: str | None = None,
    cpus_per_cell: float = 1,
    gpus_per_cell: float = 0,
) -> Executor:
    """An executor by name: ``local`` (``workers`` processes, default 1), ``inline`` or ``ray``."""
    if name == "local":
        return LocalExecutor(workers or 1)
    if name == "inline":
        return InlineExecutor()
    if name == "ray":
        return RayExecutor(address, cpus_per_cell, gpus_per_cell, workers)
    raise ValueError(f"unknown executor '{name}'; valid: {', '.join(EXECUTORS)}")

"""Cells per hour of a sweep at 1 worker x all threads against N workers x fewer threads each.

Runs two small grids through ``backdoorlab sweep`` (a fresh output folder each time, so every
cell trains) once per worker count, letting each worker take an equal share of the cores as
torch threads (the sweep's own rule; ``OMP_NUM_THREADS`` is cleared for the child), and prints
cells per hour. Each measurement is appended to ``--output`` as one JSON line.

- ``small``: 8 cells of the digits default recipe (small CNN, 20 epochs of 1,437 images), seconds each.
- ``large``: 4 cells of MNIST under ``fast`` on 12,000 training images, 2 epochs (airbench, width 24).

Usage (the data folder is needed for ``large``)::

    BACKDOORLAB_DATA=../shared/data python benchmarks/sweep_workers.py --workers 1,2 \
        --output benchmarks/results/sweep_workers.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from backdoorlab.experiments.grid import load_grid

GRIDS = {
    "small": {
        "name": "workers-small",
        "dataset": "digits",
        "attack": ["badnets", "blended"],
        "poison_rate": 0.1,
        "seed": [0, 1, 2, 3],
    },
    "large": {
        "name": "workers-large",
        "dataset": "mnist",
        "recipe": "fast",
        "train_size": 12000,
        "test_size": 2000,
        "epochs": 2,
        "poison_rate": 0.1,
        "seed": [0, 1, 2, 3],
    },
}


def measure(name: str, workers: int) -> dict:
    grid = GRIDS[name]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["BACKDOORLAB_PROGRESS"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "grid.yaml")
        path.write_text(yaml.safe_dump(grid))
        n = len(load_grid(path).cells)
        command = [sys.executable, "-m", "backdoorlab", "sweep", str(path), "--output", str(Path(tmp, "out"))]
        tick = time.perf_counter()
        subprocess.run([*command, "--workers", str(workers)], env=env, check=True, capture_output=True)
        wall = time.perf_counter() - tick
    cores = os.cpu_count() or 1
    return {
        "grid": name,
        "cells": n,
        "workers": workers,
        "threads_per_worker": max(1, cores // workers),
        "wall_s": round(wall, 1),
        "cells_per_hour": round(3600 * n / wall, 1),
        "cores": cores,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default="small,large", help="comma-separated: small, large")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--output", type=Path, help="append each measurement here as a JSON line")
    args = parser.parse_args()
    print("| grid | cells | workers x threads | wall | cells per hour |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.grids.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            row = measure(name, workers)
            print(
                f"| {name} | {row['cells']} | {workers} x {row['threads_per_worker']} | {row['wall_s']} s | "
                f"{row['cells_per_hour']} |",
                flush=True,
            )
            if args.output:
                with args.output.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

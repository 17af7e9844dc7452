"""Train one model per cell and report CA and ASR at each test-time augmentation level, with times.

A cell is a JSON object of ``RunConfig`` fields plus an optional ``train`` object of ``TrainConfig``
overrides. Each finished cell is printed and appended to ``--output`` as one JSON line, so a
long batch keeps what it finished. docs/benchmarks.md's recipe tables come from these lines
(benchmarks/results/).

Usage::

    python benchmarks/recipe_cells.py '[{"dataset": "cifar10", "poison_rate": 0, "epochs": 8},
        {"dataset": "cifar10", "attack": "badnets", "recipe": "backdoorbench", "epochs": 20}]' --output cells.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from backdoorlab.evaluation import evaluate_backdoor
from backdoorlab.experiments.config import RunConfig
from backdoorlab.experiments.run import prepare, train_victim


def run_cell(cell: dict) -> dict:
    cell = dict(cell)
    overrides = cell.pop("train", {})
    config = RunConfig(**cell).resolved()
    assert config.train is not None
    config = replace(config, train=replace(config.train, progress=False, **overrides))
    prepared = prepare(config)
    tick = time.perf_counter()
    model, history = train_victim(prepared)
    if prepared.device.type == "cuda":
        torch.cuda.synchronize()
    trained = time.perf_counter()
    row = {**cell, "train": overrides, "train_s": round(trained - tick, 2), "ips": round(history.samples_per_second)}
    levels = (0, 1, 2) if prepared.test_set.inputs.dim() == 4 and prepared.test_set.inputs.shape[1] == 3 else (0,)
    for level in levels:
        metrics = evaluate_backdoor(model, prepared.test_set, prepared.triggered, device=prepared.device, tta=level)
        row[f"ca{level}"] = round(metrics["clean_accuracy"], 4)
        row[f"asr{level}"] = round(metrics["attack_success_rate"], 4)
    row["eval_s"] = round(time.perf_counter() - trained, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cells", help="a JSON list of cells")
    parser.add_argument("--output", default="recipe_cells.jsonl", help="JSON lines file to append to")
    args = parser.parse_args()
    with open(args.output, "a") as out:
        for cell in json.loads(args.cells):
            row = run_cell(cell)
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()

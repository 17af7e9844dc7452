"""How well does Pivotal Tuning's checkpoint rule keep clean accuracy? Repair saved models with
``pivotal_tuning`` while the evaluation records test CA and ASR at each held-out checkpoint (the
persistence curve), then ask which checkpoint each rule would have returned and what it cost:

- ``latest``: the latest checkpoint whose held-out accuracy is within the tolerance of the
  suspect's (the rule Pivotal Tuning uses; reconstructed);
- ``first_drop``: the last checkpoint before the held-out accuracy first falls below that floor
  (early stopping on the same measurements);
- ``last``: the end of the schedule (the reference code's choice).

The rules read the held-out curve only; the test CA and ASR beside them are the evaluation's,
which the repair never sees. Each repair is stored as ``OUTPUT/<name>.json`` and reused. Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/pivotal_checkpoints.py runs/study/suspects/*.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from backdoorlab.cli import parse_options
from backdoorlab.defenses import create_repair
from backdoorlab.defenses.pivotal_tuning import CHECKPOINT_RULES, chosen_checkpoint
from backdoorlab.experiments import load_model
from backdoorlab.experiments.run import apply_repair, prepare


def chosen_steps(held_out: list[dict[str, Any]], tolerance: float) -> dict[str, int]:
    """The step each of Pivotal Tuning's checkpoint rules keeps, from the held-out curve (step 0 is
    the suspect model)."""
    accuracies = [p["accuracy"] for p in held_out]
    return {rule: held_out[chosen_checkpoint(accuracies, tolerance, rule)]["step"] for rule in CHECKPOINT_RULES}


def repaired(model_file: Path, options: dict[str, Any], output: Path) -> dict[str, Any]:
    """The repair's details and metrics for ``model_file``, from ``output`` when stored."""
    name = "_".join(model_file.parts[-3:-1]) or model_file.stem
    path = output / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    suspect, config = load_model(model_file)
    prepared = prepare(config)
    _, metrics, details, seconds = apply_repair(prepared, suspect, "pivotal_tuning", options)
    result = {
        "model": str(model_file),
        "poison_rate": config.poison_rate,
        "seed": config.seed,
        "metrics": metrics,
        "details": details,
        "seconds": round(seconds, 1),
    }
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_files", nargs="+", type=Path)
    parser.add_argument("-d", "--defense-option", action="append", default=[], help="pivotal_tuning option KEY=VALUE")
    parser.add_argument("--output", type=Path, default=Path("runs/pivotal-checkpoints"))
    args = parser.parse_args()
    options = parse_options(args.defense_option)
    tolerance = create_repair("pivotal_tuning", **options).config()["max_accuracy_drop"]  # the repair's own default
    rules = CHECKPOINT_RULES
    header = ["poison rate", "seed", "held-out images", "suspect CA"]
    header += [f"{rule}: {what}" for rule in rules for what in ("step", "CA lost", "ASR")]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lost: dict[str, list[float]] = {rule: [] for rule in rules}
    for model_file in args.model_files:
        result = repaired(model_file, options, args.output)
        details = result["details"]
        curve = {p["checkpoint"]: p for p in details["persistence"]}
        start = curve[0]["clean_accuracy"]
        cells = [
            f"{100 * result['poison_rate']:g}%",
            str(result["seed"]),
            str(details["held_out_size"]),
            f"{start:.3f}",
        ]
        for rule, step in chosen_steps(details["held_out_curve"], tolerance).items():
            point = curve[step]
            lost[rule].append(start - point["clean_accuracy"])
            cells += [str(step), f"{100 * lost[rule][-1]:.1f}", f"{point['attack_success_rate']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    for rule in rules:
        worst, over = max(lost[rule]), sum(x > tolerance + 1e-9 for x in lost[rule])
        print(f"{rule}: worst loss {100 * worst:.1f} points, {over} of {len(lost[rule])} beyond the tolerance")


if __name__ == "__main__":
    main()

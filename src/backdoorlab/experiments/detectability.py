"""The robustness-detectability study of "Pick your Poison" (Lukas & Kerschbaum 2023).

For one attack and a range of poison rates, each backdoored model (several seeds per rate) and
each clean model (poison rate 0, other seeds) is

- **repaired** with Pivotal Tuning (or another repair): its ASR before and after is the attack's
  robustness at that rate;
- **scored** by detectors on the suspect model (CTI, calibrated with that same repair, and Neural
  Cleanse): the ROC AUC of the backdoored models' scores at a rate against the clean models'
  scores is the attack's detectability at that rate.

Every model's numbers are stored as ``OUTPUT/rate-<r>/seed-<s>/result.json`` beside its config
and reused when present, so a study resumes where it stopped. ``summarize`` turns them into one
row per rate; ``plot`` draws detectability against robustness.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sklearn.metrics import roc_auc_score

from backdoorlab import __version__
from backdoorlab.defenses import create_detector
from backdoorlab.defenses.cti import CalibratedTriggerInversion
from backdoorlab.experiments.config import RunConfig
from backdoorlab.experiments.run import _DEFENSE, apply_detector, apply_repair, evaluate, prepare, train_victim


def study_model(
    config: RunConfig, directory: str | Path, *, repair: str = "pivotal_tuning", repair_options: dict[str, Any] | None = None,
    detectors: Sequence[str] = ("cti", "neural_cleanse"), detector_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train one (backdoored or clean) model of ``config``, repair it, score the suspect with each
    detector (``detector_options``: options by detector name, for example ``{"cti": {"batch_size":
    32}}``); store and return ``{"config", "metrics", "scores", "timings"}`` (cached)."""
    detector_options = {name: dict((detector_options or {}).get(name, {})) for name in detectors}
    if {"repair", "repair_options"} & set(detector_options.get("cti", {})):
        raise ValueError(
            "the study calibrates CTI with its own repair: pass repair= and repair_options= to the study, not in detector_options"
        )
    for name in detectors:
        create_detector(name, **detector_options[name])  # a bad name or option fails before any training
    path = Path(directory) / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    repair_options = dict(repair_options or {})
    prepared = prepare(config)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    model, _ = train_victim(prepared)
    timings["train"] = time.perf_counter() - tick
    metrics = {f"suspect_{k}": v for k, v in evaluate(prepared, model).items()}
    # the study needs the repair's end point only: no persistence curve to evaluate
    repaired, after, _, timings["repair"] = apply_repair(prepared, model, repair, repair_options, persistence=False)
    metrics.update({f"repaired_{k}": v for k, v in after.items()})
    scores: dict[str, float] = {}
    for name in detectors:
        tick = time.perf_counter()
        if name == "cti":  # calibrated with the repair just made, instead of repeating it
            cti = CalibratedTriggerInversion(**detector_options[name], repair=repair, repair_options=repair_options)
            seed = prepared.config.seed + _DEFENSE
            scores[name] = cti.calibrated_score(model, repaired, prepared.trusted, device=prepared.device, seed=seed).score
        else:
            scores[name] = apply_detector(prepared, model, name, detector_options[name])[0].score
        timings[name] = time.perf_counter() - tick
    stored = {
        "config": prepared.config.to_dict(), "repair": repair, "repair_options": repair_options, "metrics": metrics,
        "detector_options": detector_options, "scores": scores, "timings": {k: round(v, 2) for k, v in timings.items()},
        "version": __version__,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=2) + "\n")
    return stored


def detectability_study(
    base: RunConfig, rates: Sequence[float], seeds: Sequence[int], clean_seeds: Sequence[int], output: str | Path,
    **options: Any,
) -> dict[float, list[dict[str, Any]]]:  # fmt: skip
    """Run :func:`study_model` for every rate x seed and for ``clean_seeds`` at rate 0; return the
    stored results by rate (0.0 = the clean models). ``options`` go to :func:`study_model`, whose
    checks of the detectors and their options fail before its first model trains."""
    results: dict[float, list[dict[str, Any]]] = {}
    for rate, rate_seeds in [(0.0, clean_seeds), *[(float(r), seeds) for r in rates]]:
        for seed in rate_seeds:
            config = replace(base, poison_rate=rate, seed=seed, defense=None, detector=None)
            directory = Path(output) / f"rate-{rate:g}" / f"seed-{seed}"
            results.setdefault(rate, []).append(study_model(config, directory, **options))
    return results


def summarize(results: dict[float, list[dict[str, Any]]]) -> list[dict[str, float]]:
    """One row per poison rate: mean ASR before / after repair and, per detector, the ROC AUC of
    that rate's scores against the clean models' (1.0: always detected; 0.5: chance)."""
    clean = results[0.0]
    rows = []
    for rate in sorted(r for r in results if r > 0):
        models = results[rate]
        row: dict[str, float] = {
            "poison_rate": rate,
            "models": len(models),
            "asr_before": sum(m["metrics"]["suspect_attack_success_rate"] for m in models) / len(models),
            "asr_after": sum(m["metrics"]["repaired_attack_success_rate"] for m in models) / len(models),
            "ca_after": sum(m["metrics"]["repaired_clean_accuracy"] for m in models) / len(models),
        }
        for name in models[0]["scores"]:
            labels = [0] * len(clean) + [1] * len(models)
            scores = [m["scores"][name] for m in clean] + [m["scores"][name] for m in models]
            row[f"auroc_{name}"] = float(roc_auc_score(labels, scores))
        rows.append(row)
    return rows


def plot(rows: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Detectability (ROC AUC) against robustness (ASR after repair), one point per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.8))
    for key in [k for k in rows[0] if k.startswith("auroc_")]:
        xs, ys = [r["asr_after"] for r in rows], [r[key] for r in rows]
        ax.plot(xs, ys, marker="o", label=key.removeprefix("auroc_"))
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"{100 * r['poison_rate']:g}%", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="ASR after repair (robustness)", ylabel="ROC AUC vs clean models (detectability)", title=title)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

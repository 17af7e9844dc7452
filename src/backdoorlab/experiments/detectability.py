"""The robustness-detectability study of "Pick your Poison" (Lukas & Kerschbaum 2023).

For one attack and a range of poison rates, each backdoored model (several seeds per rate) and
each clean model (poison rate 0, other seeds; by default all on one training subset and trusted
split) is

- **repaired** with Pivotal Tuning (or another repair): its ASR before and after is the attack's
  robustness at that rate;
- **scored** by detectors on the suspect model (CTI, calibrated with that same repair, and Neural
  Cleanse): the ROC AUC of the backdoored models' scores at a rate against the clean models'
  scores is the attack's detectability at that rate.

Every model's numbers are stored as ``OUTPUT/rate-<r>/seed-<s>/result.json`` beside its config,
with the suspect and repaired models, and reused when present, so a study resumes where it stopped
and a detector added later scores the stored models without training them again. ``summarize``
turns them into one row per rate and ``study_table`` into Markdown; the report layer draws them
(:func:`backdoorlab.report.plots.detectability_plot`: detectability against robustness).
``backdoorlab detectability`` runs it from the command line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from backdoorlab import __version__
from backdoorlab.defenses import create_detector
from backdoorlab.defenses.cti import CalibratedTriggerInversion
from backdoorlab.experiments.config import RunConfig
from backdoorlab.experiments.run import (
    Prepared,
    apply_detector,
    apply_repair,
    config_differences,
    evaluate,
    post_training_context,
    prepare,
    train_victim,
)
from backdoorlab.experiments.saved_model import load_model, save_model
from backdoorlab.files import mismatch_error, read_json_object, write_json
from backdoorlab.metrics import detection_auroc


def study_model(
    config: RunConfig,
    directory: str | Path,
    *,
    repair: str = "pivotal_tuning",
    repair_options: dict[str, Any] | None = None,
    detectors: Sequence[str] = ("cti", "neural_cleanse"),
    detector_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train one (backdoored or clean) model of ``config``, repair it, score the suspect with each
    detector (``detector_options``: options by detector name, for example ``{"cti": {"batch_size":
    32}}``); store and return ``{"config", "metrics", "repair_details", "scores", "detector_details",
    "timings"}`` (``repair_details``: the repair's own, such as Pivotal Tuning's chosen step and
    held-out curve).

    The result is stored in ``directory`` with the suspect and repaired models
    (``suspect.safetensors``, ``repaired.safetensors``) and reused: a detector asked for later, or
    with other options, is computed from the stored models without training again. A directory
    that holds another config or repair is refused rather than silently reused."""
    detector_options = {name: dict((detector_options or {}).get(name, {})) for name in detectors}
    if {"repair", "repair_options"} & set(detector_options.get("cti", {})):
        raise ValueError(
            "the study calibrates CTI with its own repair: pass repair= and repair_options= to the study, not in detector_options"
        )
    for name in detectors:
        create_detector(name, **detector_options[name])  # a bad name or option fails before any training
    repair_options = dict(repair_options or {})
    directory = Path(directory)
    path = directory / "result.json"
    if path.exists():
        stored = read_json_object(path, required=_STORED_KEYS)
        _check_same_study(stored, path, config, repair, repair_options)
        stale = [
            n
            for n in detectors
            if n not in stored["scores"] or stored["detector_options"].get(n) != _as_stored(detector_options[n])
        ]
        if not stale:
            return stored
        files = [directory / _SUSPECT, directory / _REPAIRED]
        if not all(f.exists() for f in files):
            raise ValueError(
                f"{path} has no score for {', '.join(stale)} with these options, and no stored models to compute it "
                f"(written by an older version); remove {directory} to train its model again"
            )
        prepared = prepare(config)
        model, repaired = (load_model(f)[0] for f in files)
        scores, details, timings = _score(prepared, model, repaired, stale, detector_options, repair, repair_options)
        stored["scores"].update(scores)
        stored.setdefault("detector_details", {}).update(details)
        stored["timings"].update({k: round(v, 2) for k, v in timings.items()})
        stored["detector_options"].update({n: detector_options[n] for n in stale})
        write_json(path, stored)
        return stored
    prepared = prepare(config)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    model, _ = train_victim(prepared)
    timings["train"] = time.perf_counter() - tick
    metrics = {f"suspect_{k}": v for k, v in evaluate(prepared, model).items()}
    # the study needs the repair's end point only: no persistence curve to evaluate
    repaired, after, repair_details, timings["repair"] = apply_repair(
        prepared, model, repair, repair_options, persistence=False
    )
    metrics.update({f"repaired_{k}": v for k, v in after.items()})
    save_model(directory / _SUSPECT, model, prepared.config)
    save_model(directory / _REPAIRED, repaired, prepared.config)
    scores, details, detector_timings = _score(
        prepared, model, repaired, detectors, detector_options, repair, repair_options
    )
    timings.update(detector_timings)
    stored = {
        "config": prepared.config.to_dict(),
        "repair": repair,
        "repair_options": repair_options,
        "metrics": metrics,
        "repair_details": repair_details,
        "detector_options": detector_options,
        "scores": scores,
        "detector_details": details,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "version": __version__,
    }
    write_json(path, stored)
    return stored


_SUSPECT, _REPAIRED = "suspect.safetensors", "repaired.safetensors"
_STORED_KEYS = ("config", "repair", "repair_options", "metrics", "detector_options", "scores", "timings")


def _check_same_study(
    stored: dict[str, Any], path: Path, config: RunConfig, repair: str, repair_options: dict[str, Any]
) -> None:
    """Refuse a stored result of another config (placement aside; the refusal names the fields that
    differ) or another repair."""
    found = config_differences(stored["config"], config, path)
    if found:
        raise mismatch_error(path, found)
    if (stored["repair"], stored["repair_options"]) != (repair, _as_stored(repair_options)):
        raise ValueError(
            f"{path} holds a result repaired with {stored['repair']} {stored['repair_options']}, not {repair} {repair_options}; "
            "use another output folder or remove it"
        )


def _as_stored(options: dict[str, Any]) -> Any:
    """``options`` as they read back from ``result.json`` (tuples become lists)."""
    return json.loads(json.dumps(options))


def _score(
    prepared: Prepared,
    model: nn.Module,
    repaired: nn.Module,
    detectors: Sequence[str],
    detector_options: dict[str, dict[str, Any]],
    repair: str,
    repair_options: dict[str, Any],
) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, float]]:
    """Each detector's score of the suspect ``model``, its details (CTI's and Neural Cleanse's
    per-class figures) and its seconds; CTI is calibrated with ``repaired`` (the study's repair of
    it) instead of repeating that repair."""
    scores: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for name in detectors:
        tick = time.perf_counter()
        if name == "cti":
            cti = CalibratedTriggerInversion(**detector_options[name], repair=repair, repair_options=repair_options)
            detection = cti.calibrated_score(model, repaired, prepared.trusted, post_training_context(prepared))
        else:
            detection = apply_detector(prepared, model, name, detector_options[name])[0]
        scores[name], details[name] = detection.score, detection.details
        timings[name] = time.perf_counter() - tick
    return scores, details, timings


def detectability_study(
    base: RunConfig,
    rates: Sequence[float],
    seeds: Sequence[int],
    clean_seeds: Sequence[int],
    output: str | Path,
    *,
    data_seed: int | None = 0,
    **options: Any,
) -> dict[float, list[dict[str, Any]]]:
    """Run :func:`study_model` for every rate x seed and for ``clean_seeds`` at rate 0; return the
    stored results by rate (0.0 = the clean models). ``options`` go to :func:`study_model`, whose
    checks of the detectors and their options fail before its first model trains.

    ``data_seed`` (it replaces ``base.data_seed``) draws one training subset and trusted split for
    every model, so clean and backdoored models differ in training seed and poison alone, as the
    paper's clean models do. ``None`` gives each model the split of its own seed; then a detector's
    clean baseline moves with the split (docs/notes/2026-11-23-detectability-study.md: CTI scored clean models 0.51-0.89 on
    four splits) and an AUROC measures the splits the seeds drew as much as the poison."""
    if not (rates and seeds and clean_seeds):
        raise ValueError("a detectability study needs at least one poison rate, one seed and one clean seed")
    models = [
        (rate, seed, replace(base, poison_rate=rate, seed=seed, data_seed=data_seed, defense=None, detector=None))
        for rate, rate_seeds in [(0.0, clean_seeds), *[(float(r), seeds) for r in rates]]
        for seed in rate_seeds
    ]
    for _, _, config in models:  # every model's config is checked before the first one trains
        config.resolved()
    results: dict[float, list[dict[str, Any]]] = {}
    for rate, seed, config in models:
        directory = Path(output) / f"rate-{rate:g}" / f"seed-{seed}"
        results.setdefault(rate, []).append(study_model(config, directory, **options))
    return results


def summarize(results: dict[float, list[dict[str, Any]]]) -> list[dict[str, float]]:
    """One row per poison rate: mean ASR before / after repair and, per detector, the ROC AUC of
    that rate's scores against the clean models' (1.0: always detected; 0.5: chance) with its
    p-value (``p_<detector>``; :func:`backdoorlab.metrics.detection_auroc`), for the detectors
    that scored every model of the rate and every clean one."""
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
        for name in [n for n in models[0]["scores"] if all(n in m["scores"] for m in [*clean, *models])]:
            row[f"auroc_{name}"], row[f"p_{name}"] = detection_auroc(
                [m["scores"][name] for m in clean], [m["scores"][name] for m in models]
            )
        rows.append(row)
    return rows


def study_table(rows: list[dict[str, float]]) -> str:
    """:func:`summarize`'s rows as a Markdown table, each AUROC with its p-value in brackets."""
    detectors = [k.removeprefix("auroc_") for k in rows[0] if k.startswith("auroc_")]
    head = ["poison rate", "models", "ASR before", "ASR after", "CA after", *(f"AUROC {d} (p)" for d in detectors)]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    for r in rows:
        cells = [
            f"{100 * r['poison_rate']:g}%",
            str(r["models"]),
            f"{r['asr_before']:.3f}",
            f"{r['asr_after']:.3f}",
            f"{r['ca_after']:.3f}",
        ]
        cells += [f"{r[f'auroc_{d}']:.2f} ({r[f'p_{d}']:.2g})" for d in detectors]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""Why Pivotal Tuning leaves a backdoor in place: does the trigger's shift in the embedding ride
along with the change Pivotal Tuning makes to the clean class geometry?

Repairs a saved model with ``pivotal_tuning`` (options as ``KEY=VALUE``), then, on the run's test
set, compares the suspect's and the repaired model's penultimate embeddings:

- SLOL's pivot-cosine part at the start and at the returned checkpoint (45 for 10 classes when the
  class geometry is the suspect's; near 0 when the directions between class centroids are
  orthogonal to the suspect's);
- an affine map from the suspect's embeddings to the repaired model's, fitted by least squares on
  clean test images only: its R^2 on the clean images and on the triggered ones, and the repaired
  model's head applied to the mapped triggered embeddings (the ASR that the map alone predicts);
- the cosine between the trigger's mean shift (triggered minus clean embedding) in the two models,
  and the share of the suspect's shift (squared norm) that lies in the span of the differences
  between its clean class centroids, the subspace whose directions SLOL's pivot-cosine part sees.

This is analysis on the evaluation side (it reads the trigger), not part of the defense. Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/pivotal_geometry.py victim.safetensors [-d lr=0.001 ...]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.nn.functional import cosine_similarity

from backdoorlab.cli import parse_options
from backdoorlab.defenses import DefenseContext, create_repair
from backdoorlab.experiments import load_model
from backdoorlab.experiments.run import evaluate, prepare
from backdoorlab.training.loop import predict_logits


def affine_fit(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares ``A`` with ``[source, 1] @ A ~ target``."""
    return torch.linalg.lstsq(with_bias(source), target).solution


def with_bias(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z, torch.ones(len(z), 1)], 1)


def share_in_class_span(shift: torch.Tensor, z: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``shift``'s squared norm in the span of the class-centroid differences of ``z``."""
    centroids = torch.stack([z[labels == k].mean(0) for k in labels.unique()])
    basis, _ = torch.linalg.qr((centroids[1:] - centroids[0]).T)
    return float((basis.T @ shift).norm() ** 2 / shift.norm() ** 2)


def r_squared(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(1 - ((prediction - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_file")
    parser.add_argument("-d", "--defense-option", action="append", default=[], help="pivotal_tuning option KEY=VALUE")
    args = parser.parse_args()
    suspect, config = load_model(args.model_file)
    prepared = prepare(config)
    assert config.train is not None
    repair = create_repair("pivotal_tuning", **parse_options(args.defense_option))
    outcome = repair.repair(suspect, prepared.trusted, DefenseContext(config.train, prepared.device, config.seed))
    repaired = outcome.model
    test, triggered = prepared.test_set, prepared.triggered
    clean_index = prepared.config.poison_spec().evaluation_candidates(test.labels)

    def embed(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return predict_logits(model, inputs, device=prepared.device, pre_logits=True).flatten(1)

    z_suspect, z_repaired = embed(suspect, test.inputs), embed(repaired, test.inputs)
    t_suspect, t_repaired = embed(suspect, triggered.inputs), embed(repaired, triggered.inputs)
    a = affine_fit(z_suspect, z_repaired)
    mapped = with_bias(t_suspect) @ a
    with torch.no_grad():
        mapped_asr = (repaired.fc(mapped).argmax(1) == triggered.target_labels).float().mean().item()
    shift_suspect = (t_suspect - z_suspect[clean_index]).mean(0)
    shift_repaired = (t_repaired - z_repaired[clean_index]).mean(0)
    curve = outcome.details["held_out_curve"]
    chosen = next(p for p in curve if p["step"] == outcome.details["chosen_step"])
    report = {
        "suspect": evaluate(prepared, suspect),
        "repaired": evaluate(prepared, repaired),
        "chosen_step": outcome.details["chosen_step"],
        "pivot_cosine": [curve[0]["pivot_cosine"], chosen["pivot_cosine"]],
        "affine_r2_clean": round(r_squared(with_bias(z_suspect) @ a, z_repaired), 3),
        "affine_r2_triggered": round(r_squared(mapped, t_repaired), 3),
        "asr_of_mapped_triggered": round(mapped_asr, 3),
        "shift_cosine": round(float(cosine_similarity(shift_suspect, shift_repaired, dim=0)), 3),
        "shift_in_class_span": round(share_in_class_span(shift_suspect, z_suspect, test.labels), 3),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""The CleanCLIP-versus-PAR study (Singh, Croce, Hein 2024) as one command.

Protocol (reconstructed at CPU scale; PAR fine-tunes a pretrained CLIP on poisoned web pairs, then
cleans it on clean pairs):

1. caption a labelled image dataset with CLIP's templates and split its training set into two
   disjoint parts: ``train_size`` pairs to train on (a ``poison_rate`` of them get the trigger and a
   target-class caption) and ``clean_size`` trusted clean pairs for cleaning; ``test_size`` test
   images give zero-shot CA and ASR;
2. train a clean reference model on the unpoisoned training pairs (once; its CA, and its ASR per
   trigger, are the baseline);
3. for each attack, train a model from the pretrained towers on the poisoned pairs, then clean a copy
   of it with each method (fine-tuning, CleanCLIP, PAR) on the same clean pairs for the same number
   of steps, recording CA and ASR every ``eval_every`` steps.

Learning rates: the official ones (CleanCLIP 1e-5; PAR 3e-5 → 3e-6) are for fine-tuning a whole
CLIP on 100k–250k pairs. Here ``clean_lr`` is the peak rate of fine-tuning and CleanCLIP, and PAR
keeps its code's ratios to CleanCLIP's rate: start at 3 × ``clean_lr``, reach 0.3 × ``clean_lr``
half-way, cosine to 1e-9. Each method keeps its own optimiser settings (CleanCLIP: AdamW wd 0.1,
50 warm-up steps; PAR: betas (0.9, 0.98), wd 1e-4).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from backdoorlab.attacks.triggers import ATTACKS
from backdoorlab.clip.cleanings import Cleaning, create_cleaning
from backdoorlab.clip.evaluate import evaluate_zero_shot
from backdoorlab.clip.models import ClipModel, create_clip_model
from backdoorlab.clip.pairs import ImageTextPairs, pairs_from_dataset, poison_pairs
from backdoorlab.clip.training import ClipTrainConfig, fit_clip
from backdoorlab.data.dataset import seeded_permutation, subsample
from backdoorlab.data.sources import load_dataset
from backdoorlab.files import (
    CorruptFileError,
    ResumeMismatchError,
    atomic_path,
    differences,
    mismatch_error,
    read_json_object,
    write_json,
)

#: PAR's structured triggers and the two random ones it compares with.
STUDY_ATTACKS = ("badnet_stripes", "blended_triangles", "blended_text", "badnet_rand", "blended_rand")
CLEANINGS = ("fine_tuning", "cleanclip", "par")


@dataclass
class ClipStudyConfig:
    """Sizes, schedules and seeds of the study (defaults: the run of docs/clip.md)."""

    dataset: str = "cifar10"
    data_root: str | None = None
    model: str = "lit"
    model_options: dict[str, Any] = field(default_factory=dict)
    attacks: tuple[str, ...] = STUDY_ATTACKS
    cleanings: tuple[str, ...] = CLEANINGS
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: int = 0
    poison_rate: float | int = 0.1
    train_size: int = 10000
    clean_size: int = 2500
    test_size: int = 1000
    train: ClipTrainConfig = field(default_factory=lambda: ClipTrainConfig(epochs=5, lr=2e-3, warmup_steps=10))
    clean_epochs: float = 2.0
    clean_lr: float = 2e-4
    clean_batch_size: int = 128
    eval_every: int = 10
    par_threshold: float = 2.15
    seed: int = 0
    device: str = "auto"

    def cleaning(self, method: str) -> Cleaning:
        """The registered cleaning ``method`` (:data:`~backdoorlab.clip.cleanings.CLIP_CLEANINGS`),
        PAR with this study's ``par_threshold``; an unknown name lists the valid ones."""
        return create_cleaning(method, **({"threshold": self.par_threshold} if method == "par" else {}))

    def cleaning_recipe(self, method: str) -> ClipTrainConfig:
        """The cleaning recipe of ``method``: the shared one (``clean_epochs``, ``clean_batch_size``,
        ``clean_lr``) as the method changes it (see the module docstring)."""
        shared = ClipTrainConfig(epochs=self.clean_epochs, batch_size=self.clean_batch_size, lr=self.clean_lr)
        return self.cleaning(method).recipe(shared)

    def validate(self) -> None:
        for attack in self.attacks:
            ATTACKS.get(attack)
        for method in self.cleanings:
            self.cleaning(method)


@dataclass
class StudyData:
    train: ImageTextPairs
    clean: ImageTextPairs
    test: ImageTextPairs


def study_data(config: ClipStudyConfig) -> StudyData:
    """The two disjoint training parts and the test pairs (seeded)."""
    splits = load_dataset(config.dataset, config.data_root)
    order = seeded_permutation(len(splits.train), config.seed)
    sizes = (config.train_size, config.clean_size)
    if sum(sizes) > len(order):
        raise ValueError(f"train + clean sizes ({sum(sizes)}) exceed {config.dataset}'s {len(order)} training images")
    parts, start = [], 0
    for offset, size in enumerate(sizes):
        parts.append(
            pairs_from_dataset(
                splits.train.subset(order[start : start + size].sort().values), seed=config.seed + offset
            )
        )
        start += size
    test = pairs_from_dataset(subsample(splits.test, config.test_size, config.seed), seed=config.seed + 10)
    return StudyData(*parts, test)


def run_clip_study(config: ClipStudyConfig, output: str | Path) -> dict[str, Any]:
    """Run (or resume) the study into ``output``: ``clean.pt`` and ``clean.json`` (the clean
    reference model, its training time and the config fields it depends on), ``attacks/<attack>.json``
    per attack (with the config that made it) and ``clip_study.json`` with every row and curve.

    A file is reused only when it was made with this config (:func:`clean_key`,
    :func:`attack_key`: the fields that file depends on; device and data root aside). Otherwise the
    study stops before any training with a :class:`~backdoorlab.files.ResumeMismatchError` naming
    the file and the fields that differ (use another ``output``, or remove the file); a file it
    cannot read stops it with a :class:`~backdoorlab.files.CorruptFileError` naming the file. Every
    file is written whole or not at all."""
    config.validate()
    output = Path(output)
    clean_path, clean_meta = output / "clean.pt", output / "clean.json"
    attack_paths = {attack: output / "attacks" / f"{attack}.json" for attack in config.attacks}
    for attack, path in attack_paths.items():  # refuse a mismatch before any training
        _check_stored(path, attack_key(config, attack), f"the {attack} results")
    resume_clean = _check_stored(clean_meta, clean_key(config), "a clean reference model") and clean_path.exists()
    data = study_data(config)
    torch.manual_seed(config.seed)  # the projections' initialisation
    clean = create_clip_model(config.model, **config.model_options)
    if resume_clean:
        clean.load_state_dict(_load_state(clean_path))
        clean_seconds = read_json_object(clean_meta, required=("seconds",))["seconds"]
    else:
        start = time.perf_counter()
        fit_clip(
            clean, data.train, config.train, device=config.device, seed=config.seed + 1, description="clean reference"
        )
        clean_seconds = time.perf_counter() - start
        with atomic_path(clean_path) as tmp:
            torch.save(clean.state_dict(), tmp)
        write_json(clean_meta, {"seconds": clean_seconds, "config": clean_key(config)})  # written last: the marker
    rows: list[dict[str, Any]] = [
        {"attack": None, "stage": "clean", **evaluate_zero_shot(clean, data.test), "seconds": clean_seconds}
    ]
    curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    for attack, path in attack_paths.items():
        if not path.exists():
            write_json(
                path, {"config": attack_key(config, attack), **run_attack(config, data, clean, attack)}, indent=1
            )
        record = read_json_object(path, required=("rows", "curves"))
        rows += record["rows"]
        curves[attack] = record["curves"]
    result = {"config": to_jsonable(config), "rows": rows, "curves": curves}
    write_json(output / "clip_study.json", result, indent=1)
    return result


#: Fields of the study config that no stored file depends on (where it runs, where data lives).
_PLACEMENT = ("device", "data_root")
#: The fields the clean reference model depends on.
_CLEAN_FIELDS = ("dataset", "model", "model_options", "train", "train_size", "seed")


def clean_key(config: ClipStudyConfig) -> dict[str, Any]:
    """The config fields that make the clean reference model (stored in ``clean.json``)."""
    values = to_jsonable(config)
    return {name: values[name] for name in _CLEAN_FIELDS}


def attack_key(config: ClipStudyConfig, attack: str) -> dict[str, Any]:
    """The config fields that make one attack's results (stored in ``attacks/<attack>.json``): all
    but placement and the other attacks, with this attack's own options."""
    values = {k: v for k, v in to_jsonable(config).items() if k not in (*_PLACEMENT, "attacks")}
    values["attack"], values["attack_options"] = attack, config.attack_options.get(attack, {})
    return values


def _check_stored(path: Path, key: dict[str, Any], what: str) -> bool:
    """Whether ``path`` exists and was made with ``key``; a :class:`ResumeMismatchError` naming the
    differing fields where it was made with another (or with none stored: an older version)."""
    if not path.exists():
        return False
    stored = read_json_object(path)
    if "config" not in stored:
        raise ResumeMismatchError(
            f"{path} holds {what} with no record of its config (written by an older version); "
            "use another output folder or remove it"
        )
    found = differences(stored["config"], key)
    if found:
        raise mismatch_error(path, found, what)
    return True


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved by the study (tensors only: ``weights_only``, no pickled code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a truncated or foreign file
        reason = " ".join(str(err).split())[:200]
        raise CorruptFileError(
            f"{path}: not a readable model state ({type(err).__name__}: {reason}); remove it to train it again"
        ) from None


def run_attack(config: ClipStudyConfig, data: StudyData, clean: ClipModel, attack: str) -> dict[str, Any]:
    """Train a model on pairs poisoned with ``attack`` and clean it with every method; the clean
    reference model's ASR for the trigger is the first row."""
    trigger = ATTACKS.create(attack, tuple(data.train.images.shape[1:]), **config.attack_options.get(attack, {}))
    poisoned_pairs = poison_pairs(data.train, trigger, rate=config.poison_rate, target=config.target, seed=config.seed)

    def evaluate(model: ClipModel) -> dict[str, float]:
        return evaluate_zero_shot(model, data.test, trigger, config.target, retrieval=True, seed=config.seed)

    rows = [{"attack": attack, "stage": "clean", **evaluate(clean)}]
    torch.manual_seed(config.seed)
    model = create_clip_model(config.model, **config.model_options)
    start = time.perf_counter()
    fit_clip(
        model,
        poisoned_pairs.pairs,
        config.train,
        device=config.device,
        seed=config.seed + 1,
        description=f"poisoned training ({attack})",
    )
    rows.append(
        {
            "attack": attack,
            "stage": "poisoned",
            **evaluate(model),
            "seconds": time.perf_counter() - start,
            "poisoned_pairs": int(poisoned_pairs.mask.sum()),
        }
    )
    curves = {}
    for method in config.cleanings:
        cleaned = copy.deepcopy(model)
        start = time.perf_counter()
        records = fit_clip(
            cleaned,
            data.clean,
            config.cleaning_recipe(method),
            config.cleaning(method).objective(cleaned),
            device=config.device,
            seed=config.seed + 2,
            every=config.eval_every,
            observer=lambda _step, m: evaluate(m),
            description=f"{method} ({attack})",
        )
        final = {k: records[-1][k] for k in ("ca", "asr", "retrieval_asr")}
        rows.append({"attack": attack, "stage": method, **final, "seconds": time.perf_counter() - start})
        curves[method] = records
    return {"rows": rows, "curves": curves}


def to_jsonable(config: ClipStudyConfig) -> dict[str, Any]:
    values = asdict(config)
    values["attacks"], values["cleanings"] = list(config.attacks), list(config.cleanings)
    return values


def study_table(result: dict[str, Any]) -> str:
    """A markdown table: per attack, CA / ASR / retrieval ASR poisoned and after each cleaning."""
    rows = [r for r in result["rows"] if r["attack"]]
    stages = ["clean", "poisoned", *[s for s in CLEANINGS if any(r["stage"] == s for r in rows)]]
    header = "| attack | " + " | ".join(f"{s} CA / ASR / r-ASR" for s in stages) + " |"
    lines = [header, "|" + " --- |" * (len(stages) + 1)]
    for attack in dict.fromkeys(r["attack"] for r in rows):
        cells = []
        for stage in stages:
            r = next((r for r in rows if r["attack"] == attack and r["stage"] == stage), None)
            cells.append("–" if r is None else f"{r['ca']:.3f} / {r['asr']:.3f} / {r['retrieval_asr']:.3f}")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

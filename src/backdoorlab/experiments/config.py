"""The configuration of one attack run.

A :class:`RunConfig` is plain data: it serialises to the ``config`` of every result, and a result
can be rerun from it. Fields left ``None`` take the named recipe's choice for the dataset
(``experiments.recipes``: ``fast`` by default, ``quick``, ``backdoorbench``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import yaml

from backdoorlab.attacks.poisoning import PoisonSpec
from backdoorlab.attacks.triggers import ATTACKS, create_trigger
from backdoorlab.data.sources import dataset_facts, dataset_loader, dataset_modality
from backdoorlab.defenses import DETECTORS, INPUT_DETECTORS, defense_kind, registry_for
from backdoorlab.experiments.config_tree import flat_assignment, from_tree, is_tree, schedule_assignments, to_tree
from backdoorlab.experiments.presets import Preset, preset_for
from backdoorlab.experiments.recipes import (
    DEFAULT_RECIPE,
    StepBudget,
    fallback_warning,
    recipe_for,
    step_budget,
    stretch_schedule,
)
from backdoorlab.models.registry import MODELS, check_input_fits, check_model_options
from backdoorlab.options import OptionError, PositiveInt, check_fields
from backdoorlab.training.loop import TrainConfig, parse_device

#: The default attack for each modality.
DEFAULT_ATTACK = {"image": "badnets", "series": "ts_pattern"}


#: The trusted clean split where neither the config nor its preset sets one.
DEFAULT_TRUSTED_SIZE = 0.01

#: Peak learning rate for models other than the recipe's (whose rates are tuned for its model).
OTHER_MODEL_MAX_LR = 0.05


@dataclass
class RunConfig:
    """One attack run: data, attack, model, training, seed.

    Attributes:
        dataset: a registered dataset name.
        recipe: a registered recipe (``fast``, ``quick``, ``backdoorbench``): the model, model options
            and training schedule the fields below leave open.
        model: a registered model name; ``None`` takes the recipe's.
        model_options: keyword options for the model (merged over the recipe's when the model is
            the recipe's).
        attack: a registered attack (trigger) name; ``None`` takes ``badnets`` for images and
            ``ts_pattern`` for time series.
        attack_options: keyword options for the trigger (``size``, ``alpha``...).
        poison_rate: a fraction in [0, 1] of the training set, or a count (int); 0 is a clean
            baseline (the trigger is still measured on the clean model).
        poison_rate_of: ``train`` (a fractional ``poison_rate`` is of the training set) or
            ``target`` (clean-label only: of the target class's samples; ``1.0`` is the whole
            class, what BackdoorBench's ``pratio: 0.1`` for SIG and label-consistent amounts to on
            CIFAR-10). ``PoisonSpec.rate_of``.
        target: the target class (all-to-one).
        mode: ``all-to-one`` or ``all-to-all``.
        clean_label: poison target-class samples only and keep labels; ``None`` takes the attack's
            default (true for SIG, false otherwise).
        source: poison, and measure ASR on, only this class (``None``: every class).
        epochs, batch_size, lr: override the recipe's training schedule where set. ``epochs`` left
            ``None`` on a ``train_size`` subset takes the recipe's step budget (:meth:`step_budget`).
        train: the full training schedule; ``None`` takes the recipe's (with the overrides above).
        seed: seeds the splits, the poison choice, the model's initialisation and training.
        data_seed: seeds the data alone (the ``train_size`` / ``test_size`` subsamples and the
            trusted split) when set, so that runs with other ``seed`` values train on the same data
            and differ only in poison choice, initialisation and training order; ``None`` (the
            default) takes ``seed``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        train_size, test_size: seeded subsamples of the splits for quick runs (fraction or count).
        preset: a registered preset (``backdoorbench``): another toolkit's attack and defense
            options and trusted-split size, under the options given here (``experiments.presets``).
        trusted_size: the trusted clean split carved from the training set before poisoning
            (fraction or count); only defenses get it, and the victim never trains on it.
        defense: a training-time defense (``abl``...: gets only the poisoned training set, a model
            factory and the recipe), a repair defense (``fine_tuning``, ``pivotal_tuning``...: gets the
            trained model and the trusted split), or ``None``.
        defense_options: keyword options for the defense.
        detector, detector_options: a detector (``neural_cleanse``, ``cti``) that scores, from the
            trusted split, the model under suspicion: the trained model, or in a run with a repair
            or a sample filter the suspect model it was given (CTI calibrates with the run's repair
            where it is the repair CTI would run itself), and its options.
        input_detector, input_detector_options: an input detector (``strip``) fitted on the final
            model and half the trusted split, its threshold set on the other half, then shown the
            clean and triggered test sets (``input_auroc``, ``input_tpr``, ``filtered_*`` metrics).
        persistence_size: a repair's persistence curve (CA, ASR, RA at each of its checkpoints) is
            measured on a seeded subsample of this size (fraction or count) of the clean and of the
            triggered test set; ``None`` (the default) measures it on both whole. The run's final
            metrics always use the whole test sets; a config without a repair resolves it to
            ``None``. For long repairs on large test sets: 100
            epochs of fine-tuning on CIFAR-10 evaluate 19,000 images a hundred times.
        regularizer, regularizer_options: a defensive regulariser of the training loop
            (``logit_squeezing``, ``manifold_mixup``, ``soft_nearest_neighbour``, ``contrastive``)
            and its options; set into the resolved ``train`` recipe.
        data_root: folder with ``<dataset>/{train,test}.parquet`` (default ``$BACKDOORLAB_DATA``).
        threads: torch's CPU threads for the run (``None``: torch's default, which
            ``OMP_NUM_THREADS`` sets); a result stores the count it ran with, so a rerun from it
            uses the same (CPU results differ in the last digits across thread counts).
        deterministic: ``torch.use_deterministic_algorithms`` for the run (``None``: as the process
            has it); stored the same way.

    Sizes (``poison_rate``, ``train_size``, ``test_size``, ``trusted_size``, ``persistence_size``) are a fraction when
    written with a decimal point (``0.1``; ``1.0`` is all) and a count when an integer (``500``);
    ``1`` alone is refused as ambiguous.
    """

    dataset: str = "digits"
    recipe: str = DEFAULT_RECIPE
    model: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    attack: str | None = None
    attack_options: dict[str, Any] = field(default_factory=dict)
    poison_rate: float | int = 0.1
    poison_rate_of: str = "train"
    target: int = 0
    mode: str = "all-to-one"
    clean_label: bool | None = None
    source: int | None = None
    defense: str | None = None
    defense_options: dict[str, Any] = field(default_factory=dict)
    detector: str | None = None
    detector_options: dict[str, Any] = field(default_factory=dict)
    input_detector: str | None = None
    input_detector_options: dict[str, Any] = field(default_factory=dict)
    persistence_size: float | int | None = None
    regularizer: str | None = None
    regularizer_options: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    train: TrainConfig | None = None
    seed: int = 0
    data_seed: int | None = None
    device: str = "auto"
    train_size: float | int | None = None
    test_size: float | int | None = None
    trusted_size: float | int | None = None
    data_root: str | None = None
    threads: PositiveInt | None = None
    deterministic: bool | None = None
    preset: str | None = None

    @property
    def split_seed(self) -> int:
        """The seed of the data's subsamples and trusted split: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def step_budget(self) -> StepBudget | None:
        """The epochs the recipe's step budget gives this config's ``train_size`` subset (more than
        the recipe's, to keep about the full set's optimiser steps; ``experiments.recipes``), or
        ``None`` where the recipe's epochs stand: no subsample, a recipe or dataset without a budget,
        or epochs set here (``epochs`` or a whole ``train``, never scaled; a resolved config has them)."""
        if self.epochs is not None or self.train is not None:
            return None
        check_fields(self, "config field")
        check_size(self.train_size, "train_size")
        return step_budget(self.recipe, self.dataset, self.train_size)

    def recipe_fallback(self, subject: str = "model") -> str | None:
        """The warning that the recipe has no settings for this dataset and lent another's
        (:func:`~backdoorlab.experiments.recipes.fallback_warning`), or ``None``: the recipe has its
        own, or this config sets the model and a schedule (``train``) other than the one lent. A
        resolved config (a sweep's cell) has both set: it warns where its schedule is the lent one."""
        warning = fallback_warning(self.recipe, self.dataset, subject)
        if warning is None or self.model is None or self.train is None:
            return warning
        return warning if replace(self, train=None).resolved().train == self.train else None

    def poison_spec(self) -> PoisonSpec:
        return PoisonSpec(
            rate=self.poison_rate,
            target=self.target,
            mode=self.mode,
            clean_label=bool(self.clean_label),
            source=self.source,
            rate_of=self.poison_rate_of,
        )

    def resolved(self) -> RunConfig:
        """A copy with every default filled in (model, options, training recipe); validates names,
        types and values of every field and option so a bad config fails before any data is
        loaded (``sweep --dry-run`` runs this on every cell)."""
        check_fields(self, "config field")
        dataset_loader(self.dataset)
        parse_device(self.device)
        for name, size in (
            ("poison_rate", self.poison_rate),
            ("train_size", self.train_size),
            ("test_size", self.test_size),
            ("trusted_size", self.trusted_size),
            ("persistence_size", self.persistence_size),
        ):
            check_size(size, name, zero=name == "poison_rate")
        for method in ("defense", "detector", "input_detector", "regularizer"):
            if getattr(self, f"{method}_options") and getattr(self, method) is None:
                a = "an" if method.startswith("input") else "a"
                raise OptionError(
                    f"{method}_options {getattr(self, f'{method}_options')} given without {a} {method}: "
                    f"choose {a} {method} or drop its options"
                )
        facts = dataset_facts(self.dataset)
        modality = dataset_modality(self.dataset)
        attack = self.attack or DEFAULT_ATTACK[modality]
        trigger_class = ATTACKS.get(attack)
        preset = preset_for(self.preset, self.dataset) if self.preset is not None else Preset()
        attack_options = {**preset.attack_options.get(attack, {}), **self.attack_options}
        ATTACKS.check_options(attack, attack_options)
        defense_options = {**preset.defense_options.get(self.defense or "", {}), **self.defense_options}
        # a detector shares its name with a repair (neural_cleanse): it takes the preset's options it has
        detector_preset = preset.defense_options.get(self.detector or "", {})
        if self.detector is not None:
            detector_preset = {k: v for k, v in detector_preset.items() if k in DETECTORS.options(self.detector)}
        detector_options = {**detector_preset, **self.detector_options}
        trusted_size = (
            self.trusted_size if self.trusted_size is not None else preset.trusted_size or DEFAULT_TRUSTED_SIZE
        )
        ATTACKS.check_modality(attack, modality, self.dataset)
        clean_label = trigger_class.clean_label if self.clean_label is None else self.clean_label
        defaults = recipe_for(self.recipe, self.dataset)
        model = self.model or defaults.model
        MODELS.check_modality(model, modality, self.dataset)
        if self.defense is not None:
            registry_for(self.defense).create(self.defense, **defense_options)  # validates name and options
            registry_for(self.defense).check_modality(self.defense, modality, self.dataset)
        if self.detector is not None:
            DETECTORS.create(self.detector, **detector_options)
            DETECTORS.check_modality(self.detector, modality, self.dataset)
        if self.input_detector is not None:
            INPUT_DETECTORS.create(self.input_detector, **self.input_detector_options)
            INPUT_DETECTORS.check_modality(self.input_detector, modality, self.dataset)
        options = (
            {**defaults.model_options, **self.model_options} if model == defaults.model else dict(self.model_options)
        )
        options = check_model_options(model, options)
        if "shape" in facts:
            check_input_fits(model, options, facts["shape"], facts["classes"])
            # the trigger's own checks (patch fits, pattern file present...)
            create_trigger(attack, facts["shape"], data_root=self.data_root, **attack_options)
        train = replace(self.train or defaults.train)
        budget = self.step_budget()
        if budget is not None:
            train = stretch_schedule(train, budget.epochs)
        if self.train is None and model != defaults.model:
            # The recipe's rates are tuned for its model; PreAct-ResNet18 diverged (NaN loss from the
            # first epoch, with and without bf16) at the quick CIFAR-10 recipe's 0.2, trained at 0.05.
            train.lr = min(train.lr, OTHER_MODEL_MAX_LR)
            train.norm_lr_scale = 1.0
        for name in ("epochs", "batch_size", "lr", "regularizer"):
            if getattr(self, name) is not None:
                setattr(train, name, getattr(self, name))
        if self.regularizer is not None:
            train.regularizer_options = dict(self.regularizer_options)
        train.validate()
        repair = self.defense is not None and defense_kind(self.defense) == "repair"
        resolved = replace(
            self,
            persistence_size=self.persistence_size if repair else None,  # only a repair has a curve
            attack=attack,
            attack_options=attack_options,
            defense_options=defense_options,
            detector_options=detector_options,
            trusted_size=trusted_size,
            model=model,
            model_options=options,
            train=train,
            clean_label=clean_label,
            epochs=train.epochs,
            batch_size=train.batch_size,
            lr=train.lr,
        )
        resolved.poison_spec().validate(facts.get("classes"))
        return resolved

    def to_dict(self) -> dict[str, Any]:
        """The flat form (config schema 1): what results store and cell keys hash."""
        out = asdict(self)
        out["train"] = self.train.to_dict() if self.train else None
        return out

    def to_tree(self) -> dict[str, Any]:
        """The tree form (config schema 2, :mod:`~backdoorlab.experiments.config_tree`): sections
        ``data``, ``poison``, ``model``, ``recipe``, ``defense``, ``detector``, ``runtime``..., with
        the fields at their defaults left out. ``from_dict`` reads it back."""
        return to_tree(self.to_dict(), RunConfig().to_dict())

    def with_overrides(self, assignments: Sequence[str]) -> RunConfig:
        """This config with ``path.to.field=value`` overrides applied (:func:`set_path`), as
        ``backdoorlab run --set`` gives them. ``train.*`` refines the schedule the run would train
        with (the recipe's, with ``epochs`` / ``batch_size`` / ``lr`` and the step budget applied)."""
        values = self.to_dict()
        assignments = [flat_assignment(a) for a in assignments]
        if values["train"] is None and any(a.partition("=")[0].startswith("train.") for a in assignments):
            values["train"] = self.resolved().train.to_dict()  # type: ignore[union-attr]
        for assignment in assignments:
            set_path(values, assignment)
        return RunConfig.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Rebuild from :meth:`to_dict`'s output (a stored result's ``config``) or a tree (a config
        file, :meth:`to_tree`'s output). A tree's schedule fields given without the rest change the
        schedule of the config the tree describes, as :meth:`with_overrides` does; to change other
        fields first, take the parts of :func:`~backdoorlab.experiments.config_tree.from_tree` (as
        ``backdoorlab run --config`` does, so that typed flags come before them)."""
        if is_tree(values):
            flat, schedule = from_tree(values)
            config = cls.from_dict(flat)
            return config.with_overrides(schedule_assignments(schedule))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        values = dict(values)
        if isinstance(values.get("train"), dict):
            valid = {f.name for f in fields(TrainConfig)}
            unknown = sorted(set(values["train"]) - valid)
            if unknown:
                raise ValueError(f"unknown train field(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
            values["train"] = TrainConfig(**values["train"])
        return cls(**values)


def set_path(values: dict[str, Any], assignment: str) -> None:
    """Apply one ``path.to.field=value`` override to a config mapping (:meth:`RunConfig.to_dict`'s
    shape, or a grid document) in place; the value is read as YAML (``0.1``, ``true``, ``null``,
    ``[2, 4]``, ``text``). The path is a tree path (``poison.rate``, ``recipe.train.lr``:
    :func:`~backdoorlab.experiments.config_tree.flat_path`) or a flat one, whose first name is a
    :class:`RunConfig` field; deeper names go into its mapping (``train.lr``,
    ``attack_options.size``), which is created where absent."""
    path, sep, raw = flat_assignment(assignment).partition("=")
    keys = path.split(".")
    if not sep or not all(keys):
        raise OptionError(f"--set '{assignment}' is not PATH=VALUE (for example train.lr=0.1, attack_options.size=4)")
    valid = [f.name for f in fields(RunConfig)]
    if keys[0] not in valid:
        raise OptionError(f"--set {path}: unknown config field '{keys[0]}'; valid: {', '.join(valid)}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise OptionError(f"--set {path}: the value {raw!r} is not valid YAML ({err})") from None
    target = values
    for depth, key in enumerate(keys[:-1]):
        child = target.get(key)
        if child is None:
            child = target[key] = {}
        if not isinstance(child, dict):
            raise OptionError(f"--set {path}: '{'.'.join(keys[: depth + 1])}' is {child!r}, not a mapping")
        target = child
    target[keys[-1]] = value
    if (
        len(keys) == 2
        and keys[0] == "train"
        and keys[1] in ("epochs", "batch_size", "lr")
        and values.get(keys[1]) is not None
    ):
        values[keys[1]] = value  # the shortcut would override the schedule it was set in: the later word wins


def check_size(size: float | int | None, what: str, *, zero: bool = False) -> None:
    """Refuse a size that is neither a fraction in (0, 1] (a float) nor a count >= 2 (an int);
    ``1`` alone is ambiguous (one sample, or all?) and refused with the two ways to say it. With
    ``zero``, 0 is allowed (a clean baseline's poison rate)."""
    if size is None or (zero and size == 0):
        return
    if isinstance(size, float) and not 0.0 < size <= 1.0:
        raise OptionError(
            f"{what} {size} is neither a fraction in (0, 1] nor a count (an integer, written without a decimal point)"
        )
    if isinstance(size, int) and size == 1:
        raise OptionError(f"{what} 1 is ambiguous: write 1.0 for the whole split, or a count of 2 or more")
    if isinstance(size, int) and size < 1:
        raise OptionError(f"{what} must be a fraction in (0, 1] or a count >= 2, got {size}")

"""A run config as a tree of sections: the form of config files and of ``--set`` paths.

:class:`~backdoorlab.experiments.config.RunConfig` keeps its fields flat in Python and in stored
results (the results store's cell keys hash that form, so every committed store resumes). People
write and read it as a tree (config schema 2):

```yaml
schema: 2
data: {dataset: cifar10, train_size: 5000, trusted_size: 0.05}
poison: {attack: {name: blended, options: {alpha: 0.2}}, rate: 0.1, target: 0}
model: {name: preact_resnet18}
recipe: {name: fast, schedule: {epochs: 20}, optimiser: {weight_decay: 0.001}}
defense: {name: fine_tuning, options: {epochs: 5}}
runtime: {device: cuda, amp: false}
seed: 0
```

:data:`TREE` says where each flat field sits, and the training schedule's fields
(:class:`~backdoorlab.training.loop.TrainConfig`) are spread over ``recipe.schedule``,
``recipe.optimiser``, ``recipe.augmentation``, ``recipe.evaluation`` and ``runtime`` (precision,
memory layout, progress). A key left out takes its default; schedule fields given without the
rest change the recipe's schedule field by field (as ``--set train.X`` does), and all of them
together are a whole schedule (what ``run --show-config`` writes). :func:`to_tree` and
:func:`from_tree` convert, and :func:`flat_path` turns a tree path (``poison.rate``,
``recipe.optimiser.momentum``, ``poison.attack.options.size``) into the flat one (``poison_rate``,
``train.momentum``, ``attack_options.size``) for ``--set``. A stored config without ``schema`` is
the flat form (schema 1), which every reader still takes.
"""

from __future__ import annotations

import json
from typing import Any

from backdoorlab.options import OptionError

#: The tree form's schema number (the flat form, stored in results, is 1).
TREE_SCHEMA = 2
#: The flat form's schema number, written beside every stored result's ``config``.
FLAT_SCHEMA = 1

#: Each tree key and the flat field it holds (``train.X``: field X of the training schedule,
#: :class:`~backdoorlab.training.loop.TrainConfig`); a mapping is a section.
TREE: dict[str, Any] = {
    "data": {
        "dataset": "dataset",
        "train_size": "train_size",
        "test_size": "test_size",
        "trusted_size": "trusted_size",
        "seed": "data_seed",
        "root": "data_root",
    },
    "poison": {
        "attack": {"name": "attack", "options": "attack_options"},
        "rate": "poison_rate",
        "rate_of": "poison_rate_of",
        "target": "target",
        "mode": "mode",
        "clean_label": "clean_label",
        "source": "source",
    },
    "model": {"name": "model", "options": "model_options"},
    "recipe": {
        "name": "recipe",
        "schedule": {
            "epochs": "epochs",
            "batch_size": "batch_size",
            "min_last_batch": "train.min_last_batch",
            "schedule": "train.schedule",
            "milestones": "train.milestones",
            "warmup": "train.warmup",
            "whiten_bias_epochs": "train.whiten_bias_epochs",
        },
        "optimiser": {
            "lr": "lr",
            "momentum": "train.momentum",
            "nesterov": "train.nesterov",
            "weight_decay": "train.weight_decay",
            "norm_lr_scale": "train.norm_lr_scale",
            "lookahead_epoch": "train.lookahead_epoch",
            "label_smoothing": "train.label_smoothing",
            "data_init": "train.data_init",
        },
        "augmentation": {
            "crop_padding": "train.crop_padding",
            "crop_mode": "train.crop_mode",
            "flip": "train.flip",
            "alternating_flip": "train.alternating_flip",
            "jitter": "train.jitter",
            "scaling": "train.scaling",
        },
        "evaluation": {"tta": "train.tta"},
    },
    "preset": "preset",
    "defense": {"name": "defense", "options": "defense_options", "persistence_size": "persistence_size"},
    "detector": {"name": "detector", "options": "detector_options"},
    "input_detector": {"name": "input_detector", "options": "input_detector_options"},
    "regularizer": {"name": "regularizer", "options": "regularizer_options"},
    "runtime": {
        "device": "device",
        "threads": "threads",
        "deterministic": "deterministic",
        "amp": "train.amp",
        "channels_last": "train.channels_last",
        "progress": "train.progress",
    },
    "seed": "seed",
}


def _paths(node: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.update(_paths(value, path + ".") if isinstance(value, dict) else {value: path})
    return out


#: Each flat field's (and ``train.X``'s) path in the tree.
TREE_PATHS = _paths(TREE)
#: Schedule fields the tree holds as the config's own fields (its shortcuts, and the regulariser).
SCHEDULE_AS_FIELDS = ("epochs", "batch_size", "lr", "regularizer", "regularizer_options")
#: Sections whose flat field of the same name is a string (a method's or recipe's name).
_NAMED = ("model", "recipe", "defense", "detector", "input_detector", "regularizer")


def tree_fields(node: dict[str, Any] = TREE) -> list[str]:
    """Every flat field (and ``train.X`` schedule field) the tree places, in tree order."""
    out: list[str] = []
    for value in node.values():
        out += tree_fields(value) if isinstance(value, dict) else [value]
    return out


def schedule_fields() -> list[str]:
    """The schedule fields the tree's sections hold (``X`` of each ``train.X``)."""
    return [f.removeprefix("train.") for f in tree_fields() if f.startswith("train.")]


def to_tree(flat: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The tree of a flat config mapping (``RunConfig.to_dict()``), without the fields at their
    ``defaults`` and without empty sections; ``schema: 2`` first. Where the config gives a whole
    schedule (``train``), every schedule field is written (the file then pins the schedule), each
    once: ``epochs``, ``batch_size`` and ``lr`` as the values the run trains with, the regulariser
    in its own section."""
    train = flat.get("train")
    values = dict(flat)
    if isinstance(train, dict):
        for name in ("epochs", "batch_size", "lr"):
            if values[name] is None:
                values[name] = train[name]
        if values["regularizer"] is None and train.get("regularizer") is not None:  # set in the schedule alone
            values["regularizer"] = train["regularizer"]
            values["regularizer_options"] = train.get("regularizer_options", {})
        values.update({f"train.{k}": v for k, v in train.items()})

    def kept(field: str) -> bool:
        if field.startswith("train.") or (isinstance(train, dict) and field in ("epochs", "batch_size", "lr")):
            return isinstance(train, dict)
        return values[field] != defaults[field]

    def build(node: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, dict):
                section = build(value)
                if section:
                    out[key] = section
            elif kept(value):
                out[key] = values[value]
        return out

    return {"schema": TREE_SCHEMA, **build(TREE)}


def from_tree(tree: dict[str, Any], where: str = "config") -> tuple[dict[str, Any], dict[str, Any]]:
    """The flat fields a tree sets, and the schedule fields it changes. Where the tree gives every
    schedule field, they are the flat ``train`` (a whole schedule, as ``to_tree`` writes it) and
    the second mapping is empty; otherwise the second mapping holds them, to change the recipe's
    schedule field by field (:meth:`RunConfig.from_dict` applies them as ``--set train.X``). An
    unknown key is refused with the valid ones at its place, and a ``schema`` other than 2 with the
    forms this version reads."""
    schema = tree.get("schema", TREE_SCHEMA)
    if schema == FLAT_SCHEMA:
        raise OptionError(
            f"{where}: schema 1 is the flat form, which has no sections: write its fields without `schema`, "
            f"or the tree with `schema: {TREE_SCHEMA}`"
        )
    if schema != TREE_SCHEMA:
        raise OptionError(
            f"{where}: config schema {schema!r}; this version reads {TREE_SCHEMA} (the tree) and the flat form"
        )
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], values: Any, path: str) -> None:
        if not isinstance(values, dict):
            raise OptionError(f"{where}: '{path}' is {values!r}, not a mapping of {', '.join(node)}")
        for key, value in values.items():
            if path == "" and key == "schema":
                continue
            if key not in node:
                place = f"'{path}'" if path else "the top level"
                hint = f" ('{key}' of the flat form is '{TREE_PATHS[key]}' in the tree)" if key in TREE_PATHS else ""
                raise OptionError(f"{where}: unknown key '{key}' in {place}{hint}; valid: {', '.join(node)}")
            if isinstance(node[key], dict):
                walk(node[key], value, f"{path}.{key}" if path else key)
            else:
                flat[node[key]] = value

    walk(TREE, tree, "")
    schedule = {k.removeprefix("train."): flat.pop(k) for k in list(flat) if k.startswith("train.")}
    if schedule and set(schedule) == set(schedule_fields()):
        whole = {name: flat.get(name) for name in ("epochs", "batch_size", "lr")}
        missing = [name for name, value in whole.items() if value is None]
        if missing:
            raise OptionError(f"{where}: a whole schedule needs {', '.join(missing)} too")
        regularizer = {
            "regularizer": flat.get("regularizer"),
            "regularizer_options": flat.get("regularizer_options", {}),
        }
        flat["train"] = {**schedule, **whole, **regularizer}
        return flat, {}
    return flat, schedule


def is_tree(values: dict[str, Any]) -> bool:
    """Whether a config mapping is the tree form: it says ``schema: 2``, has a section the flat form
    lacks (``data``, ``poison``, ``runtime``), or a mapping where the flat form names a method
    (``model: {name: ...}``)."""
    if "schema" in values or any(key in values for key in ("data", "poison", "runtime")):
        return True
    return any(isinstance(values.get(key), dict) for key in _NAMED)


def flat_path(path: str) -> str:
    """The flat path of a ``--set`` path: a tree path (``poison.rate``, ``recipe.optimiser.momentum``,
    ``model.options.width``, ``poison.attack.options.size``) becomes the field it holds
    (``poison_rate``, ``train.momentum``, ``model_options.width``, ``attack_options.size``); a method's
    section named alone is its name (``poison.attack`` is ``attack``); a flat path (``train.lr``,
    ``attack_options.size``, ``model``) is returned as it is. A section without a name named as a
    whole (``poison``) is refused: set one of its keys."""
    keys = path.split(".")
    node: Any = TREE
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            break
        node = node[key]
        if isinstance(node, str):
            rest = keys[depth + 1 :]
            if depth == 0 and not rest:
                return path  # a top-level leaf (``seed``, ``preset``) is its own flat path
            return ".".join([node, *rest])
    else:
        if "name" in node:  # a method's section named alone is its name: ``model``, ``poison.attack``
            return node["name"]
        raise OptionError(f"--set {path}: a section of the config; set one of its keys: {', '.join(node)}")
    return path


def schedule_assignments(schedule: dict[str, Any]) -> list[str]:
    """:func:`from_tree`'s schedule changes as ``train.X=VALUE`` overrides (``--set``'s form, the
    value as JSON, which ``set_path`` reads back as YAML)."""
    return [f"train.{k}={json.dumps(v)}" for k, v in schedule.items()]


def flat_assignment(assignment: str) -> str:
    """A ``PATH=VALUE`` override with its path made flat (:func:`flat_path`); text without ``=`` is
    returned as it is (the override's own check refuses it)."""
    path, sep, value = assignment.partition("=")
    return f"{flat_path(path)}={value}" if sep and path else assignment

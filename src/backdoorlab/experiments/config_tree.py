"""A run config as a tree of sections: the form of config files and of ``--set`` paths.

:class:`~backdoorlab.experiments.config.RunConfig` keeps its fields flat in Python and in stored
results (the results store's cell keys hash that form, so every committed store resumes). People
write and read it as a tree (config schema 2):

```yaml
schema: 2
data: {dataset: cifar10, train_size: 5000, trusted_size: 0.05}
poison: {attack: {name: blended, options: {alpha: 0.2}}, rate: 0.1, target: 0}
model: {name: preact_resnet18}
recipe: {name: fast, epochs: 20}
defense: {name: fine_tuning, options: {epochs: 5}}
runtime: {device: cpu, threads: 2}
seed: 0
```

:data:`TREE` says where each flat field sits; :func:`to_tree` and :func:`from_tree` convert (a key
left out takes the field's default, so a tree states only what it changes), and :func:`flat_path`
turns a tree path (``poison.rate``, ``recipe.train.lr``, ``poison.attack.options.size``) into the
flat one (``poison_rate``, ``train.lr``, ``attack_options.size``) for ``--set``. A stored config
without ``schema`` is the flat form (schema 1), which every reader still takes.
"""

from __future__ import annotations

from typing import Any

from backdoorlab.options import OptionError

#: The tree form's schema number (the flat form, stored in results, is 1).
TREE_SCHEMA = 2
#: The flat form's schema number, written beside every stored result's ``config``.
FLAT_SCHEMA = 1

#: Each tree key and the flat field it holds; a mapping is a section.
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
    "recipe": {"name": "recipe", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "train": "train"},
    "preset": "preset",
    "defense": {"name": "defense", "options": "defense_options", "persistence_size": "persistence_size"},
    "detector": {"name": "detector", "options": "detector_options"},
    "input_detector": {"name": "input_detector", "options": "input_detector_options"},
    "regularizer": {"name": "regularizer", "options": "regularizer_options"},
    "runtime": {"device": "device", "threads": "threads", "deterministic": "deterministic"},
    "seed": "seed",
}

#: The recipe's shortcuts for its schedule: a tree leaves them out where they equal ``train``'s.
_SHORTCUTS = ("epochs", "batch_size", "lr")
#: Fields of the schedule (``train``) that repeat a section's: left out of it where equal.
_REPEATED = {"regularizer": "regularizer", "regularizer_options": "regularizer_options"}


def tree_fields(node: dict[str, Any] = TREE) -> list[str]:
    """Every flat field the tree places, in tree order."""
    out: list[str] = []
    for value in node.values():
        out += tree_fields(value) if isinstance(value, dict) else [value]
    return out


def to_tree(flat: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The tree of a flat config mapping (``RunConfig.to_dict()``), without the fields at their
    ``defaults`` and without sections left empty; ``schema: 2`` first. The recipe's ``epochs``,
    ``batch_size`` and ``lr`` are left out where ``train`` is given and they equal its own."""
    train = flat.get("train")
    if isinstance(train, dict):  # the regulariser is its own section; the schedule repeats it
        train = {k: v for k, v in train.items() if k not in _REPEATED or v != flat[_REPEATED[k]]}
        flat = {**flat, "train": train}

    def kept(field: str) -> bool:
        if field in _SHORTCUTS and isinstance(train, dict):
            return flat[field] != train.get(field)
        return flat[field] != defaults[field]

    def build(node: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, dict):
                section = build(value)
                if section:
                    out[key] = section
            elif kept(value):
                out[key] = flat[value]
        return out

    return {"schema": TREE_SCHEMA, **build(TREE)}


def from_tree(tree: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """The flat fields a tree sets (for ``RunConfig(**fields)``); an unknown key is refused with the
    valid ones at its place, and a ``schema`` other than 2 with the schemas this version reads. The
    recipe's shortcuts left out take ``train``'s values where ``train`` is given."""
    schema = tree.get("schema", TREE_SCHEMA)
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
                raise OptionError(f"{where}: unknown key '{key}' in {place}; valid: {', '.join(node)}")
            if isinstance(node[key], dict):
                walk(node[key], value, f"{path}.{key}" if path else key)
            else:
                flat[node[key]] = value

    walk(TREE, tree, "")
    train = flat.get("train")
    if isinstance(train, dict):
        for name in _SHORTCUTS:
            if name not in flat and name in train:
                flat[name] = train[name]
        defaults = {"regularizer": None, "regularizer_options": {}}
        flat["train"] = {**{k: flat.get(f, defaults[f]) for k, f in _REPEATED.items()}, **train}
    return flat


def is_tree(values: dict[str, Any]) -> bool:
    """Whether a config mapping is the tree form: it says ``schema: 2``, or has a section the flat
    form lacks (``data``, ``poison``, ``runtime``)."""
    return "schema" in values or any(key in values for key in ("data", "poison", "runtime"))


def flat_path(path: str) -> str:
    """The flat path of a ``--set`` path: a tree path (``poison.rate``, ``recipe.train.lr``,
    ``model.options.width``, ``poison.attack.options.size``) becomes the field it holds
    (``poison_rate``, ``train.lr``, ``model_options.width``, ``attack_options.size``); a method's
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


def flat_assignment(assignment: str) -> str:
    """A ``PATH=VALUE`` override with its path made flat (:func:`flat_path`); text without ``=`` is
    returned as it is (the override's own check refuses it)."""
    path, sep, value = assignment.partition("=")
    return f"{flat_path(path)}={value}" if sep and path else assignment

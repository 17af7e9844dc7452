"""Grids: a YAML file that describes one experiment or the product of many.

A grid file's top-level keys are :class:`RunConfig` fields (plus ``name`` and ``description``). A
field whose value is a list is an *axis*; the cells are the product of all axes, in file order (the
last axis varies fastest)::

    name: mnist-defenses
    dataset: mnist
    train_size: 5000
    attack: [badnets, blended, wanet]
    defense: [null, fine_tuning, abl, {regularizer: logit_squeezing}]
    seed: [0, 1]

An element of an axis that is a mapping sets several fields at once (``{defense: pivotal_tuning,
defense_options: {steps: 500}}``; a mapping without the axis's own key leaves that field at its
base value). For the mapping-valued fields (``attack_options``, ``train``...), a list of mappings is
an axis of values. A file without lists is one experiment. A file of several YAML documents (``---``) is the
union of their grids, for studies that are not one product (see ``examples/detectability.yaml``).

Everything is checked before anything runs: an unknown key, a bad name or value is a
:class:`GridError` that gives the file, the line and, for a cell, the values that made it.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from backdoorlab.attacks.triggers import ATTACKS
from backdoorlab.experiments.config import RunConfig, set_path
from backdoorlab.experiments.config_tree import flat_assignment, from_tree, is_tree, schedule_assignments
from backdoorlab.registry import UnknownNameError
from backdoorlab.training.loop import TrainConfig

META_KEYS = ("name", "description")
#: Fields whose value is a mapping: a list of mappings under them is an axis of values.
MAPPING_FIELDS = frozenset(
    {"model_options", "attack_options", "defense_options", "detector_options", "regularizer_options", "train"}
)
#: Fields that say where and how a cell runs, not what it computes: left out of a cell's key.
PLACEMENT_FIELDS = ("device", "data_root")
CONFIG_FIELDS = tuple(f.name for f in fields(RunConfig))
#: The config fields cell keys were first defined with. Every field added since (``data_seed``,
#: ``threads``, ``preset``, ``input_detector``...) is left out of a key at its default, so a store
#: written before it keeps its keys; a field added later needs no entry anywhere (:func:`added_fields`).
KEYED_FIELDS = tuple(
    (
        "dataset recipe model model_options attack attack_options poison_rate target mode clean_label source "
        "defense defense_options detector detector_options regularizer regularizer_options epochs batch_size "
        "lr train seed device train_size test_size trusted_size data_root"
    ).split()
)
#: The training-recipe fields cell keys were first defined with (the same rule for ``train``).
KEYED_TRAIN_FIELDS = tuple(
    (
        "epochs batch_size lr momentum nesterov weight_decay schedule warmup norm_lr_scale lookahead_epoch "
        "whiten_bias_epochs label_smoothing crop_padding crop_mode flip alternating_flip jitter scaling amp "
        "channels_last data_init progress tta regularizer regularizer_options"
    ).split()
)


def added_fields(cls: type, keyed: Sequence[str]) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that ``keyed`` lacks (added after keys were first defined),
    with their defaults as they serialise (a default factory's value)."""
    out = {}
    for f in fields(cls):
        if f.name not in keyed:
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            out[f.name] = json.loads(json.dumps(default))  # as stored: a tuple default is a list there
    return out


#: Config fields added after results were first stored, with their defaults: left out of a key at
#: that default.
ADDED_FIELDS: dict[str, Any] = added_fields(RunConfig, KEYED_FIELDS)
#: Training-recipe fields added after results were first stored, with their defaults: the same.
ADDED_TRAIN_FIELDS: dict[str, Any] = added_fields(TrainConfig, KEYED_TRAIN_FIELDS)


class GridError(ValueError):
    """A grid file that cannot be read or expanded; the message says where."""


@dataclass(frozen=True)
class Cell:
    """One experiment of a grid: its resolved config, its key and the axis values that made it.
    ``config`` is a :class:`RunConfig`, or another study's cell config with ``seed``, ``device``,
    ``data_root``, ``to_dict()`` (stored with its ``kind``), ``victim()`` and ``key()`` (a CLIP
    study's :class:`~backdoorlab.experiments.clip_cells.ClipCellConfig`)."""

    config: RunConfig
    key: str
    label: str


@dataclass(frozen=True)
class Grid:
    """An expanded, validated grid: a name and its cells (keys unique)."""

    name: str
    cells: tuple[Cell, ...]
    description: str = ""


def cell_key(config: RunConfig) -> str:
    """A stable hash of what a (resolved) config computes: its fields but device and data root."""
    values = config.to_dict()
    for name in PLACEMENT_FIELDS:
        values.pop(name, None)
    # fields added later are left out at their defaults, so keys stay those of earlier versions
    drop_defaults(values, ADDED_FIELDS)
    drop_defaults(values.get("train") or {}, ADDED_TRAIN_FIELDS)
    if config.detector is not None and suspect_config(config).defense != config.defense:
        # a detector in a run with a repair or filter scores the suspect model (since 2026-12-07;
        # before, the repaired one): such cells of earlier stores measured another model
        values["detector_scores"] = "suspect"
    revisions = method_revisions(config)
    if revisions:  # a method whose computation changed at the same options: results of before differ
        values["revisions"] = revisions
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def method_revisions(config: RunConfig) -> dict[str, int]:
    """``{method: revision}`` for the methods ``config`` uses that were registered with a revision
    above 0 (:meth:`backdoorlab.registry.Registry.register`)."""
    from backdoorlab.attacks import ATTACKS
    from backdoorlab.defenses import DETECTORS, registry_for
    from backdoorlab.models import MODELS
    from backdoorlab.training.regularizers import REGULARIZERS

    used = [(MODELS, config.model), (ATTACKS, config.attack), (DETECTORS, config.detector)]
    used += [(REGULARIZERS, config.regularizer)]
    if config.defense is not None:
        used.append((registry_for(config.defense), config.defense))
    found = {name: registry.metadata(name).get("revision", 0) for registry, name in used if name is not None}
    return {name: revision for name, revision in found.items() if revision}


def suspect_config(config: Any) -> Any:
    """The config of the victim a cell repairs or scores: ``config`` without its repair, its
    detectors and how a repair's curve is measured (a training-time defense is part of how the
    victim trains, so it stays). A cell of another kind (a CLIP study's) says its own
    (``config.victim()``)."""
    from backdoorlab.defenses import defense_kind

    if not isinstance(config, RunConfig):
        return config.victim()

    shared = config.defense is not None and defense_kind(config.defense) in ("repair", "filter")
    return replace(
        config,
        detector=None,
        detector_options={},
        input_detector=None,
        input_detector_options={},
        persistence_size=None,
        **({"defense": None, "defense_options": {}} if shared else {}),
    )


def suspect_key(config: Any) -> str | None:
    """The key under which a sweep shares the trained victim of ``config`` (resolved) with every
    cell that differs from it only in the repair or detector; ``None`` for a cell whose model is
    not a plain victim (a training-time defense trains its own) and for a training-controlled attack
    (its trigger is trained with the victim and not saved with it: each cell trains both)."""
    victim = suspect_config(config)
    if not isinstance(config, RunConfig):
        return victim.key()
    if victim.defense is not None or (victim.attack is not None and ATTACKS.get(victim.attack).controls_training):
        return None
    return cell_key(victim)


def drop_defaults(values: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Remove from ``values`` each key of ``defaults`` whose value is its default."""
    for name, default in defaults.items():
        if name in values and values[name] == default:
            del values[name]


def _lines(node: yaml.Node) -> dict[str, tuple[int, list[int]]]:
    """For a top-level mapping node: key -> (its line, the lines of its list's elements)."""
    out: dict[str, tuple[int, list[int]]] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            elements = (
                [v.start_mark.line + 1 for v in value_node.value] if isinstance(value_node, yaml.SequenceNode) else []
            )
            out[str(key_node.value)] = (key_node.start_mark.line + 1, elements)
    return out


def _axis_element(name: str, value: Any, where: str) -> dict[str, Any]:
    """The fields one element of axis ``name`` sets."""
    if isinstance(value, dict) and name not in MAPPING_FIELDS:
        unknown = sorted(set(value) - set(CONFIG_FIELDS))
        if unknown:
            raise GridError(
                f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(CONFIG_FIELDS)}"
            )
        return dict(value)
    return {name: value}


def _describe(values: dict[str, Any]) -> str:
    """``attack=badnets, defense=none, seed=0``: a cell's axis values, for people."""

    def show(value: Any) -> str:
        return "none" if value is None else value if isinstance(value, str) else json.dumps(value, default=str)

    return ", ".join(f"{k}={show(v)}" for k, v in values.items())


def untree(values: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """A grid document in the tree form (``config_tree``) as flat fields (its lists stay axes) and
    the ``train.X=VALUE`` overrides of its schedule fields given without the rest, which change each
    cell's recipe schedule as ``--set train.X`` does and take no axes."""
    meta = {k: v for k, v in values.items() if k in META_KEYS}
    try:
        flat, schedule = from_tree({k: v for k, v in values.items() if k not in META_KEYS}, source)
    except ValueError as err:
        raise GridError(str(err)) from None
    listed = sorted(k for k, v in schedule.items() if isinstance(v, list) and k != "milestones")
    if listed:
        raise GridError(
            f"{source}: schedule fields given without the rest take no axes ({', '.join(listed)}); "
            "give a list of whole schedules as the flat form's train:, or one grid document per value"
        )
    return {**meta, **flat}, schedule_assignments(schedule)


def expand(
    values: dict[str, Any],
    source: str = "<grid>",
    lines: dict[str, tuple[int, list[int]]] | None = None,
    schedule: Sequence[str] = (),
) -> Grid:
    """Expand and validate a grid given as a mapping (a parsed grid file, flat or a tree: :func:`untree`);
    ``source`` and ``lines`` place error messages; ``schedule`` (``train.X=VALUE``) changes each
    cell's recipe schedule field by field."""
    lines = lines or {}

    def line_of(key: str, element: int | None = None) -> int | None:
        line, elements = lines.get(key, (None, []))
        return elements[element] if element is not None and element < len(elements) else line

    def at(key: str, element: int | None = None) -> str:
        line = line_of(key, element)
        return f"{source}:{line}" if line else source

    if not isinstance(values, dict):
        raise GridError(f"{source}: a grid file is a mapping of config fields, got {type(values).__name__}")
    schedule_overrides = list(schedule)
    if is_tree(values):  # the tree form (config_tree): its leaves are the flat fields, lists their axes
        values, tree_schedule = untree(values, source)
        schedule_overrides, lines = tree_schedule + schedule_overrides, {}
    unknown = [k for k in values if k not in CONFIG_FIELDS and k not in META_KEYS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), CONFIG_FIELDS + META_KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise GridError(f"{at(key)}: unknown key '{key}'{hint}; valid: {', '.join(CONFIG_FIELDS + META_KEYS)}")
    base = {k: v for k, v in values.items() if k in CONFIG_FIELDS}
    axes: list[tuple[str, list[dict[str, Any]]]] = []
    for name, value in base.items():
        is_axis = isinstance(value, list) and (name not in MAPPING_FIELDS or all(isinstance(v, dict) for v in value))
        if not is_axis:
            continue
        if not value:
            raise GridError(f"{at(name)}: '{name}' is an empty list: a grid axis needs at least one value")
        axes.append((name, [_axis_element(name, v, at(name, i)) for i, v in enumerate(value)]))
    for name, _ in axes:
        base.pop(name)

    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for combination in itertools.product(*(range(len(elements)) for _, elements in axes)):
        chosen = {}
        places: list[int] = []
        for (name, elements), index in zip(axes, combination):
            chosen.update(elements[index])
            line = line_of(name, index)
            if line is not None and line not in places:
                places.append(line)
        label = _describe(chosen)
        place = f"; line{'s' if len(places) > 1 else ''} {', '.join(map(str, places))}" if places else ""
        where = f"{source}: cell {len(cells)} ({label}{place})" if axes else source
        try:
            config = RunConfig.from_dict({**base, **chosen}).with_overrides(schedule_overrides).resolved()
        except (UnknownNameError, ValueError, TypeError) as err:
            raise GridError(f"{where}: {err}") from None
        key = cell_key(config)
        if key in seen:
            raise GridError(f"{where}: the same experiment as cell {seen[key]}")
        seen[key] = len(cells)
        cells.append(Cell(config, key, label))
    name = str(values.get("name") or Path(source).stem)
    return Grid(name=name, cells=tuple(cells), description=str(values.get("description") or ""))


def select(grid: Grid, only: dict[str, Any]) -> Grid:
    """The cells of ``grid`` whose config has each ``field: value`` of ``only`` (dotted names reach
    into options: ``attack_options.size``; a tuple of values matches any of them); an unknown field
    is an error."""
    for name in only:
        if name.split(".")[0] not in CONFIG_FIELDS:
            raise GridError(f"cannot select on '{name}': not a config field; valid: {', '.join(CONFIG_FIELDS)}")

    def value(config: RunConfig, name: str) -> Any:
        current: Any = config.to_dict()
        for part in name.split("."):
            current = current.get(part) if isinstance(current, dict) else None
        return current

    def matches(config: RunConfig, name: str, wanted: Any) -> bool:
        return value(config, name) in wanted if isinstance(wanted, tuple) else value(config, name) == wanted

    cells = tuple(c for c in grid.cells if all(matches(c.config, k, v) for k, v in only.items()))
    return Grid(grid.name, cells, grid.description)


def _override(values: dict[str, Any], overrides: Sequence[str], path: Path, schedule: list[str] | None = None) -> None:
    """Apply ``--set`` overrides to a flat grid document; a ``train.X`` one goes to ``schedule`` (a
    tree document's field-by-field schedule changes) where given, else needs the document's whole
    ``train:``."""
    for assignment in map(flat_assignment, overrides):
        if assignment.startswith("train.") and schedule is not None and not isinstance(values.get("train"), dict):
            schedule.append(assignment)
            continue
        if assignment.startswith("train.") and not isinstance(values.get("train"), dict):
            raise GridError(
                f"{path}: --set {assignment.partition('=')[0]} needs a train: mapping in the grid (a grid's train: "
                "replaces the recipe's whole schedule); --set epochs=, batch_size= or lr= adjust the recipe's"
            )
        try:
            set_path(values, assignment)
        except ValueError as err:
            raise GridError(f"{path}: {err}") from None


def load_grid(path: str | Path, *, data_root: str | None = None, overrides: Sequence[str] = ()) -> Grid:
    """Read, expand and validate a grid file (YAML). A file of several YAML documents (separated by
    ``---``) is one grid whose cells are those of each document in turn; the first names it.
    ``overrides`` (``path.to.field=value``, ``sweep --set``) replace fields of every document before
    it expands; ``train.*`` needs the document's own ``train:`` mapping (a grid's ``train:`` is the
    whole schedule, not the recipe's)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist")
    text = path.read_text()
    try:
        nodes = list(yaml.compose_all(text))
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML: {err}") from None
    if not documents or all(d is None for d in documents):
        raise GridError(f"{path}: the file is empty")
    # where the data is (a placement field, out of every key) is known to validation: a file an
    # attack reads from the data root (Blended's Hello Kitty) is checked against it
    placed = {"data_root": data_root} if data_root is not None else {}
    schedules: list[list[str] | None] = []
    for i, values in enumerate(documents):
        schedule = None
        if isinstance(values, dict) and is_tree(values):  # flat first, so --set and the placement apply
            documents[i], schedule = untree(values, str(path))
            nodes[i] = yaml.compose("{}")  # its lines are those of the tree, not of flat keys
        if isinstance(documents[i], dict):
            _override(documents[i], overrides, path, schedule)
        schedules.append(schedule)
    grids = [
        expand({**values, **placed} if isinstance(values, dict) else values, str(path), _lines(node), schedule or ())
        for values, node, schedule in zip(documents, nodes, schedules)
        if values is not None
    ]
    cells: list[Cell] = []
    keys: set[str] = set()
    for number, grid in enumerate(grids, 1):
        for cell in grid.cells:
            if cell.key in keys:
                raise GridError(
                    f"{path}: document {number}, cell {cell.label or 0}: the same experiment as an earlier document's"
                )
            keys.add(cell.key)
            cells.append(cell)
    first = documents[0] if isinstance(documents[0], dict) else {}
    name = str(first.get("name") or path.stem)
    return Grid(name=name, cells=tuple(cells), description=grids[0].description)

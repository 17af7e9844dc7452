"""Plugins: an installed package adds methods through Python entry points in the groups
:data:`PLUGIN_GROUPS` (``backdoorlab.attacks``, ``backdoorlab.models``...). Each entry point names a
module (imported: its ``@ATTACKS.register`` decorators run) or a callable taking nothing (called).
They are loaded once, the first time any registry is looked up or listed
(:func:`ensure_plugins`), so the CLI, a script and a sweep's worker processes all see them without
importing anything.
"""

from __future__ import annotations

import threading
import types
import warnings
from dataclasses import dataclass
from importlib import metadata as importlib_metadata

#: The registries a plugin adds to, as ``backdoorlab list`` names them (``_`` for its ``-``); the
#: entry-point group of each is ``backdoorlab.<name>``. The group says what a plugin registers; all
#: groups are loaded together, since a module registers wherever its decorators say.
PLUGIN_REGISTRIES = (
    "datasets",
    "models",
    "recipes",
    "presets",
    "attacks",
    "defenses",
    "repairs",
    "sample_filters",
    "detectors",
    "input_detectors",
    "regularizers",
    "clip_models",
)
PLUGIN_GROUPS = tuple(f"backdoorlab.{name}" for name in PLUGIN_REGISTRIES)


class PluginError(ValueError):
    """A plugin registers a name already taken (by a built-in method or another plugin)."""


class PluginWarning(UserWarning):
    """A plugin that could not be loaded; it is skipped and everything else works."""


@dataclass(frozen=True)
class Plugin:
    """One entry point of a :data:`PLUGIN_GROUPS` group: ``name = value`` from ``distribution``;
    ``error`` says why it failed to load (``None``: loaded)."""

    group: str
    name: str
    value: str
    distribution: str | None
    error: str | None = None

    def __str__(self) -> str:
        source = f", distribution {self.distribution}" if self.distribution else ""
        return f"'{self.name} = {self.value}' ({self.group}{source})"


class _PluginState:
    """What has been loaded; ``current``: the plugin whose entry point runs now (its registrations
    record it as their origin). The lock makes a second thread wait for a load under way; the
    thread loading, looking up a registry from inside a plugin, goes on without waiting."""

    def __init__(self) -> None:
        self.plugins: dict[tuple[str, str, str, str | None], Plugin] = {}
        self.done = False
        self.current: Plugin | None = None
        self.lock = threading.RLock()


_state = _PluginState()


def _entry_points() -> list[tuple[str, importlib_metadata.EntryPoint]]:
    """Every ``(group, entry point)`` of :data:`PLUGIN_GROUPS` installed, in group order; one scan
    of the installed distributions (``entry_points(group=...)`` would scan once per group)."""
    found = importlib_metadata.entry_points()
    return [(group, entry) for group in PLUGIN_GROUPS for entry in found.select(group=group)]


def _load_one(group: str, entry: importlib_metadata.EntryPoint) -> tuple[Plugin, PluginError | None]:
    """Import ``entry`` (a module) or call it (a callable taking nothing). A failure becomes a
    :class:`PluginWarning` and the plugin's ``error``; a name clash is returned, to be raised."""
    dist = getattr(getattr(entry, "dist", None), "name", None)
    plugin = Plugin(group, entry.name, entry.value, dist)
    _state.current = plugin
    try:
        target = entry.load()
        if not isinstance(target, types.ModuleType):
            if not callable(target):
                raise TypeError(f"{entry.value} is neither a module nor a callable")
            target()
        return plugin, None
    except PluginError as clash:
        return Plugin(group, entry.name, entry.value, dist, str(clash)), clash
    except Exception as err:  # noqa: BLE001 - a broken plugin must not break unrelated commands
        error = f"{type(err).__name__}: {err}"
        warnings.warn(f"backdoorlab plugin {plugin} failed to load and is skipped: {error}", PluginWarning, 3)
        return Plugin(group, entry.name, entry.value, dist, error), None
    finally:
        _state.current = None


def load_plugins(*, again: bool = False) -> tuple[Plugin, ...]:
    """Load every plugin entry point (:data:`PLUGIN_GROUPS`) not loaded yet and return them all.
    Called by the first look-up in any registry; ``again`` looks for entry points once more
    (a package installed since). A plugin that fails to load warns and is skipped; one that
    registers a name already taken raises :class:`PluginError` naming both, after the others loaded."""
    with _state.lock:
        if (_state.done and not again) or _state.current is not None:  # done, or a plugin's own look-up
            return tuple(_state.plugins.values())
        clashes: list[PluginError] = []
        try:
            try:
                found = _entry_points()
            except Exception as err:  # noqa: BLE001 - unreadable package metadata: no plugins, not a crash
                warnings.warn(f"backdoorlab plugins not loaded: cannot read entry points: {err}", PluginWarning, 3)
                found = []
            for group, entry in found:
                key = (group, entry.name, entry.value, getattr(getattr(entry, "dist", None), "name", None))
                if key not in _state.plugins:
                    _state.plugins[key], clash = _load_one(group, entry)
                    if clash is not None:
                        clashes.append(clash)
        finally:
            _state.done = True
        if clashes:
            raise clashes[0]
        return tuple(_state.plugins.values())


def ensure_plugins() -> None:
    """Load the plugins unless done already (a registry's every look-up calls it)."""
    if not _state.done:
        load_plugins()


def current_plugin() -> Plugin | None:
    """The plugin whose entry point runs now (its registrations record it as their origin)."""
    return _state.current

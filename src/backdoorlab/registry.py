"""A name -> factory registry, shared by datasets, models and attacks.

One way to register and look up things by name, with one error message for unknown names that
lists the valid ones (the CLI and configs rely on that message).

A registry loads the installed plugins (:mod:`backdoorlab.plugins`) at its first look-up.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from backdoorlab.options import OptionError, check_value, describe_hint, option_hints
from backdoorlab.plugins import Plugin, PluginError, current_plugin, ensure_plugins

T = TypeVar("T")

#: The kinds of data a method can take (registry metadata ``modality=``): uint8 images
#: ``(N, C, H, W)``, float32 time series ``(N, C, L)``, or image-caption pairs (CLIP).
MODALITIES = ("image", "series", "image-text")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) with short descriptions."""

    def __init__(
        self, kind: str, *, positional: int = 0, not_options: tuple[str, ...] = (), modality: str | None = None
    ) -> None:
        """``positional``: how many leading arguments the toolkit passes each factory (a trigger's
        input shape), and ``not_options``: the keywords it passes (a model's ``num_classes``...);
        neither is a user's option. ``modality``: the data an entry takes where its registration
        does not say (``None``: this kind has no modality, as defenses, which take any)."""
        self.kind = kind
        self.positional, self.not_options = positional, tuple(not_options)
        self.modality = modality
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._metadata: dict[str, dict[str, Any]] = {}
        self._origins: dict[str, Plugin] = {}

    def register(self, name: str, help: str = "", **metadata: Any) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (lower case, unique), with optional metadata
        (timm's convention: ``classes=10`` for a dataset), read back by :meth:`metadata`.
        ``modality=`` (one of :data:`MODALITIES`) is the data it takes; where not given, a class
        that declares ``modality`` (a trigger) gives its own, else the registry's default.
        ``revision=`` counts changes to what the method computes at the same options (a changed
        default): a sweep's cell key includes it where above 0, so a store never serves a result of
        the earlier computation (``experiments.grid.cell_key``). Inside a plugin's entry point,
        the plugin is recorded as the origin (:meth:`origin`)."""

        def decorator(obj: T) -> T:
            key = name.lower()
            plugin = current_plugin()
            if key in self._items:
                raise self._taken(key, obj, plugin)
            modality = self._modality_of(key, obj, metadata.get("modality"))
            self._items[key] = obj
            if plugin is not None:
                self._origins[key] = plugin
            doc = help or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._help[key] = doc
            self._metadata[key] = {**metadata, **({"modality": modality} if modality else {})}
            return obj

        return decorator

    def _modality_of(self, key: str, obj: T, given: str | None) -> str | None:
        """The modality ``obj`` is registered with: ``given``, its class's ``modality`` or the
        default; refused where unknown, or where ``given`` contradicts the class's."""
        declared = getattr(obj, "modality", None) if isinstance(obj, type) else None
        declared = declared if isinstance(declared, str) else None  # not a property's descriptor
        if given is not None and declared is not None and given != declared:
            raise ValueError(f"{self.kind} '{key}': modality='{given}' but {obj.__name__}.modality is '{declared}'")
        modality = given or declared or self.modality
        if modality is not None and modality not in MODALITIES:
            raise ValueError(f"{self.kind} '{key}': unknown modality '{modality}'; valid: {', '.join(MODALITIES)}")
        return modality

    def _taken(self, key: str, obj: object, plugin: Plugin | None) -> ValueError:
        """The error for registering ``key`` twice: a :class:`PluginError` naming both where a
        plugin is one of them."""
        first = self._origins.get(key)
        if plugin is None and first is None:
            return ValueError(f"{self.kind} '{key}' is registered twice")

        def who(by: Plugin | None, factory: object) -> str:
            where = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"
            if by is not None:
                return f"plugin {by} as {where}"
            return f"the built-in {where}" if where.startswith("backdoorlab.") else where

        return PluginError(
            f"{self.kind} '{key}' is registered twice: by {who(first, self._items[key])}, and by "
            f"{who(plugin, obj)}; rename one of them"
        )

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its factory (for tests that register a throwaway entry)."""
        obj = self.get(name)
        key = name.lower()
        del self._items[key], self._help[key], self._metadata[key]
        self._origins.pop(key, None)
        return obj

    def origin(self, name: str) -> str | None:
        """The distribution of the plugin that registered ``name`` (its entry point where the
        distribution is unknown); ``None`` for the built-in methods and those registered by code."""
        self.get(name)
        plugin = self._origins.get(name.lower())
        return None if plugin is None else plugin.distribution or f"{plugin.name} = {plugin.value}"

    @contextmanager
    def temporary(self, name: str, obj: T, help: str = "", **metadata: Any) -> Iterator[T]:
        """Register ``obj`` under ``name`` for the ``with`` block only, then remove it: a test
        registers a throwaway method and the registry is as before afterwards, also on an error."""
        self.register(name, help, **metadata)(obj)
        try:
            yield obj
        finally:
            self.unregister(name)

    def get(self, name: str) -> T:
        ensure_plugins()
        key = name.lower()
        if key not in self._items:
            raise UnknownNameError(f"unknown {self.kind} '{name}'; valid {self.kind}s: {', '.join(self.names())}")
        return self._items[key]

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """Call the factory of ``name`` with ``args`` and keyword ``options``, after
        :meth:`check_options` (unknown names and ill-typed values are refused before the call)."""
        factory = self.get(name)
        return factory(*args, **self.check_options(name, options, positional=len(args), skip=()))

    def check_options(
        self, name: str, options: dict[str, Any], *, positional: int | None = None, skip: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        """``options`` checked against the factory's typed keyword parameters and converted (an
        int where a float is declared becomes a float): an unknown option name is refused with the
        valid ones listed, a value of the wrong type or range with an :class:`OptionError` that
        names the option. The first ``positional`` parameters, and those in ``skip`` (what the
        toolkit itself passes: a model's ``num_classes``...), are not options."""
        parameters = self.options(name, positional=positional, skip=skip)
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            raise OptionError(
                f"unknown option(s) {', '.join(map(str, unknown))} for {self.kind} '{name}'; "
                f"valid: {', '.join(parameters) or 'none'}"
            )
        return {
            key: check_value(value, parameters[key].annotation, f"option '{key}' of {self.kind} '{name}'")
            for key, value in options.items()
        }

    def options(
        self, name: str, *, positional: int | None = None, skip: tuple[str, ...] | None = None
    ) -> dict[str, inspect.Parameter]:
        """The options of ``name``: its factory's keyword parameters (annotation = type hint,
        default), without the first ``positional`` ones and those in ``skip``."""
        positional = self.positional if positional is None else positional
        skip = self.not_options if skip is None else skip
        parameters = list(option_hints(self.get(name)).items())[positional:]
        return {key: parameter for key, parameter in parameters if key not in skip}

    def describe_options(
        self, name: str, *, positional: int | None = None, skip: tuple[str, ...] | None = None
    ) -> list[tuple[str, str, str]]:
        """``(option, type in words, default)`` for each option of ``name``, for ``list --options``."""
        return [
            (key, describe_hint(p.annotation), "required" if p.default is p.empty else repr(p.default))
            for key, p in self.options(name, positional=positional, skip=skip).items()
        ]

    def metadata(self, name: str) -> dict[str, Any]:
        """What ``name`` was registered with beyond its factory (``{}`` where nothing)."""
        self.get(name)
        return dict(self._metadata[name.lower()])

    def names(self, modality: str | None = None) -> list[str]:
        """The registered names, sorted; with ``modality``, only those that take it (registered for it,
        or for any modality: no ``modality`` in their metadata)."""
        ensure_plugins()
        return sorted(
            k for k in self._items if modality is None or self._metadata[k].get("modality", modality) == modality
        )

    def check_modality(self, name: str, modality: str, data: str) -> None:
        """Refuse ``name`` for ``data`` (a dataset's name) of ``modality`` where it is registered
        for another, naming those that fit; an entry without a modality takes any."""
        takes = self.metadata(name).get("modality")
        if takes is not None and takes != modality:
            raise ValueError(
                f"{self.kind} '{name}' does not take {modality} data ({data}), only {takes}; "
                f"{self.kind}s for {modality} data: {', '.join(self.names(modality)) or 'none'}"
            )

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, for ``backdoorlab list``."""
        return {name: self._help[name] for name in self.names()}

    def __contains__(self, name: object) -> bool:
        ensure_plugins()
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

"""A name -> factory registry, shared by datasets, models and attacks.

One way to register and look up things by name, with one error message for unknown names that
lists the valid ones (the CLI and configs rely on that message).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) with short descriptions."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (lower case, unique)."""

        def decorator(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            doc = help or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._help[key] = doc
            return obj

        return decorator

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; valid {self.kind}s: {', '.join(self.names())}"
            )
        return self._items[key]

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """Call the factory of ``name`` with ``args`` and keyword ``options``; option names the
        factory does not take are refused with the valid ones listed."""
        factory = self.get(name)
        target = factory.__init__ if inspect.isclass(factory) else factory
        params = list(inspect.signature(target).parameters.values())
        if inspect.isclass(factory):
            params = params[1:]  # self
        valid = [p.name for p in params[len(args) :] if p.kind is not p.VAR_POSITIONAL]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for {self.kind} '{name}'; "
                f"valid: {', '.join(valid) or 'none'}"
            )
        return factory(*args, **options)

    def names(self) -> list[str]:
        return sorted(self._items)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, for ``backdoorlab list``."""
        return {name: self._help[name] for name in self.names()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

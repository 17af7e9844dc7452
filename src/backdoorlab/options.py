"""Typed options: a method's signature is its option spec.

Every registered method (attack, defense, repair, detector, regulariser, model) declares its options
as typed keyword parameters with defaults. :func:`check_value` checks one value against such a type
hint, so a bad value fails before any work with one line that names the option, what it takes and
what it got. Ranges ride on the type with ``typing.Annotated`` (pydantic's convention), through the
aliases below (``epochs: PositiveInt = 20``, ``alpha: Fraction = 0.2``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin


class OptionError(ValueError):
    """A bad option value; the message is one line naming the option."""


@dataclass(frozen=True)
class Range:
    """A numeric range for ``Annotated[int | float, Range(...)]``; ``None`` leaves a side open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else ""


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
#: A share in [0, 1] (a blend weight, a rate, an accuracy drop).
Fraction = Annotated[float, Range(0, 1)]
#: A share in (0, 1) (a held-out share that must leave something on both sides).
OpenFraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]

_NONE = type(None)


def _describe(hint: Any) -> str:
    """What a type hint accepts, in words: ``an integer >= 1``, ``one of 'a', 'b'``..."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        base, ranges = args[0], [a for a in args[1:] if isinstance(a, Range)]
        return " ".join([_describe(base), *map(str, ranges)])
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not _NONE]
        return " or ".join(parts) + (" or null" if _NONE in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        item = args[0] if args else Any
        return f"a list, each {_describe(item)}" if item is not Any else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _matches(value: Any, hint: Any) -> tuple[bool, Any]:
    """``(ok, value)``: whether ``value`` fits ``hint``, and the value as the hint wants it (an
    int where a float is asked becomes a float; a list where a tuple is asked becomes a tuple)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True, value
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        ok, value = _matches(value, args[0])
        if not ok:
            return False, value
        ranges = [a for a in args[1:] if isinstance(a, Range)]
        return all(r.contains(value) for r in ranges), value
    if origin in (Union, types.UnionType):
        if value is None:
            return _NONE in args, value
        # an exact type first, so that ``float | int`` keeps an int an int (a count, not a fraction)
        candidates = [
            a for a in args if a is type(value) or (get_origin(a) is Annotated and get_args(a)[0] is type(value))
        ]
        for arg in [*candidates, *(a for a in args if a not in candidates)]:
            if arg is _NONE:
                continue
            ok, converted = _matches(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in args and not isinstance(value, bool), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        item = args[0] if args else Any
        converted = []
        for element in value:
            ok, element = _matches(element, item)
            if not ok:
                return False, value
            converted.append(element)
        return True, list(converted) if origin is list or hint is list else tuple(converted)
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if inspect.isclass(hint):
        return isinstance(value, hint), value
    return True, value  # a hint this checker does not model: leave it to the method


def check_value(value: Any, hint: Any, what: str) -> Any:
    """``value`` converted to ``hint`` (int -> float, list -> tuple), or an :class:`OptionError`
    ``"{what} must be {description}, got {value!r}"``."""
    ok, converted = _matches(value, hint)
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise OptionError(f"{what} must be {_describe(hint)}, got {shown}")
    return converted


def option_hints(factory: Any) -> dict[str, inspect.Parameter]:
    """The keyword parameters of a factory (a class's ``__init__`` or a function), by name, with
    their annotations resolved (``parameter.annotation`` is the type hint, ``empty`` where none)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # an annotation that cannot be resolved is not checked
        hints = {}
    return {
        name: parameter.replace(annotation=hints.get(name, inspect.Parameter.empty))
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }


def describe_hint(hint: Any) -> str:
    """A type hint in words, for ``backdoorlab list --options``."""
    return "any" if hint is inspect.Parameter.empty else _describe(hint)


def check_fields(instance: Any, what: str) -> None:
    """Check (and convert in place) every field of a dataclass ``instance`` against its type hint;
    ``what`` names it in the message (``"config field"``: ``config field 'seed' must be ...``)."""
    hints = typing.get_type_hints(type(instance), include_extras=True)
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        converted = check_value(value, hints.get(field.name, Any), f"{what} '{field.name}'")
        if converted is not value:
            object.__setattr__(instance, field.name, converted)


def _as_stored(value: Any) -> Any:
    """A recorded option as results store it: tuples as lists (what JSON gives back)."""
    if isinstance(value, (list, tuple)):
        return [_as_stored(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_stored(v) for k, v in value.items()}
    return value


class Configurable:
    """A method whose constructor's typed keyword parameters are its options.

    The arguments it is built with (defaults filled in, each checked and converted against its type
    hint as the registries do) are recorded in ``self._options`` before the constructor's body runs,
    so the body can read them, and :meth:`config` and ``repr`` give them back: a method declares each
    option once, in its signature. Parameters named in ``not_options`` (what the toolkit passes: an
    attack's input shape and data root) are not recorded. A constructor that must store something
    else (a computed default, ``"custom"`` for a tensor pattern) updates ``self._options``.
    """

    not_options: ClassVar[tuple[str, ...]] = ()
    _options: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature, owner, hints = inspect.signature(init), cls, {}

        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **options: Any) -> None:
            if type(self).__init__ is recording_init:  # the outermost constructor records
                if not hints:  # read once, on the first construction (the annotations are resolved by then)
                    hints.update(option_hints(owner))
                bound = signature.bind(self, *args, **options)
                bound.apply_defaults()
                self._options = {
                    key: _as_stored(check_value(value, hints[key].annotation, f"option '{key}' of {owner.__name__}"))
                    for key, value in list(bound.arguments.items())[1:]
                    if key in hints and key not in type(self).not_options
                }
            init(self, *args, **options)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def _resolve_options(self, **values: Any) -> None:
        """Record what the constructor resolved for its options (a default computed from the input
        shape, ``"custom"`` for a tensor pattern); names the built class does not take are ignored,
        so a base class can resolve options for its subclasses."""
        self._options.update({key: _as_stored(v) for key, v in values.items() if key in self._options})

    def config(self) -> dict[str, Any]:
        """The options that rebuild this method (stored with results)."""
        return dict(self._options)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

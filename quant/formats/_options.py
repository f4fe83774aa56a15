"""Typed format options: one frozen dataclass per format, validated once at the boundary.

A policy keeps a matrix's options as a plain JSON object (``{"symmetric": true}``); its
format parses that object into its :class:`FormatOptions` subclass, which refuses
unknown keys (naming the known ones) and values of the wrong type, and states each
default once, as the field's default. Formats then read typed fields
(``opts.symmetric``), never ``options.get("symmetric", False)``.
"""

from __future__ import annotations

import dataclasses
import typing
from functools import lru_cache
from typing import Any, Mapping, TypeVar

__all__ = ["FormatOptions", "NoOptions", "parse_options"]

O = TypeVar("O", bound="FormatOptions")
# Accepted JSON types per annotation. bool is an int subclass in Python, so int and float
# refuse it explicitly; float refuses int too (``1`` for a fraction is a likely typo for ``0.01``).
_CHECKS: dict[Any, tuple[str, Any]] = {
    bool: ("a boolean", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a float", lambda v: isinstance(v, float)),
    str: ("a string", lambda v: isinstance(v, str)),
}


@lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple[str, Any]]:
    """Field name -> (what it must be, check), from the annotations (``str | None`` allows null)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base not in _CHECKS:
            raise TypeError(f"{cls.__name__}.{f.name}: option types are bool, int, float, str "
                            f"(or one of them | None), got {hint}")
        what, check = _CHECKS[base]
        out[f.name] = ((what + " or null", lambda v, c=check: v is None or c(v)) if optional else (what, check))
    return out


@dataclasses.dataclass(frozen=True)
class FormatOptions:
    """Base of every format's options: a frozen dataclass whose fields carry the defaults.

    Subclasses add fields (``symmetric: bool = False``) and may override :meth:`check`
    for value ranges; types are checked here from the annotations on construction, so
    a directly built instance is as valid as a parsed one.
    """

    def __post_init__(self) -> None:
        for name, (what, check) in _field_types(type(self)).items():
            value = getattr(self, name)
            if not check(value):
                raise ValueError(f"option {name!r} must be {what}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Raises ``ValueError`` for a value out of range (types are already checked)."""

    @classmethod
    def known(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults (what a policy needs to write)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


@dataclasses.dataclass(frozen=True)
class NoOptions(FormatOptions):
    """A format without options."""


def parse_options(cls: type[O], options: Mapping[str, Any], fmt: str) -> O:
    """``options`` (a JSON object) as ``cls``; ``ValueError`` naming format ``fmt`` and the problem."""
    if not isinstance(options, Mapping):
        raise ValueError(f"options of format {fmt!r} must be an object, got {options!r}")
    unknown = sorted(set(options) - set(cls.known()))
    if unknown:
        known = ", ".join(cls.known()) or "none"
        raise ValueError(f"format {fmt!r} has no option {unknown[0]!r}; its options: {known}")
    try:
        return cls(**options)
    except ValueError as exc:
        raise ValueError(f"format {fmt!r}: {exc}") from None

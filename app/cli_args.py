"""Command-line flags generated from a request model's fields, the request built back from them,
and the table of subcommands (:func:`command`).

A field ``seq_len: int = Field(256, description=...)`` becomes ``--seq-len N`` with that help; a
``bool`` field a switch (``--x / --no-x`` when it defaults to on), a ``bool | None`` field a
``--x / --no-x`` pair, a list field one comma-separated value (``--bits 2,3,4``; ``ch`` for a
``None`` group), a ``Literal`` field a flag with those choices. Flags that are not given are left
out, so the model's own defaults apply: they are stated once, on the model.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError

from evaluators.errors import UserError

__all__ = ["COMMANDS", "STORAGE_ENV", "STORAGE_HELP", "command", "arg", "request_args", "add_request_args",
           "request_from_args", "storage_url"]

M = TypeVar("M", bound=BaseModel)
Run = Callable[[argparse.Namespace], int]
Declare = Callable[[argparse.ArgumentParser], Any]
# Subcommand -> (its help, what declares its flags, what runs it), in the order they are registered.
COMMANDS: dict[str, tuple[str, tuple[Declare, ...], Run]] = {}
_PER_CHANNEL = ("ch", "channel")
STORAGE_ENV = "TURBOQUANT_STORAGE"
STORAGE_HELP = (f"SQLAlchemy URL (default: ${STORAGE_ENV}, else sqlite:///turboquant.db); a URL with a password is "
                f"better given in ${STORAGE_ENV} than here, where ps shows it to every user")


def storage_url(given: str | None) -> str:
    """The storage a command uses: ``--storage``, else ``$TURBOQUANT_STORAGE``, else the default SQLite file."""
    import os

    from studies import DEFAULT_STORAGE

    return given or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def command(name: str, help: str, *declare: Declare) -> Callable[[Run], Run]:
    """Registers the decorated function as subcommand ``name``; each of ``declare`` adds flags to its parser."""
    def register(run: Run) -> Run:
        COMMANDS[name] = (help, declare, run)
        return run

    return register


def arg(*flags: str, **kwargs: Any) -> Declare:
    """One ``add_argument`` call, as data for :func:`command`."""
    return lambda parser: parser.add_argument(*flags, **kwargs)


def request_args(model: type[BaseModel]) -> Declare:
    """Every field of a request model as a flag, for :func:`command` (see :func:`add_request_args`)."""
    return lambda parser: add_request_args(parser, model)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parts(annotation: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` is allowed) of ``X | None`` or ``X``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_PER_CHANNEL[0] if v is None else str(v) for v in value)
    return str(value)


def add_request_args(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """Adds a flag per field of ``model`` (except ``skip``); absent flags keep the model's defaults."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        kind, optional = _parts(field.annotation)
        help_text = field.description or ""
        if not field.is_required() and field.default is not None and field.default is not False:
            help_text += f" (default: {_shown(field.default)})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": name}
        if kind is bool:
            # A switch that is on by default needs its --no- form to be turned off.
            kwargs["action"] = argparse.BooleanOptionalAction if optional or field.default is True else "store_true"
        elif typing.get_origin(kind) is list:
            kwargs["metavar"] = name.upper()  # comma-separated; split by request_from_args
        elif kind is int:
            kwargs["type"] = int
        elif typing.get_origin(kind) is typing.Literal:  # e.g. Literal["proxy", "measured"]
            kwargs["choices"] = typing.get_args(kind)
        if field.is_required():
            kwargs["required"] = True
        parser.add_argument(_flag(name), **kwargs)


def _max_length(field: Any) -> int | None:
    return next((m.max_length for m in field.metadata if getattr(m, "max_length", None) is not None), None)


def _split(name: str, text: str, item: Any, most: int | None = None) -> list[Any]:
    # Counted before any entry is parsed: a list of millions is refused at once, as the API refuses it.
    if most is not None and text.count(",") >= most:
        raise UserError(f"{_flag(name)} takes at most {most} comma-separated values, got {text.count(',') + 1}")
    kind, per_channel = _parts(item)
    values = [v.strip() for v in text.split(",")]
    if kind is not int:
        return values
    try:
        return [None if per_channel and v in _PER_CHANNEL else int(v) for v in values]
    except ValueError:
        extra = " (or 'ch' for per output channel)" if per_channel else ""
        raise UserError(f"{_flag(name)} takes comma-separated integers{extra}, got {_short(text)}") from None


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message quotes what came, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _message(error: dict[str, Any]) -> str:
    # A validator's own message already names the option and the fix; a bound says which flag.
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    flag = _flag(str(error["loc"][0])) if error["loc"] else "options"
    return f"{flag}: {error['msg'].lower()}, got {_short(error['input'])}"


def request_from_args(model: type[M], args: argparse.Namespace, **extra: Any) -> M:
    """The request of ``model`` from parsed flags (plus ``extra`` fields), validated once.

    Raises:
        UserError: naming the bad option, in one line (the CLI prints it and exits 2).
    """
    given = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    for name, value in given.items():
        kind, _ = _parts(model.model_fields[name].annotation)
        if typing.get_origin(kind) is list and isinstance(value, str):
            given[name] = _split(name, value, typing.get_args(kind)[0], _max_length(model.model_fields[name]))
    try:
        return model(**given, **extra)
    except ValidationError as exc:
        raise UserError("; ".join(_message(e) for e in exc.errors())) from None

"""Options declared once, on their dataclass: ``option(...)`` puts the help text and the flag in the
field's metadata, and the CLI, presets and reports all read them from there.

    @dataclass
    class TrainingArguments:
        epochs: float = option(3.0, "passes over the training set per stage")

``add_arguments(group, cls)`` turns every option field of ``cls`` into an argparse flag (booleans get
``--x/--no-x``, lists are comma-separated); ``values(ns, cls)`` reads back only the flags the user gave,
so a preset can fill the rest; ``command_args(obj)`` spells an instance back out as flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from romebert.core.errors import RomebertError

_META = "romebert_option"


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: Iterable[Any] | None = None,
    cli: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line option.

    ``flag`` defaults to ``--field-name``; ``cli=False`` keeps a field out of the command line (it is
    still documented and saved).
    """
    meta = {_META: {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "cli": cli}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with :func:`option` and shown on the command line, in order."""
    return [f for f in dataclasses.fields(cls) if _META in f.metadata and f.metadata[_META]["cli"]]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata[_META]["flag"] or "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def _base_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(the value type, whether it is a list) of a field, ``X | None`` unwrapped."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def csv(kind: type, flag: str):
    """An argparse ``type`` for comma-separated values of ``kind``."""

    def parse(text: str) -> list:
        try:
            values = [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}") from None
        return list(dict.fromkeys(values))  # drop repeats, keep order

    return parse


def add_arguments(
    group: argparse._ActionsContainer,
    cls: type,
    exclude: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per option field of ``cls``. Flags default to "not given" (``values`` tells them apart);
    the help shows the dataclass default, or ``defaults[name]`` where a command uses another."""
    skip = set(exclude)
    for f in option_fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata[_META]
        kind, is_list = _base_type(cls, f)
        flag = flag_of(f)
        shown = (defaults or {}).get(f.name, default_of(f))
        text = meta["help"]
        if shown is not None and shown != [] and kind is not bool:
            text += f" (default: {','.join(map(str, shown)) if is_list else shown})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            kw["required"] = True
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = text + f" (default: {'on' if shown else 'off'})"
        elif is_list:
            kw["type"], kw["metavar"] = csv(kind, flag), "A,B,..."
        else:
            kw["type"] = kind
            if meta["choices"] is not None:
                kw["choices"] = list(meta["choices"])
        group.add_argument(flag, *meta["aliases"], **kw)


def values(ns: argparse.Namespace, cls: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The option fields of ``cls`` that were given on the command line (as ``add_arguments`` added them)."""
    skip = set(exclude)
    return {f.name: getattr(ns, f.name) for f in option_fields(cls) if f.name not in skip and hasattr(ns, f.name)}


def command_args(obj: Any, skip: Iterable[str] = (), only_changed: bool = False) -> list[str]:
    """``obj``'s option fields as command-line flags that rebuild it (None values are left out)."""
    out: list[str] = []
    leave = set(skip)
    for f in option_fields(type(obj)):
        value = getattr(obj, f.name)
        if f.name in leave or value is None or (only_changed and value == default_of(f)):
            continue
        kind, is_list = _base_type(type(obj), f)
        flag = flag_of(f)
        if kind is bool:
            out.append(flag if value else "--no-" + flag[2:])
        elif is_list:
            out += [flag, ",".join(_num(v) for v in value)]
        else:
            out += [flag, _num(value)]
    return out


def _num(x: Any) -> str:
    """A value as the shortest text that reads back the same: 2.0 -> "2", 1.5 -> "1.5", 2e-05."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def check_choices(obj: Any) -> None:
    """Every option field with ``choices`` holds one of them (one line naming the field otherwise)."""
    for f in dataclasses.fields(obj):
        meta = f.metadata.get(_META)
        if meta and meta["choices"] is not None:
            value = getattr(obj, f.name)
            if value is not None and value not in meta["choices"]:
                raise RomebertError(f"{f.name} must be one of {list(meta['choices'])}, got {value!r}")

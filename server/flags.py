"""Command-line flags generated from config dataclasses (their types, defaults and
`metadata["help"]`), and configs built back from the parsed flags.

A field `max_num_seqs: int` becomes `--max-num-seqs N`; a bool becomes the pair
`--enable-prefix-caching/--no-enable-prefix-caching`; `tuple[str, ...]` takes a
comma-separated list. Only flags the user gives reach the config, so its own defaults
apply to the rest. A bad value is reported naming its flag (`ConfigError`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any


class ConfigError(ValueError):
    """A flag value the config rejects; `flag` is the flag to blame, if one is."""

    def __init__(self, flag: str | None, message: str) -> None:
        super().__init__(f"argument {flag}: {message}" if flag else message)
        self.flag = flag


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    aliases: dict[str, list[str]] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """Add one flag per field of the dataclass `cls` (except `skip`), with `aliases`
    (field name -> extra flag spellings, e.g. vLLM's)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (defaults shown)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names = [flag_name(f.name), *(aliases or {}).get(f.name, [])]
        help_text = f.metadata.get("help", "")
        default = _default_of(f)
        kind = hints[f.name]
        if _base(kind) is bool:
            group.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=_with_default(help_text, default),
            )
            continue
        group.add_argument(
            *names,
            dest=f.name,
            type=converter(kind),
            default=argparse.SUPPRESS,
            metavar=_metavar(f.name, kind),
            help=_with_default(help_text, default),
        )


def build_config(cls: type, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Any:
    """`cls` from the parsed flags that belong to it (plus `extra` values).

    Each given value is checked alone first, so an error names its flag; then all
    together (errors between fields name the first field the message mentions).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values |= {k: v for k, v in (extra or {}).items() if k in names}
    for name, value in values.items():
        try:
            cls(**{name: value})
        except (ValueError, TypeError) as exc:
            raise ConfigError(flag_name(name), str(exc)) from None
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        blamed = next((n for n in values if n in str(exc)), None)
        raise ConfigError(flag_name(blamed) if blamed else None, str(exc)) from None


def converter(kind: Any) -> Callable[[str], Any]:
    """A str -> value function for a field type (argparse's `type=`)."""
    base = _base(kind)
    if typing.get_origin(base) is tuple:
        return _comma_list
    members = _members(kind)
    if len(members) > 1:  # e.g. int | str: the first type that accepts the text
        return _first_of([m for m in members if m is not type(None)])
    return _named(base)


def _named(base: Any) -> Callable[[str], Any]:
    if base in (int, float):

        def convert(text: str) -> Any:
            return base(text)

        convert.__name__ = base.__name__  # argparse: "invalid int value: 'x'"
        return convert
    return str


def _first_of(kinds: list[Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        for k in kinds:
            try:
                return _named(k)(text)
            except ValueError:
                continue
        raise ValueError(text)

    convert.__name__ = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    return convert


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _members(kind: Any) -> tuple[Any, ...]:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return typing.get_args(kind)
    return (kind,)


def _base(kind: Any) -> Any:
    """The type without `| None`."""
    members = [m for m in _members(kind) if m is not type(None)]
    return members[0] if len(members) == 1 else kind


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _with_default(help_text: str, default: Any) -> str:
    """The help, ending with the default unless the help already explains it."""
    if "default" in help_text.lower():
        return help_text
    shown = (",".join(default) or "none") if isinstance(default, tuple) else default
    return f"{help_text} (default: {shown})"


def _metavar(name: str, kind: Any) -> str:
    base = _base(kind)
    if typing.get_origin(base) is tuple:
        return "A,B,..."
    if base in (int, float):
        return "N"
    return name.upper().split("_")[-1]

"""Command-line flags made from config dataclasses: one source of truth for names, types, defaults and help.

Each field becomes `--field-name`; its type gives the parser's type (a `Literal` gives the choices, a tuple
`nargs="+"`, a bool a switch), its default comes from the dataclass (or from a stage's default instance, such as
fine-tuning's shorter schedule), and its help from the docstring written under the field. Flags remember whether
they were typed (`given(args)`), so a resumed run can tell "--max-steps 500" from the default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import operator
import textwrap
import types
import typing
from typing import Any, Literal

_GIVEN = "_given_flags"


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and of its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


class _Given(argparse.Action):
    """Stores the value and notes that the flag was typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _note(namespace, self.dest)


class _Switch(argparse.Action):
    """A bool flag: `--name` sets True (or False for a `--no-...` flag of a default-True field)."""

    def __init__(self, option_strings, dest, value: bool = True, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.value = value

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.value)
        _note(namespace, self.dest)


def _note(namespace, dest: str) -> None:
    given = getattr(namespace, _GIVEN, None)
    if given is None:
        given = set()
        setattr(namespace, _GIVEN, given)
    given.add(dest)


def given(args: argparse.Namespace) -> set[str]:
    """The fields whose flags were typed on the command line (not left at their defaults)."""
    return set(getattr(args, _GIVEN, ()))


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else functools.reduce(operator.or_, rest)), True
    return hint, False


def choices_of(cls: type, name: str) -> tuple[Any, ...] | None:
    """The values a `Literal` field accepts, or None for other fields."""
    hint, _ = _unwrap(typing.get_type_hints(cls)[name])
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def add_fields(parser: argparse.ArgumentParser, cls: type, names: list[str], *, defaults: Any = None,
               help: dict[str, str] | None = None, metavars: dict[str, str] | None = None,
               prefix: str = "") -> None:
    """Add a flag for each field of dataclass `cls` in `names`, with the default of `defaults` (an instance of
    `cls`, a dict by field name, or None for the class's own defaults) and the field's docstring as help (`help`
    overrides). With a `prefix`, field `rank` becomes `--lora-rank` stored as `lora_rank`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = field_docs(cls)
    for name in names:
        field = fields[name]
        if isinstance(defaults, dict):
            default = defaults[name]
        elif defaults is not None:
            default = getattr(defaults, name)
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        text = ((help or {}).get(name) or docs.get(name, "")).replace("%", "%%")  # argparse formats help with %
        hint, optional = _unwrap(hints[name])
        kwargs: dict[str, Any] = {"dest": prefix + name, "default": default}
        if (metavars or {}).get(name):
            kwargs["metavar"] = metavars[name]
        if hint is bool:
            if default:
                made = parser.add_argument("--no-" + (prefix + name).replace("_", "-"), action=_Switch, value=False,
                                           help=f"{text} This flag turns it off.".strip(), **kwargs)
            else:
                made = parser.add_argument(flag_name(prefix + name), action=_Switch, help=text, **kwargs)
            made.field = (cls, name)
            continue
        if typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
            kwargs["type"] = type(kwargs["choices"][0])
        elif typing.get_origin(hint) is tuple:
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(hint)[0]
        elif hint in (int, float, str):
            kwargs["type"] = hint
        else:
            raise TypeError(f"{cls.__name__}.{name}: no flag type for {hints[name]}")
        action = _TupleGiven if typing.get_origin(hint) is tuple else _Given
        made = parser.add_argument(flag_name(prefix + name), action=action,
                                   help=f"{text} (default: {_default_text(default)})".strip().replace("%%%%", "%%"),
                                   **kwargs)
        made.field = (cls, name)  # what tests/cli/test_flags.py checks the default against


class _TupleGiven(_Given):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, tuple(values), option_string)


def values(args: argparse.Namespace, names: list[str], *, prefix: str = "") -> dict[str, Any]:
    """The parsed values of the fields `names` (flags made by `add_fields`), by field name."""
    return {name: getattr(args, prefix + name) for name in names}


__all__ = ["add_fields", "field_docs", "given", "values", "choices_of", "flag_name"]

"""Command-line flags from a Config dataclass, so that a new setting is one edit (its field).

Each field ``name: type = default  # comment`` becomes ``--name`` (underscores as dashes):

- a ``bool`` is ``--name`` / ``--no-name``; an ``int``, ``float`` or ``str`` (or ``X | None``) is
  an option of that type; any other type (the ``arithmetic`` dict) is no flag;
- the help is the field's trailing comment (continued on the next comment lines while a
  parenthesis is open), or else the comment block right above it; the nearest class that comments
  a field wins, so a subclass that only changes a default keeps its base's help;
- a comment that opens with ``a | b | c`` (each choice may carry a note in parentheses, e.g.
  ``stride (Omniglot) | max (miniImageNet)``) gives the flag's choices.

A flag defaults to None, meaning "keep the config's (or the recipe's) value"; the help shows the
Config's default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from typing import Any

from metalab.errors import ConfigError

_CHOICE = r"[\w.-]+(?: \([^()]*\))?"  # a word, optionally with a note in parentheses
_CHOICES = re.compile(rf"{_CHOICE}(?: \| {_CHOICE})+(?=$|[:;,])")
_METAVAR = {int: "N", float: "X", str: "NAME"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One Config field as a command-line flag."""

    name: str  # the field's name; the flag is --name-with-dashes
    type: type  # bool, int, float or str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def settings(config: type) -> list[Setting]:
    """The fields of the dataclass ``config`` that can be flags, in field order."""
    hints = typing.get_type_hints(config)
    comments = field_comments(config)
    found = []
    for f in dataclasses.fields(config):
        kind = _flag_type(hints[f.name])
        if kind is None:
            continue
        comment = comments.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        found.append(Setting(f.name, kind, default, comment, choices_of(comment)))
    return found


def add_config_flags(
    parser: argparse.ArgumentParser, config: type, shared: type | None = None
) -> None:
    """Add a flag for each field of ``config``: its own fields in one group, and those of its
    base class ``shared`` (the settings every method has) in a second one."""
    own = parser.add_argument_group(f"settings ({config.__name__})")
    common, base = own, set()
    if shared is not None:
        common = parser.add_argument_group(f"settings every method has ({shared.__name__})")
        base = {f.name for f in dataclasses.fields(shared)}
    for s in settings(config):
        text = f"{s.help} (default: {s.default})" if s.help else f"default: {s.default}"
        kwargs: dict[str, Any] = {"dest": s.name, "default": None, "help": text.replace("%", "%%")}
        if s.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=s.type, choices=s.choices)
            kwargs["metavar"] = None if s.choices else _METAVAR[s.type]
        (common if s.name in base else own).add_argument(s.flag, **kwargs)


def overrides(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The settings given on the command line (flags left out keep the config's value)."""
    given = {s.name: getattr(args, s.name, None) for s in settings(config)}
    return {name: value for name, value in given.items() if value is not None}


def choices_of(comment: str) -> tuple[str, ...] | None:
    """``"auto | on | off: what it does"`` -> ``("auto", "on", "off")``; None without a list."""
    match = _CHOICES.match(comment)
    if match is None:
        return None
    return tuple(part.split(" (")[0] for part in match.group(0).split(" | "))


def field_comments(config: type) -> dict[str, str]:
    """Each field's comment in the source of ``config`` and its dataclass bases."""
    comments: dict[str, str] = {}
    for cls in reversed(config.__mro__):  # bases first: the nearest class's comment wins
        if dataclasses.is_dataclass(cls) and cls is not object:
            comments.update(_class_comments(cls))
    return comments


def _class_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. defined in a REPL): no help
        return {}
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comment = {
        t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT
    }

    def comment_only(row: int) -> bool:
        return row in comment and lines[row - 1].lstrip().startswith("#")

    found, last = {}, 0  # last: the last line already read (a field, or its comment's end)
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            last = node.end_lineno
            continue
        row = node.end_lineno
        if row in comment:  # trailing, maybe continued
            text = comment[row]
            while text.count("(") > text.count(")") and comment_only(row + 1):
                row += 1
                text += " " + comment[row]
        else:  # the comment block right above the field
            above = node.lineno - 1
            while above > last and comment_only(above):
                above -= 1
            text = " ".join(comment[r] for r in range(above + 1, node.lineno))
        last = row
        if text:
            found[node.target.id] = text
    return found


def _flag_type(hint: Any) -> type | None:
    """bool, int, float or str (unwrapping ``X | None``); None for anything else."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else None
    return hint if hint in (bool, int, float, str) else None


def assignments(items: list[str], flag: str) -> dict[str, str]:
    """``["a=1", "b-c=2"]`` -> ``{"a": "1", "b_c": "2"}`` (a repeated ``flag NAME=VALUE``; the
    values stay text for the receiver to convert); a one-line ConfigError for a malformed item."""
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not (sep and name.strip() and value.strip()):
            raise ConfigError(f"{flag} {item!r}: write NAME=VALUE, e.g. support_augment=8")
        pairs[name.strip().replace("-", "_")] = value.strip()
    return pairs

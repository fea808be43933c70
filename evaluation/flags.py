"""Command-line flags generated from config dataclasses, so that every option is defined once.

A config is a dataclass whose fields carry a type, a default and a docstring (the string
literal right after the field, as in CleanRL's ``Args``). :func:`add_flags` turns each field
into one ``argparse`` option: ``track_length`` becomes ``--track-length``, its type decides
how the text is parsed, its default is the flag's default and its docstring is the help.
:func:`config_from_args` builds the dataclass back from the parsed namespace, so the
library validates the values (in ``__post_init__``) and its errors name the field.

Per-field command-line details go into the field's metadata under ``"cli"``:

- ``{"required": True}``: the flag must be given (the dataclass default serves the API).
- ``{"flag": False}``: not a flag (e.g. free-form metadata dicts).
- ``{"positional": True}``: a positional argument.
- ``{"min": 1}``: an integer or float lower bound checked while parsing.
- ``{"choices": (...)}``: the allowed values.
- ``{"type": callable, "metavar": "HxW"}`` and other ``argparse`` keywords pass through.

Types understood: ``bool`` (``--x`` / ``--no-x`` when the default is true), ``int``,
``float``, ``str``, ``X | None``, ``tuple[str, ...]``, ``tuple[int, ...]`` and ``tuple[float, ...]``
(comma separated), ``tuple[int, int]`` (``HxW``), ``list[str]`` (repeat the flag), ``dict`` (a JSON
object).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from typing import Any


def flag_name(field_name: str) -> str:
    """``track_length`` -> ``--track-length``."""
    return "--" + field_name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring of every field of the dataclass ``cls`` (and its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.replace("``", "").split())
    return docs


def _number_at_least(minimum: float | None, kind: type = int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = kind.__name__
    return parse


def csv(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; ``""`` -> ``()``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers such as 1,2,4, got {text!r}") from None


def csv_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers such as 0.5,0.25,0, got {text!r}") from None


MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 8, 1024  # [px] bounds of any image size given as HxW


def height_by_width(text: str) -> tuple[int, int]:
    """``"66x200"`` -> ``(66, 200)``, each side within MIN_IMAGE_SIDE..MAX_IMAGE_SIDE px."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 66x200 (HxW), got {text!r}") from None
    if not (MIN_IMAGE_SIDE <= height <= MAX_IMAGE_SIDE and MIN_IMAGE_SIDE <= width <= MAX_IMAGE_SIDE):
        raise argparse.ArgumentTypeError(f"{height}x{width} is out of range: each side must be "
                                         f"{MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE} px (e.g. 66x200)")
    return height, width


def json_object(text: str) -> dict:
    """A JSON object given on the command line, e.g. ``'{"weights": "w.pt"}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}); give an object like "
                                         "'{\"weights\": \"w.pt\"}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``, else (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _show(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "''"
    return str(value)


def _argparse_kwargs(field: dataclasses.Field, annotation: Any, default: Any, cli: dict) -> dict:
    """How ``argparse`` parses one field (its type, action, default)."""
    inner, optional = _unwrap_optional(annotation)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    minimum = cli.pop("min", None)
    if inner is bool:
        if default:
            return {"action": argparse.BooleanOptionalAction, "default": default}
        return {"action": "store_true", "default": False}
    if inner is int or inner is float:
        kind = {"type": _number_at_least(minimum, inner)}
    elif inner is str:
        kind = {"type": str}
    elif origin is tuple and args == (int, int):
        kind = {"type": height_by_width, "metavar": "HxW"}
    elif origin is tuple and args in ((str, ...),):
        kind = {"type": csv, "metavar": "A,B"}
    elif origin is tuple and args == (float, ...):
        kind = {"type": csv_floats, "metavar": "X,Y"}
    elif origin is tuple and args == (int, ...):
        kind = {"type": csv_ints, "metavar": "N,M"}
    elif inner is dict or origin is dict:
        kind = {"type": json_object, "metavar": "JSON"}
    elif origin is list and args == (str,):
        return {"action": "append", "type": str, "default": None}
    else:
        raise TypeError(f"{field.name}: no command-line form for type {annotation!r}; "
                        "give one in the field's metadata (cli={'type': ...}) or cli={'flag': False}")
    return {**kind, "default": None if optional and default is None else default}


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
              cli: dict[str, dict] | None = None) -> None:
    """One option per field of the dataclass ``cls`` (except ``skip``). ``cli`` adds
    command-line details per field name on this command (the same keys as the field's
    ``metadata["cli"]``, plus ``default``), for library configs that do not carry them."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        details = {**field.metadata.get("cli", {}), **(cli or {}).get(field.name, {})}
        if field.name in skip or not details.pop("flag", True):
            continue
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        default = details.pop("default", default)
        cli_details = details
        positional = cli_details.pop("positional", False)
        kwargs = {**_argparse_kwargs(field, hints[field.name], default, cli_details), **cli_details}
        help_text = docs.get(field.name, "")
        shown = kwargs.get("default")
        if not kwargs.get("required") and not positional and shown is not None and shown is not False \
                and shown != () and kwargs.get("action") != "append":
            help_text += f" (default: {_show(shown)})"
        kwargs["help"] = help_text.replace("%", "%%")
        if positional:
            kwargs.pop("required", None)
            kwargs.pop("default", None)
            parser.add_argument(field.name, **kwargs)
        else:
            parser.add_argument(flag_name(field.name), dest=field.name, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """The dataclass ``cls`` from the parsed flags (fields not on the command line keep their
    defaults); ``overrides`` win."""
    values, given = {}, vars(args)
    for field in dataclasses.fields(cls):
        if field.name in given:
            value = given[field.name]
            if value is None and field.default_factory is not dataclasses.MISSING:
                continue  # an unrepeated append flag: the field's own default
            values[field.name] = value
    return cls(**{**values, **overrides})


def markdown_reference(parser: argparse.ArgumentParser) -> str:
    """Every command of ``parser`` with a table of its flags (flag, default, help): the
    generated reference in docs/cli.md."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    lines = [f"# `{parser.prog}` command reference", "",
             "Generated from the config dataclasses by `python tests/test_cli_reference.py`; do not edit by hand.", ""]
    for name, command in sub.choices.items():
        lines += [f"## `{parser.prog} {name}`", "", helps.get(name, ""), "", "| flag | default | meaning |",
                  "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = " / ".join(action.option_strings) or action.dest
            if action.required:
                default = "required"
            elif action.option_strings and action.default is not None and action.default is not False \
                    and action.default != ():
                default = f"`{_show(action.default)}`"
            else:
                default = ""
            meaning = (action.help or "").split(" (default: ")[0].replace("|", "\\|")
            if action.choices:
                meaning += f" One of: {', '.join(map(str, action.choices))}."
            lines.append(f"| `{flag}` | {default} | {meaning} |")
        lines.append("")
    return "\n".join(lines)

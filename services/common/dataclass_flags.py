"""CLI flags generated from frozen config dataclasses.

Each field becomes `--field-name` with the field's type, default and the doc line written
under it (attribute docstrings, read from the class source) as its help. Literal fields
become choices, bools become `--flag/--no-flag`, Optional[int] accepts an int; a class's
`flag_aliases` (field -> extra flags, e.g. `--tp` for `tp_size`) adds spellings. Parsed
arguments turn back into the dataclass with `from_args`, which runs its validation.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, Type, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The doc line under each field of a dataclass (attribute docstrings)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                docs[node.target.id] = str(following.value.value).strip()
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one flag per field of `cls` to `parser` (dest = field name)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    aliases = getattr(cls, "flag_aliases", {})
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        flags = (flag, *(() if prefix else aliases.get(f.name, ())))
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = docs.get(f.name, "") + (f" (default: {default})" if default not in ("", None) else "")
        if tp is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        elif typing.get_origin(tp) is typing.Literal:
            group.add_argument(*flags, dest=f.name, choices=list(typing.get_args(tp)), default=default, help=help_text)
        elif tp in (int, float, str):
            group.add_argument(*flags, dest=f.name, type=tp, default=default, help=help_text,
                               metavar=f.name.upper() + ("?" if optional else ""))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported flag type {tp}")


def from_args(cls: Type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build `cls` from parsed arguments (fields missing from args keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)  # type: ignore[call-arg]

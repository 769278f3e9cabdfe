"""The configuration reference, generated from the typed configs: every key of TrainConfig (and SFTConfig) with its
type, its default and the comment written next to it in areal_async/config.py.

    areal-async config --list [--sft]                      # the keys as text
    python -m areal_async.config_reference docs/configuration.md   # rewrites the reference page

A test fails when docs/configuration.md is not what this module writes.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from areal_async.config import SFTConfig, TrainConfig


@dataclass(frozen=True)
class Key:
    """One key: its dotted name, type, default (as a config file would write it) and comment."""

    name: str
    type: str
    default: str
    comment: str


def config_keys(schema: type = TrainConfig, prefix: str = "") -> list[Key]:
    """Every leaf key of `schema`, in declaration order, sections expanded in place."""
    comments = _field_comments(schema)
    hints = typing.get_type_hints(schema)
    keys: list[Key] = []
    instance = schema()
    for field in dataclasses.fields(schema):
        value = getattr(instance, field.name)
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            keys += config_keys(type(value), f"{name}.")
        else:
            keys.append(Key(name, _type_name(hints[field.name]), _written(value), comments.get(field.name, "")))
    return keys


def _field_comments(schema: type) -> dict[str, str]:
    """A field's comment: the one at the end of its line, else the comment lines just above it."""
    lines, _ = inspect.getsourcelines(schema)  # a module-level class: no indentation to strip
    tree = ast.parse("".join(lines))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    text = [line.rstrip("\n") for line in lines]
    comments = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno - 1
        trailing = _trailing_comment(text[node.end_lineno - 1])
        above = []
        while row - 1 - len(above) >= 0 and text[row - 1 - len(above)].strip().startswith("#"):
            above.insert(0, text[row - 1 - len(above)].strip().lstrip("#").strip())
        comments[node.target.id] = trailing or " ".join(above)
    return comments


def _trailing_comment(line: str) -> str:
    """The comment ending a line of code (a '#' outside quotes)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#":
            return line[index + 1:].strip()
    return ""


def _type_name(hint) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " | ".join(member.value for member in hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if arg is type(None) else _type_name(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    return getattr(hint, "__name__", str(hint))


def _written(value) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_written(item) for item in value) + "]"
    return str(value)


def as_text(keys: list[Key]) -> str:
    """One line per key: `name: type = default  # comment`."""
    return "\n".join(f"{key.name}: {key.type} = {key.default}" + (f"  # {key.comment}" if key.comment else "")
                     for key in keys)


def reference_page() -> str:
    """docs/configuration.md: the train and sft keys as tables, one per section."""
    parts = ["# Configuration reference", "",
             "After reading this page you can set any key of a run: `areal-async train key=value`, "
             "`areal-async sft key=value`, or a YAML file in `configs/`. An unknown key is an error. The run "
             "records every key's value in its `config.yaml`.", "",
             "This page is generated from the typed configs in `areal_async/config.py` "
             "(`python -m areal_async.config_reference docs/configuration.md`); `areal-async config --list` "
             "prints the same keys.", ""]
    for title, schema in (("areal-async train", TrainConfig), ("areal-async sft", SFTConfig)):
        sections: dict[str, list[Key]] = {}
        for key in config_keys(schema):
            sections.setdefault(key.name.split(".")[0] if "." in key.name else "", []).append(key)
        parts += [f"## {title}", ""]
        for section, keys in sections.items():
            parts += [f"### {section or 'top level'}", "", "| key | type | default | what it sets |", "|---|---|---|---|"]
            parts += [f"| `{key.name}` | {_cell(key.type)} | `{key.default}` | {_cell(key.comment)} |" for key in keys]
            parts.append("")
    return "\n".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m areal_async.config_reference docs/configuration.md", file=sys.stderr)
        return 2
    Path(argv[0]).parent.mkdir(parents=True, exist_ok=True)
    Path(argv[0]).write_text(reference_page() + "\n", encoding="utf-8")
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

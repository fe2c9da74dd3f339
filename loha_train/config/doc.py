"""Renders the README's config reference table from the config dataclasses and their field comments."""

from __future__ import annotations

import ast
import inspect
import io
import json
import sys
import tokenize
import types
from dataclasses import MISSING, Field, fields, is_dataclass
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

from loha_train.config import SCHEMA, Config
from loha_train.config.check import iter_fields, to_plain, type_hints

START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def render_config_table(root: type = Config) -> str:
    """Markdown table `key | type | default | description`, one bold row per section, fields in order."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for section in fields(root):
        section_cls = type_hints(root)[section.name]
        rows.append(f"| **{section.name}** | | | {_cell(_section_doc(section_cls))} |")
        for key, cls, f in iter_fields(section_cls, section.name):
            tp = type_hints(cls)[f.name]
            rows.append(
                f"| `{key}` | {_cell(type_name(tp))} | {_cell(default_text(f))} | "
                f"{_cell(field_comments(cls).get(f.name, ''))} |"
            )
    return "\n".join(rows)


def replace_table(readme: str, table: str) -> str:
    """`readme` with the text between the config-table markers replaced by `table`; ValueError without them."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {START} ... {END} markers in the README")
    return f"{readme[: start + len(START)]}\n{table}\n{readme[end:]}"


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the first `# comment` within the field's definition in the source of `cls`."""
    comments, tree = _parsed_module(cls.__module__)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    return {
        stmt.target.id: next(
            (comments[line] for line in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if line in comments),
            "",
        )
        for stmt in node.body
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
    }


@cache
def _parsed_module(name: str) -> tuple[dict[int, str], ast.Module]:
    source = inspect.getsource(sys.modules[name])
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}
    return comments, ast.parse(source)


def _section_doc(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    return doc.split(" ", 1)[1] if doc.startswith("`") else doc  # drop the leading "`model:`"


def type_name(tp: Any) -> str:
    """A field type as users write it: `int`, `float or null`, `list[str]`, one of `a`, `b`."""
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(f"`{c}`" for c in get_args(tp))
    if get_origin(tp) is tuple:
        return f"list[{type_name(get_args(tp)[0])}]"
    if get_origin(tp) is dict:
        return f"map[{', '.join(type_name(a) for a in get_args(tp))}]"
    if is_dataclass(tp):
        return "str or mapping" if tp in SCHEMA.shorthands else "mapping"
    if tp is Any:
        return "any"
    return tp.__name__


def default_text(f: Field[Any]) -> str:
    """The default as YAML in backticks, or **required**."""
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "**required**"
    plain = to_plain(value)
    return f"`{json.dumps(plain) if isinstance(plain, str) or plain is None else _yaml_scalar(plain)}`"


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, list | dict) else repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

"""Config YAML in and out: YAML 1.2 scalars, duplicate keys refused, syntax errors with line and column."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from loha_train.config.errors import ConfigError, ConfigProblem

# YAML 1.2 core scalars. PyYAML implements YAML 1.1, where `lr: 1e-4` is a string, `mixed_precision: no` is
# False, `on`/`yes` are booleans, `010` is eight, `2024-01-01` is a date and a bare `=` fails to load.
# Configs mean the 1.2 reading.

_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_TIMESTAMP, _VALUE = "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"
_YAML12_RESOLVERS = (
    (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), "tTfF"),
    (_INT, re.compile(r"^[-+]?[0-9]+$"), "-+0123456789"),
    (
        _FLOAT,
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        "-+0123456789.",
    ),
)


def _resolvers(base: dict[Any, list[tuple[str, re.Pattern[str]]]], drop: set[str]) -> dict[Any, list[Any]]:
    table = {first: [(tag, rx) for tag, rx in entries if tag not in drop] for first, entries in base.items()}
    for tag, rx, firsts in _YAML12_RESOLVERS:
        for first in firsts:
            table.setdefault(first, []).append((tag, rx))
    return table


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars that refuses duplicate keys (PyYAML keeps the last silently)."""

    yaml_implicit_resolvers = _resolvers(
        yaml.SafeLoader.yaml_implicit_resolvers, {_BOOL, _INT, _FLOAT, _TIMESTAMP, _VALUE}
    )

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, yaml.Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    first = seen[key_node.value].line + 1
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r} (first at line {first})",
                        key_node.start_mark,
                    )
                seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_decimal_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        try:
            return int(text, 10)  # YAML 1.1 would read 010 as octal
        except ValueError:
            return super().construct_yaml_int(node)  # an explicit !!int 0x10


_Loader.add_constructor(_INT, _Loader.construct_decimal_int)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that a YAML 1.1 or a YAML 1.2 reader would take for something else."""

    yaml_implicit_resolvers = _resolvers(yaml.SafeDumper.yaml_implicit_resolvers, set())


def read_config_text(path: Path) -> str:
    """The config file's text; unreadable or not UTF-8 is a ConfigError naming the byte and its offset."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError([ConfigProblem("", f"cannot read the config file: {err.strerror}")], str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        byte, line = data[err.start], data.count(b"\n", 0, err.start) + 1
        message = (
            f"the config file is not UTF-8: byte 0x{byte:02x} at offset {err.start} (line {line}) is not valid "
            "UTF-8. Save it as UTF-8 (an editor's 'UTF-8' encoding; not 'ANSI', 'Latin-1' or 'UTF-16')."
        )
        raise ConfigError([ConfigProblem("", message)], str(path)) from None


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """YAML text -> plain data (YAML 1.2 scalars); a syntax error is a ConfigError with line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as err:
        raise ConfigError([ConfigProblem("", _describe_yaml_error(err, text))], source) from None
    except yaml.YAMLError as err:
        raise ConfigError([ConfigProblem("", f"YAML error: {err}")], source) from None


def _describe_yaml_error(err: yaml.MarkedYAMLError, text: str) -> str:
    mark = err.problem_mark or err.context_mark
    what = ": ".join(part for part in (err.context, err.problem) if part)
    if mark is None:
        return f"YAML error: {what}"
    lines = text.splitlines()
    shown = lines[mark.line] if mark.line < len(lines) else ""
    return (
        f"YAML error at line {mark.line + 1}, column {mark.column + 1}: {what}\n"
        f"      {shown}\n      {' ' * mark.column}^"
    )


def load_value(text: str) -> Any:
    """One YAML value (a `--set key=VALUE`) read with the same YAML 1.2 scalars as the config file."""
    return yaml.load(text, Loader=_Loader)


def dump_yaml(data: Any) -> str:
    """Plain data -> block-style YAML in the given key order, readable back by parse_yaml()."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)

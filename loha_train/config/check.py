"""Checks YAML data against frozen dataclasses by their type hints, collecting every problem by dotted key."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from loha_train.config.errors import ConfigProblem
from loha_train.config.kohya_names import kohya_hint
from loha_train.config.yaml_io import load_value

# A field rule looks at one converted value and returns what is wrong with it, or None.
FieldRule = Callable[[Any], "str | None"]


# ---------------------------------------------------------------------------------------------------------
# Building frozen dataclasses from plain data.

INVALID: Any = object()  # marks a value that could not be built; its problem is already recorded


@dataclass(frozen=True)
class Schema:
    """How to read a tree of dataclasses: extra per-key rules and scalar shorthands."""

    root: type
    # schema key -> rule; a schema key is a dotted key with `[]` for list items and mapping values and `{}`
    # for mapping keys, e.g. "network.rank", "network.targets[]", "sample.prompts[].width"
    field_rules: Mapping[str, FieldRule] = field(default_factory=dict)
    # dataclass -> field that a plain string stands for, e.g. {SamplePrompt: "prompt"}
    shorthands: Mapping[type, str] = field(default_factory=dict)


@cache
def type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every schema key below `cls`, depth first, e.g. ["model", "model.path", ..., "sample.prompts[].seed"]."""
    keys: list[str] = []
    for f in fields(cls):
        key = _join(prefix, f.name)
        keys.append(key)
        inner, suffix = _unwrap(type_hints(cls)[f.name])
        if is_dataclass(inner):
            keys.extend(schema_keys(inner, key + suffix))
    return keys


def _unwrap(tp: Any) -> tuple[Any, str]:
    """The dataclass inside `X | None` or `tuple[X, ...]`, with the schema-key suffix that reaches it."""
    tp = _strip_none(tp)
    if get_origin(tp) is tuple and is_dataclass(get_args(tp)[0]):
        return get_args(tp)[0], "[]"
    return tp, ""


def _strip_none(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        rest = [arg for arg in get_args(tp) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


class Builder:
    """Converts plain data to dataclasses of one schema, recording problems instead of stopping at the first."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.problems: list[ConfigProblem] = []
        self._all_keys = schema_keys(schema.root)

    def problem(self, key: str, message: str) -> Any:
        self.problems.append(ConfigProblem(key, message))
        return INVALID

    def build_fields(self, cls: type, raw: Mapping[Any, Any], key: str = "", skey: str = "") -> dict[str, Any]:
        """Converted values of the fields given in `raw` (INVALID where they could not be converted).

        A missing field keeps its dataclass default; a missing nested dataclass is built from an empty
        mapping (so its own required fields are reported); any other missing field without default is a
        problem.
        """
        names = [f.name for f in fields(cls)]
        for name in raw:
            if name not in names:
                self.problem(_join(key, str(name)), "unknown key" + self.hint(cls, str(name), key))
        values: dict[str, Any] = {}
        for f in fields(cls):
            tp = type_hints(cls)[f.name]
            if f.name in raw:
                values[f.name] = self.convert(tp, raw[f.name], _join(key, f.name), _join(skey, f.name))
            elif is_dataclass(tp):
                values[f.name] = self.convert(tp, {}, _join(key, f.name), _join(skey, f.name))
            elif not has_default(f):
                values[f.name] = self.problem(_join(key, f.name), "required but missing")
        return values

    def hint(self, cls: type, name: str, prefix: str) -> str:
        """'; did you mean X?': the same name in another section, else a close name here, else anywhere."""
        siblings = [f.name for f in fields(cls)]
        leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(self._all_keys)}  # name -> its first full key
        if name in leaves:  # the right name in the wrong section: `train.resolution`
            return f"; did you mean {leaves[name]}?"
        if (ours := kohya_hint(name)) is not None and ours in self._all_keys:
            return f"; did you mean {ours}? (kohya's {name}; the README maps kohya's option names)"
        close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {_join(prefix, close[0])}?"
        close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
        if close:
            return f"; did you mean {leaves[close[0]]}?"
        return f"; valid keys here: {', '.join(siblings)}" if len(siblings) <= 8 else ""

    def convert(self, tp: Any, value: Any, key: str, skey: str) -> Any:
        """`value` as type `tp`, checked by the schema's rule for `skey`; INVALID after recording a problem."""
        result = self._convert(tp, value, key, skey)
        rule = self.schema.field_rules.get(skey)
        if rule is not None and result is not INVALID and result is not None:
            message = rule(result)
            if message:
                return self.problem(key, message)
        return result

    def _convert(self, tp: Any, value: Any, key: str, skey: str, nullable: bool = False) -> Any:
        if get_origin(tp) in (Union, types.UnionType):
            if value is None and type(None) in get_args(tp):
                return None
            return self._convert(_strip_none(tp), value, key, skey, nullable=True)
        if is_dataclass(tp):
            return self._dataclass(tp, value, key, skey)
        if get_origin(tp) is tuple:
            return self._tuple(tp, value, key, skey)
        if get_origin(tp) is dict:
            return self._dict(tp, value, key, skey)
        if get_origin(tp) is Literal:
            return self._literal(tp, value, key, nullable)
        converter = _SCALARS.get(tp)
        if converter is None:
            raise TypeError(f"{key}: unsupported field type {tp!r}")
        result = converter(value)
        if isinstance(result, _Wrong):
            null = " or null" if nullable else ""
            return self.problem(key, f"must be {result.expected}{null}, got {show(value)}{result.note}")
        return result

    def _dataclass(self, cls: type, value: Any, key: str, skey: str) -> Any:
        if isinstance(value, str) and cls in self.schema.shorthands:
            value = {self.schema.shorthands[cls]: value}
        if value is None:
            value = {}  # an empty section (`network:`) is a section of defaults
        if not isinstance(value, Mapping):
            return self.problem(key, f"must be a mapping, got {show(value)}")
        values = self.build_fields(cls, value, key, skey)
        if any(v is INVALID for v in values.values()):
            return INVALID
        return cls(**values)

    def _tuple(self, tp: Any, value: Any, key: str, skey: str) -> Any:
        item_type = get_args(tp)[0]
        if not isinstance(value, list | tuple):
            return self.problem(key, f"must be a list of {describe(item_type, plural=True)}, got {show(value)}")
        items = [self.convert(item_type, v, f"{key}[{i}]", skey + "[]") for i, v in enumerate(value)]
        return INVALID if any(v is INVALID for v in items) else tuple(items)

    def _dict(self, tp: Any, value: Any, key: str, skey: str) -> Any:
        key_type, value_type = get_args(tp)
        if not isinstance(value, Mapping):
            return self.problem(key, f"must be {describe(tp)}, got {show(value)}")
        out = {}
        for k, v in value.items():
            item_key = f"{key}[{k!r}]"
            out[self.convert(key_type, k, item_key, skey + "{}")] = self.convert(value_type, v, item_key, skey + "[]")
        return INVALID if INVALID in out or INVALID in out.values() else out

    def _literal(self, tp: Any, value: Any, key: str, nullable: bool) -> Any:
        choices = get_args(tp)
        if isinstance(value, str | int) and not isinstance(value, bool) and value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        null = " (or null)" if nullable else ""
        return self.problem(key, f"must be {describe(tp)}{null}; got {show(value)}{hint}")

    def apply_overrides(self, raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
        """A deep copy of `raw` with each `dotted.key=value` (value read as YAML) set in it."""
        out = copy.deepcopy(dict(raw))
        for item in overrides:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                self.problem("", f"--set {item!r}: expected dotted.key=value, e.g. train.lr=2e-4")
                continue
            node = self._override_parent(out, key)
            if node is INVALID:
                continue
            try:
                node[key.rsplit(".", 1)[-1]] = load_value(text)
            except yaml.YAMLError as err:
                reason = getattr(err, "problem", None) or err
                self.problem(key, f"--set value {text!r} is not valid YAML ({reason}); quote it")
        return out

    def _override_parent(self, raw: dict[str, Any], key: str) -> Any:
        """The mapping in `raw` that holds `key`'s last part, created as needed; INVALID after a problem."""
        cls, node, parts = self.schema.root, raw, key.split(".")
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth])
            if part not in {f.name for f in fields(cls)}:
                return self.problem(_join(here, part), "unknown key (in --set)" + self.hint(cls, part, here))
            if depth == len(parts) - 1:
                return node
            inner = type_hints(cls)[part]
            if not is_dataclass(inner):
                whole = _join(here, part)
                return self.problem(key, f"{whole} is one value, not a section; set it whole: --set {whole}=...")
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                return self.problem(key, f"cannot set a key inside {_join(here, part)}: it is not a mapping")
            cls, node = inner, node[part]
        return INVALID  # unreachable: the loop returns at the last part


# ---------------------------------------------------------------------------------------------------------
# Scalars: YAML booleans only for bool, no bools for numbers, numeric strings accepted for floats.


@dataclass(frozen=True)
class _Wrong:
    expected: str  # "an integer"
    note: str = ""  # " (write 8)"


def _to_bool(value: Any) -> Any:
    return value if isinstance(value, bool) else _Wrong("true or false")


def _to_int(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return _Wrong("an integer", f" (write {int(value)})")
    return _Wrong("an integer")


def _to_float(value: Any) -> Any:
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return _Wrong("a number")
    if isinstance(number, bool) or not isinstance(number, int | float):
        return _Wrong("a number")
    return float(number) if math.isfinite(number) else _Wrong("a finite number")


def _to_str(value: Any) -> Any:
    if isinstance(value, str):
        return value
    return _Wrong("a string", " (quote it to make it a string)" if isinstance(value, int | float) else "")


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Any: lambda value: value,  # passed through (e.g. optimizer arguments, checked by the optimizer's signature)
}
_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers")}


def describe(tp: Any, plural: bool = False) -> str:
    """A type in words for error messages: `one of 'a', 'b'`, `a list of strings`, `an integer or null`."""
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(describe(a) if a is not type(None) else "null" for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list of {describe(get_args(tp)[0], plural=True)}"
    if get_origin(tp) is dict:
        return f"a mapping from {describe(get_args(tp)[0], True)} to {describe(get_args(tp)[1], True)}"
    if is_dataclass(tp):
        return "mappings" if plural else "a mapping"
    if tp is str:
        return "strings" if plural else "a string"
    if tp is Any:
        return "values" if plural else "a value"
    singular, many = _NAMES.get(tp, (getattr(tp, "__name__", str(tp)), str(tp)))
    return many if plural else singular


def show(value: Any) -> str:
    """A value as the user wrote it, briefly: null, true, 'text', 3, a list, a mapping."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return f"a list {_short(repr(list(value)))}"
    if isinstance(value, Mapping):
        return "a mapping"
    return _short(repr(value))


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts in field order, tuples -> lists: data that YAML and JSON can write."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, type, dataclasses.Field[Any]]]:
    """(dotted key, owning class, field) for every field below `cls` but the sections; list items as `key[]`."""
    for f in fields(cls):
        key = _join(prefix, f.name)
        inner, suffix = _unwrap(type_hints(cls)[f.name])
        if not is_dataclass(inner) or suffix or f.default is None:  # an optional section (off when null) too
            yield key, cls, f
        if is_dataclass(inner):
            yield from iter_fields(inner, key + suffix)

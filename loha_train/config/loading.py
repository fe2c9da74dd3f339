"""Reading a run configuration: YAML text or a dict plus `--set` overrides -> a checked, path-resolved `Config`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from loha_train.config.check import INVALID, Builder, to_plain
from loha_train.config.errors import ConfigError, ConfigProblem
from loha_train.config.fs import write_problem
from loha_train.config.prompts_file import read_prompts_file
from loha_train.config.rules import rule_problems
from loha_train.config.schema import SCHEMA, Config, SamplePrompt
from loha_train.config.yaml_io import dump_yaml, parse_yaml, read_config_text

# ---------------------------------------------------------------------------------------------------------
# Paths. Relative paths are relative to the current directory, as for any command-line tool (not to the
# config file), and are stored absolute, so the copy of the config saved with a run works from anywhere.

BUILTIN_PREFIX = "builtin:"
HUB_PREFIX = "hf:"  # data sources read from the local Hugging Face cache
_INPUT_PATHS = (
    "model.path",
    "model.vae_path",
    "model.tokenizer_path",
    "network.init_from",
    "data.path",
    "data.reg_path",
    "data.validation_path",
    "data.mask_path",
    "sample.prompts_file",
)
_OUTPUT_PATHS = ("output.dir",)


def _absolute_paths(sections: dict[str, Any]) -> dict[str, Any]:
    out = dict(sections)
    for key in _INPUT_PATHS + _OUTPUT_PATHS:
        section, name = key.split(".")
        value = getattr(out[section], name, None) if out[section] is not INVALID else None
        if value is not None and not value.startswith((BUILTIN_PREFIX, HUB_PREFIX)):
            out[section] = replace(out[section], **{name: os.path.abspath(os.path.expanduser(value))})
    data = out.get("data")
    if data is not None and data is not INVALID and data.subsets:
        subsets = tuple(replace(sub, path=_absolute(sub.path)) for sub in data.subsets)
        out["data"] = replace(data, subsets=subsets)
    return out


def _absolute(value: str) -> str:
    return value if value.startswith((BUILTIN_PREFIX, HUB_PREFIX)) else os.path.abspath(os.path.expanduser(value))


def _path_problems(sections: Mapping[str, Any], raw: Mapping[str, Any]) -> Iterator[ConfigProblem]:
    for key in _INPUT_PATHS + _OUTPUT_PATHS:
        section, name = key.split(".")
        value = _path_value(sections[section], raw.get(section), name)
        if value is None or value.startswith((BUILTIN_PREFIX, HUB_PREFIX)):
            continue
        if key in _INPUT_PATHS and not os.path.exists(value):
            yield ConfigProblem(key, f"does not exist: {value}")
        elif key in _OUTPUT_PATHS and (problem := write_problem(value)):
            yield ConfigProblem(key, f"{problem}: {value}; choose a folder you can write to")
    data = sections.get("data")
    for i, sub in enumerate(data.subsets if data is not None and data is not INVALID else ()):
        if not sub.path.startswith((BUILTIN_PREFIX, HUB_PREFIX)) and not os.path.exists(sub.path):
            yield ConfigProblem(f"data.subsets[{i}].path", f"does not exist: {sub.path}")


def _path_value(section: Any, raw_section: Any, name: str) -> str | None:
    """The path `name` of a built section; of an invalid one (another field is wrong), the path as written, so
    that a wrong path is reported together with the section's other mistakes."""
    if section is not INVALID:
        return getattr(section, name, None)
    value = raw_section.get(name) if isinstance(raw_section, Mapping) else None
    if not isinstance(value, str) or value.startswith((BUILTIN_PREFIX, HUB_PREFIX)):
        return None
    return os.path.abspath(os.path.expanduser(value))


# ---------------------------------------------------------------------------------------------------------
# Loading and saving.


def load_config(path: str | Path, overrides: Sequence[str] = (), *, check_paths: bool = True) -> Config:
    """Read a YAML config, apply `--set dotted.key=value` overrides, check everything; raise ConfigError."""
    source = str(path)
    return config_from_dict(
        parse_yaml(read_config_text(Path(path)), source), overrides, check_paths=check_paths, source=source
    )


def config_from_dict(
    raw: Mapping[str, Any] | None,
    overrides: Sequence[str] = (),
    *,
    check_paths: bool = True,
    source: str | None = None,
) -> Config:
    """Like load_config() for data already parsed (tests, programmatic runs)."""
    raw = {} if raw is None else raw  # an empty file: report what is required
    if not isinstance(raw, Mapping):
        sections = ", ".join(f.name for f in fields(Config))
        raise ConfigError([ConfigProblem("", f"the top level must be a mapping of sections ({sections})")], source)
    builder = Builder(SCHEMA)
    raw = builder.apply_overrides(raw, overrides)
    sections = _absolute_paths(builder.build_fields(Config, raw))
    problems = builder.problems
    if check_paths:
        problems.extend(_path_problems(sections, raw))
    sections = _with_prompts_file(sections, problems)
    problems.extend(rule_problems(sections))
    if problems:
        raise ConfigError(problems, source)
    return Config(**sections)


def _with_prompts_file(sections: dict[str, Any], problems: list[ConfigProblem]) -> dict[str, Any]:
    """`sample.prompts_file` read into `sample.prompts` (after the inline ones) and cleared, so the run's saved
    config.yaml lists every prompt it sampled and reads back to an equal Config."""
    sample = sections.get("sample", INVALID)
    if sample is INVALID or sample.prompts_file is None or not os.path.exists(sample.prompts_file):
        return sections  # a missing file is reported with the other paths
    try:
        lines = read_prompts_file(sample.prompts_file)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problems.append(ConfigProblem("sample.prompts_file", f"{sample.prompts_file}: {e}"))
        return sections
    read = tuple(SamplePrompt(**fields) for _, fields in lines)
    return {**sections, "sample": replace(sample, prompts=sample.prompts + read, prompts_file=None)}


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each `dotted.key=value` set (value read as YAML); unknown keys raise ConfigError.

    Types are not checked here: load_config() checks the result like any config.
    """
    builder = Builder(SCHEMA)
    out = builder.apply_overrides(raw, overrides)
    if builder.problems:
        raise ConfigError(builder.problems)
    return out


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Every field, defaults included, as plain YAML/JSON data."""
    return to_plain(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; load_config() reads it back to an equal Config."""
    return dump_yaml(config_to_dict(cfg))

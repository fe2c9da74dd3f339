"""`data.path`, `data.reg_path` and `data.subsets` as one list of sources, each with its effective data options.

A subset's unset fields take the top-level `data.*` values (kohya's [general] -> [[datasets.subsets]] rule);
`data.path` and `data.reg_path` are the first sources and use the top-level options themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from loha_train.config import DataConfig, SubsetConfig

# SubsetConfig fields that override the DataConfig field of the same name when set
OVERRIDES = (
    "caption_extension",
    "trigger_word",
    "caption_prefix",
    "caption_suffix",
    "shuffle_captions",
    "keep_tokens",
    "caption_dropout",
    "tag_dropout",
    "flip",
    "random_crop",
    "prior_loss_weight",
    "image_column",
    "caption_column",
)


@dataclass(frozen=True)
class SourceConfig:
    """One source to scan and the options its images train with."""

    key: str  # the config key naming it, for messages: data.path, data.reg_path, data.subsets[2].path
    prefix: str  # item keys start with it: train, reg, validation, subsets[2]
    cfg: DataConfig  # effective options; cfg.path is this source's path, cfg.repeats its repeats
    is_reg: bool = False
    name: str | None = None  # the subset's name (else the folder or file name)
    own_default_caption: str | None = None  # a reg subset's own default_caption (kohya's class_tokens)
    rules: DataConfig | None = None  # set for subsets: what the dataset applies per step instead of data.*


def source_configs(cfg: DataConfig) -> list[SourceConfig]:
    """data.path, then data.reg_path, then every subset, in config order."""
    sources = []
    if cfg.path:
        sources.append(SourceConfig("data.path", "train", cfg))
    if cfg.reg_path:
        sources.append(
            SourceConfig("data.reg_path", "reg", replace(cfg, path=cfg.reg_path, repeats=cfg.reg_repeats), True)
        )
    for i, sub in enumerate(cfg.subsets):
        merged = subset_rules(cfg, sub)
        key = f"data.subsets[{i}].path"
        sources.append(SourceConfig(key, f"subsets[{i}]", merged, sub.is_reg, sub.name, sub.default_caption, merged))
    return sources


def subset_rules(cfg: DataConfig, sub: SubsetConfig) -> DataConfig:
    """The top-level options with the subset's set fields laid over them."""
    updates: dict[str, object] = {name: getattr(sub, name) for name in OVERRIDES if getattr(sub, name) is not None}
    default_repeats = cfg.reg_repeats if sub.is_reg else cfg.repeats
    updates["repeats"] = default_repeats if sub.repeats is None else sub.repeats
    if sub.default_caption is not None:
        updates["default_caption"] = sub.default_caption
    return replace(cfg, path=sub.path, subsets=(), reg_path=None, **updates)  # type: ignore[arg-type]


def validation_source(cfg: DataConfig) -> SourceConfig:
    assert cfg.validation_path is not None
    return SourceConfig("data.validation_path", "validation", replace(cfg, path=cfg.validation_path, repeats=1))


def subset_name(path: str) -> str:
    """A source's default name: hf:OWNER/NAME -> OWNER/NAME, else the folder or file name."""
    return path[3:] if path.startswith("hf:") else Path(path).name


def all_rules(cfg: DataConfig) -> list[DataConfig]:
    """The top-level options and every subset's: what per-step caption processing may use."""
    return [cfg, *(subset_rules(cfg, sub) for sub in cfg.subsets)]

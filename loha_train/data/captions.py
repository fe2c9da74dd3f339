"""Per-step caption processing (kohya semantics): wildcards, tag shuffle with kept tokens, tag and caption dropout."""

from __future__ import annotations

import re

import numpy as np

from loha_train.config import DataConfig
from loha_train.data.common import derive_rng
from loha_train.data.scan import join_separator


def caption_rng(seed: int, epoch: int, slot: int) -> np.random.Generator:
    """The RNG for one sample's caption: a function of (seed, epoch, slot) only, so resume is exact."""
    return derive_rng(seed, "caption", epoch, slot)


def captions_vary(cfg: DataConfig) -> bool:
    """Whether `process_caption` can return anything other than the caption itself or ""."""
    return cfg.shuffle_captions or cfg.tag_dropout > 0 or cfg.caption_wildcards


_WILDCARD = re.compile(r"\{([^}]+)\}")


def resolve_wildcards(caption: str, rng: np.random.Generator) -> str:
    """`{a|b|c}` replaced by one of its options, each group drawn uniformly from `rng` left to right (kohya's
    enable_wildcard): `{{` and `}}` stand for literal braces; a group is everything up to the next `}`."""
    if "{" not in caption:
        return caption
    open_mark, close_mark = "\u2985", "\u2986"  # placeholders for escaped braces, lengthened until unused
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    escaped = caption.replace("{{", open_mark).replace("}}", close_mark)

    def choose(match: re.Match[str]) -> str:
        options = match.group(1).split("|")
        return options[int(rng.integers(len(options)))]

    return _WILDCARD.sub(choose, escaped).replace(open_mark, "{").replace(close_mark, "}")


def process_caption(caption: str, cfg: DataConfig, rng: np.random.Generator) -> str:
    """The caption one sample trains with this step.

    - caption_dropout: with that probability the whole caption (trigger word included) becomes "".
    - caption_wildcards: each `{a|b|c}` becomes one of its options (`resolve_wildcards`), before the tags are
      split, so kept tokens, shuffling and tag dropout see the chosen words (kohya's order).
    - The caption is split on caption_separator into stripped, non-empty tags. Kept tags stay first in
      order: the trigger word (when the caption starts with it) plus the next `keep_tokens` tags.
    - tag_dropout drops each other tag independently; shuffle_captions shuffles the remaining ones.
    - Tags are re-joined with the separator and a space (", "). Without shuffle or tag dropout the
      caption is returned unchanged (byte for byte, so text-embedding caches match).

    Random draws happen in a fixed order (caption dropout, wildcards, shuffle, tag dropout), always the
    same number of draws for a given caption and config, so a seeded `rng` gives reproducible results.
    """
    if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    if cfg.caption_wildcards:
        caption = resolve_wildcards(caption, rng)
    if not (cfg.shuffle_captions or cfg.tag_dropout > 0):
        return caption
    tags = [tag.strip() for tag in caption.split(cfg.caption_separator)]
    tags = [tag for tag in tags if tag]
    kept_count = cfg.keep_tokens + (1 if cfg.trigger_word and tags and tags[0] == cfg.trigger_word else 0)
    kept, flexible = tags[:kept_count], tags[kept_count:]
    if cfg.shuffle_captions:
        flexible = [flexible[i] for i in rng.permutation(len(flexible))]
    if cfg.tag_dropout > 0:
        keep = rng.random(len(flexible)) >= cfg.tag_dropout
        flexible = [tag for tag, k in zip(flexible, keep, strict=True) if k]
    return join_separator(cfg.caption_separator).join(kept + flexible)

"""Per-step caption processing (kohya semantics): tag shuffle with kept tokens, tag and caption dropout."""

from __future__ import annotations

import numpy as np

from loha_train.config import DataConfig
from loha_train.data.common import derive_rng
from loha_train.data.scan import join_separator


def caption_rng(seed: int, epoch: int, slot: int) -> np.random.Generator:
    """The RNG for one sample's caption: a function of (seed, epoch, slot) only, so resume is exact."""
    return derive_rng(seed, "caption", epoch, slot)


def captions_vary(cfg: DataConfig) -> bool:
    """Whether `process_caption` can return anything other than the caption itself or ""."""
    return cfg.shuffle_captions or cfg.tag_dropout > 0


def process_caption(caption: str, cfg: DataConfig, rng: np.random.Generator) -> str:
    """The caption one sample trains with this step.

    - caption_dropout: with that probability the whole caption (trigger word included) becomes "".
    - The caption is split on caption_separator into stripped, non-empty tags. Kept tags stay first in
      order: the trigger word (when the caption starts with it) plus the next `keep_tokens` tags.
    - tag_dropout drops each other tag independently; shuffle_captions shuffles the remaining ones.
    - Tags are re-joined with the separator and a space (", "). Without shuffle or tag dropout the
      caption is returned unchanged (byte for byte, so text-embedding caches match).

    Random draws happen in a fixed order (caption dropout, then shuffle, then tag dropout), always the
    same number of draws for a given caption and config, so a seeded `rng` gives reproducible results.
    """
    if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    if not captions_vary(cfg):
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

"""How a source's captions are read: caption files, fallbacks, the trigger word and kohya's caption prefix/suffix."""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loha_train.config import DataConfig
from loha_train.data.common import Problem, decode_text

logger = logging.getLogger(__name__)

FALLBACK_CAPTION_EXTENSION = ".caption"  # kohya's historical default, read when the configured one is absent
CaptionSource = Literal["file", "metadata", "folder", "default", "none"]


@dataclass(frozen=True)
class CaptionPolicy:
    extension: str
    trigger_word: str | None
    default_caption: str | None
    separator: str
    prefix: str | None = None
    suffix: str | None = None


def caption_policy(cfg: DataConfig, *, is_reg: bool, own_default: str | None = None) -> CaptionPolicy:
    """How captions are read for a source. Regularization images show the class without the concept: no trigger
    word and no inherited default caption (which usually names the concept); a reg subset's own default_caption
    (kohya's class_tokens) applies."""
    return CaptionPolicy(
        dotted(cfg.caption_extension),
        None if is_reg else cfg.trigger_word or None,
        own_default if is_reg else cfg.default_caption,
        cfg.caption_separator,
        cfg.caption_prefix or None,
        cfg.caption_suffix or None,
    )


def dotted(extension: str) -> str:
    return extension if extension.startswith(".") else f".{extension}"


def warn_control_characters(path: Path | None, text: str | None, which: str = "") -> None:
    """Warn, naming the file, about a caption with control characters (NUL, ESC, ...; from a binary or a terminal
    paste): the tokenizer takes them as text, so the caption trains as something other than what it looks like."""
    if path is None or not text:
        return
    found = sorted({c for c in text if unicodedata.category(c) == "Cc" and c != "\t"})
    if found:
        codes = ", ".join(f"U+{ord(c):04X}" for c in found)
        logger.warning("%s%s: the caption holds control characters (%s); re-save it as plain text", path, which, codes)


def fallback_caption(folder_caption: str | None, policy: CaptionPolicy) -> tuple[str, CaptionSource]:
    """No caption file: the kohya folder name (DreamBooth class tokens), else default_caption, else ""."""
    if folder_caption:
        return folder_caption, "folder"
    if policy.default_caption:
        return policy.default_caption, "default"
    return "", "none"


def with_trigger(caption: str, policy: CaptionPolicy) -> str:
    """The trigger word as the first tag (unless the caption already starts with it), then kohya's
    caption_prefix/caption_suffix: "<prefix> <caption>" and "<caption> <suffix>", joined with a space."""
    caption = add_trigger(caption, policy)
    if policy.prefix:
        caption = f"{policy.prefix} {caption}"
    if policy.suffix:
        caption = f"{caption} {policy.suffix}"
    return caption


def add_trigger(caption: str, policy: CaptionPolicy) -> str:
    trigger = policy.trigger_word
    if not trigger:
        return caption
    first_tag = caption.split(policy.separator, 1)[0].strip() if policy.separator else caption
    if first_tag == trigger:
        return caption
    if not caption:
        return trigger
    return f"{trigger}{join_separator(policy.separator)}{caption}"


def join_separator(separator: str) -> str:
    """How tags are re-joined: ", " for ",", a bare separator when it is whitespace."""
    return separator if not separator.strip() else f"{separator} "


def read_caption_file(image: Path, extension: str) -> tuple[str | None, Path | None, Problem | None, bool]:
    """(first non-empty line, file, problem, had several lines); (None, None, None, False) when absent."""
    candidates = [image.with_suffix(extension)]
    if extension != FALLBACK_CAPTION_EXTENSION:
        candidates.append(image.with_suffix(FALLBACK_CAPTION_EXTENSION))
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return None, None, None, False
    text, problem = decode_text(path)
    if problem is not None:
        return None, path, problem, False
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None, path, None, False
    return lines[0], path, None, len(lines) > 1

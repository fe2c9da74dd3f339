"""Dataset discovery: find images and captions in the supported folder layouts, in a stable order."""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from loha_train.config import DataConfig
from loha_train.data.common import IMAGE_EXTENSIONS, DataError, Problem, decode_text
from loha_train.data.imagefolder import metadata_file, read_metadata

logger = logging.getLogger(__name__)

KOHYA_SUBSET = re.compile(r"^(\d+)_(.*)$")
FALLBACK_CAPTION_EXTENSION = ".caption"  # kohya's historical default, read when the configured one is absent
Layout = Literal["folder", "kohya", "metadata"]
CaptionSource = Literal["file", "metadata", "folder", "default", "none"]


@dataclass(frozen=True)
class ImageItem:
    """One image of the dataset and the caption it trains with (before per-step shuffling/dropout)."""

    key: str  # "<role>/<path relative to the role's folder>", '/'-separated, NFC: stable across OSes
    path: Path  # the image file (never modified)
    caption: str  # trigger word applied; "" when nothing else applies
    subset: str  # folder the image came from ("10_mychar" for kohya layouts): the ss_tag_frequency key
    repeats: int = 1  # times per epoch; for regularization images the weight in the reg pool
    is_reg: bool = False
    caption_source: CaptionSource = "none"
    caption_path: Path | None = None  # the caption file read, if any
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation; set by check_images
    sha256: str | None = None  # hex digest of the image file's bytes; set by check_images


@dataclass(frozen=True)
class DatasetIndex:
    """Everything `scan_dataset` found: items per role in sorted order, plus problems for check_images."""

    config: DataConfig
    layout: Layout  # layout of the training folder
    train: tuple[ImageItem, ...]
    reg: tuple[ImageItem, ...] = ()
    validation: tuple[ImageItem, ...] = ()
    problems: tuple[Problem, ...] = ()  # bad files found while scanning; their items are already left out
    missing_captions: int = 0  # images that got an empty caption (no caption file, folder name or default)

    @property
    def items(self) -> tuple[ImageItem, ...]:
        """All items: training, then regularization, then validation."""
        return self.train + self.reg + self.validation


@dataclass(frozen=True)
class _CaptionPolicy:
    extension: str
    trigger_word: str | None
    default_caption: str | None
    separator: str


@dataclass
class _Scan:
    layout: Layout
    items: list[ImageItem]
    problems: list[Problem]
    missing_captions: int = 0
    multiline_captions: int = 0


def scan_dataset(cfg: DataConfig, seed: int = 0) -> DatasetIndex:
    """Find the training, regularization and validation images named by `cfg`.

    `cfg.path` (and `reg_path`, `validation_path`) must be real folders: the caller resolves `builtin:`
    names first. Bad files (undecodable captions, bad metadata lines, missing files) do not raise here:
    they become `problems` and their images are left out, so `check_images` can report every problem at
    once. Raises DataError when a folder does not exist or holds no images at all. `seed` picks the
    `validation_split` hold-out.
    """
    train_policy = _CaptionPolicy(
        _dotted(cfg.caption_extension), cfg.trigger_word or None, cfg.default_caption, cfg.caption_separator
    )
    # Regularization images show the class without the concept: no trigger word and no default caption
    # (which usually names the concept); only their own caption files or kohya folder names apply.
    reg_policy = replace(train_policy, trigger_word=None, default_caption=None)

    train = _scan_role(Path(cfg.path), "train", cfg.repeats, train_policy, "data.path")
    reg = _empty_scan()
    if cfg.reg_path:
        reg = _scan_role(Path(cfg.reg_path), "reg", cfg.reg_repeats, reg_policy, "data.reg_path")
    validation = _empty_scan()
    train_items: tuple[ImageItem, ...] = tuple(train.items)
    if cfg.validation_path:
        validation = _scan_role(Path(cfg.validation_path), "validation", 1, train_policy, "data.validation_path")
        validation.items = [replace(item, repeats=1) for item in validation.items]  # N_name counts not
    elif cfg.validation_split > 0:
        train_items, held_out = split_validation(train_items, cfg.validation_split, seed)
        validation.items = list(held_out)

    scans = (train, reg, validation)
    return DatasetIndex(
        config=cfg,
        layout=train.layout,
        train=train_items,
        reg=tuple(replace(item, is_reg=True) for item in reg.items),
        validation=tuple(validation.items),
        problems=tuple(p for scan in scans for p in scan.problems),
        missing_captions=sum(scan.missing_captions for scan in scans),
    )


def split_validation(
    items: tuple[ImageItem, ...], fraction: float, seed: int
) -> tuple[tuple[ImageItem, ...], tuple[ImageItem, ...]]:
    """Hold out round(fraction * n) images (at least 1, never all) chosen by a seeded hash of their keys.

    Ranking by hash rather than by a permutation keeps the held-out set mostly unchanged when images are
    added to the folder. Held-out images get repeats = 1. Returns (train, validation), both sorted.
    """
    n = len(items)
    count = min(max(round(n * fraction), 1), n - 1)
    if count <= 0:
        logger.warning("validation_split=%s needs at least 2 training images; no validation set", fraction)
        return items, ()

    def rank(item: ImageItem) -> bytes:
        return hashlib.blake2b(f"{seed}\0{item.key}".encode(), digest_size=16).digest()

    held_out = {item.key for item in sorted(items, key=rank)[:count]}
    train = tuple(item for item in items if item.key not in held_out)
    validation = tuple(replace(item, repeats=1) for item in items if item.key in held_out)
    return train, validation


def _empty_scan() -> _Scan:
    return _Scan(layout="folder", items=[], problems=[])


def _dotted(extension: str) -> str:
    return extension if extension.startswith(".") else f".{extension}"


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _list_dir(folder: Path) -> tuple[list[Path], list[Path]]:
    """Visible files and subfolders of `folder`, each sorted by NFC name (codepoint order, OS-independent)."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: _nfc(p.name))
    return [p for p in entries if p.is_file()], [p for p in entries if p.is_dir()]


def _scan_role(root: Path, role: str, repeats: int, policy: _CaptionPolicy, config_key: str) -> _Scan:
    root = root.expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(
            f"{config_key}: {root} {what}. It must be a folder of images with caption files, a folder of "
            "kohya-style N_name subfolders (e.g. 10_mychar/), or a folder with a metadata.jsonl or metadata.csv."
        )
    files, folders = _list_dir(root)
    if (metadata := metadata_file(root)) is not None:
        scan = _scan_metadata(root, metadata, role, repeats, policy)
    elif any(KOHYA_SUBSET.match(folder.name) for folder in folders):
        scan = _scan_kohya(root, files, folders, role, policy)
    else:
        scan = _scan_folder(root, files, folders, role, repeats, policy)
    if not scan.items and not scan.problems:
        raise DataError(
            f"{config_key}: no images found in {root}. Put {'/'.join(sorted(IMAGE_EXTENSIONS))} files directly "
            f"in it (captions in same-name {policy.extension} files), in kohya-style N_name subfolders such as "
            "10_mychar/, or list them in a metadata.jsonl or metadata.csv."
        )
    _log_caption_counts(root, scan, policy)
    return scan


def _log_caption_counts(root: Path, scan: _Scan, policy: _CaptionPolicy) -> None:
    if scan.missing_captions:
        logger.warning(
            "%d of %d images in %s have no caption (no %s file, metadata text, folder name or "
            "default_caption); they train with an empty caption%s",
            scan.missing_captions,
            len(scan.items),
            root,
            policy.extension,
            " plus the trigger word" if policy.trigger_word else "",
        )
    if scan.multiline_captions:
        logger.warning(
            "%d caption files in %s have several non-empty lines; only the first line is used",
            scan.multiline_captions,
            root,
        )


def _scan_folder(
    root: Path, files: list[Path], folders: list[Path], role: str, repeats: int, policy: _CaptionPolicy
) -> _Scan:
    if folders:
        logger.warning(
            "ignoring subfolders of %s (%s): only images directly in it are read; name subfolders "
            "N_name (e.g. 10_mychar) to use them as kohya-style subsets",
            root,
            ", ".join(f.name for f in folders[:5]) + (", ..." if len(folders) > 5 else ""),
        )
    scan = _Scan(layout="folder", items=[], problems=[])
    _add_images(scan, root, [f for f in files if _is_image(f)], role, root.name, repeats, None, policy)
    return scan


def _scan_kohya(root: Path, files: list[Path], folders: list[Path], role: str, policy: _CaptionPolicy) -> _Scan:
    scan = _Scan(layout="kohya", items=[], problems=[])
    for image in (f for f in files if _is_image(f)):
        scan.problems.append(
            Problem(image, "image outside any N_name subfolder of a kohya-style dataset; move it into one")
        )
    for folder in folders:
        match = KOHYA_SUBSET.match(folder.name)
        if match is None:
            logger.warning("ignoring %s: not an N_name subfolder (e.g. 10_%s)", folder, folder.name)
            continue
        repeats, name = int(match.group(1)), match.group(2).strip()
        if repeats < 1:
            scan.problems.append(Problem(folder, "repeat count 0 in the folder name; use 1 or more (1_name)"))
            continue
        subfiles, _ = _list_dir(folder)
        images = [f for f in subfiles if _is_image(f)]
        _add_images(scan, root, images, role, folder.name, repeats, name or None, policy)
    return scan


def _add_images(
    scan: _Scan,
    root: Path,
    images: list[Path],
    role: str,
    subset: str,
    repeats: int,
    folder_caption: str | None,
    policy: _CaptionPolicy,
) -> None:
    for image in images:
        key = f"{role}/{_nfc(image.relative_to(root).as_posix())}"
        text, caption_path, problem, multiline = _read_caption_file(image, policy.extension)
        if problem is not None:
            scan.problems.append(replace(problem, item_key=key))
            continue
        scan.multiline_captions += multiline
        warn_control_characters(caption_path, text)
        source: CaptionSource = "file"
        if text is None:
            text, source = _fallback_caption(folder_caption, policy)
        scan.missing_captions += source == "none"
        scan.items.append(
            ImageItem(
                key=key,
                path=image,
                caption=_with_trigger(text, policy),
                subset=subset,
                repeats=repeats,
                caption_source=source,
                caption_path=caption_path,
            )
        )


def warn_control_characters(path: Path | None, text: str | None, which: str = "") -> None:
    """Warn, naming the file, about a caption with control characters (NUL, ESC, ...; from a binary or a terminal
    paste): the tokenizer takes them as text, so the caption trains as something other than what it looks like."""
    if path is None or not text:
        return
    found = sorted({c for c in text if unicodedata.category(c) == "Cc" and c != "\t"})
    if found:
        codes = ", ".join(f"U+{ord(c):04X}" for c in found)
        logger.warning("%s%s: the caption holds control characters (%s); re-save it as plain text", path, which, codes)


def _fallback_caption(folder_caption: str | None, policy: _CaptionPolicy) -> tuple[str, CaptionSource]:
    """No caption file: the kohya folder name (DreamBooth class tokens), else default_caption, else ""."""
    if folder_caption:
        return folder_caption, "folder"
    if policy.default_caption:
        return policy.default_caption, "default"
    return "", "none"


def _with_trigger(caption: str, policy: _CaptionPolicy) -> str:
    """Prepend the trigger word as the first tag unless the caption already starts with it."""
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


def _read_caption_file(image: Path, extension: str) -> tuple[str | None, Path | None, Problem | None, bool]:
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


def _scan_metadata(root: Path, metadata: Path, role: str, repeats: int, policy: _CaptionPolicy) -> _Scan:
    """Hugging Face imagefolder: metadata.jsonl lines or metadata.csv rows (imagefolder.py reads them)."""
    entries, problems, listed = read_metadata(root, metadata)
    scan = _Scan(layout="metadata", items=[], problems=problems)
    for relative, image, text in entries:
        warn_control_characters(metadata, text, f" (the caption of {relative})")
        source: CaptionSource = "metadata"
        if text is None:
            text, source = _fallback_caption(None, policy)
        scan.missing_captions += source == "none"
        scan.items.append(
            ImageItem(
                key=f"{role}/{relative}",
                path=image,
                caption=_with_trigger(text, policy),
                subset=root.name,
                repeats=repeats,
                caption_source=source,
            )
        )
    _warn_unlisted(root, metadata, listed)
    return scan


def _warn_unlisted(root: Path, metadata: Path, listed: dict[str, int]) -> None:
    files, _ = _list_dir(root)
    unlisted = [f for f in files if _is_image(f) and _nfc(f.name) not in listed]
    if unlisted:
        logger.warning(
            "%d images in %s are not listed in %s and are not used (e.g. %s)",
            len(unlisted),
            root,
            metadata.name,
            unlisted[0].name,
        )

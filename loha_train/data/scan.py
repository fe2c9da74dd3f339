"""Dataset discovery: find images and captions in the supported folder layouts, in a stable order."""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Literal

from loha_train.config import DataConfig
from loha_train.data.caption_files import (
    CaptionPolicy,
    CaptionSource,
    caption_policy,
    fallback_caption,
    read_caption_file,
    warn_control_characters,
    with_trigger,
)
from loha_train.data.caption_files import (
    join_separator as join_separator,  # re-exported: captions.py imports it from here
)
from loha_train.data.common import IMAGE_EXTENSIONS, DataError, Problem, sha256_file
from loha_train.data.imagefolder import metadata_file, read_metadata
from loha_train.data.sources import RowRef
from loha_train.data.subsets import SourceConfig, source_configs, subset_name, validation_source
from loha_train.data.tablescan import scan_table

logger = logging.getLogger(__name__)

KOHYA_SUBSET = re.compile(r"^(\d+)_(.*)$")
Layout = Literal["folder", "kohya", "metadata", "table"]


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
    row: RowRef | None = None  # an image stored in a table source (then `path` is the table, for messages)
    rules: DataConfig | None = None  # its subset's data options (caption rules, flip, ...); None: the top level

    def image_source(self) -> Path | BinaryIO:
        """What PIL opens: the file, or the table row's bytes."""
        return self.row.open() if self.row is not None else self.path

    def read_bytes(self) -> bytes:
        return self.row.read_bytes() if self.row is not None else self.path.read_bytes()

    @property
    def where(self) -> str:
        """The image in messages: its file, or `<table> row N`."""
        return f"{self.path} row {self.row.row}" if self.row is not None else str(self.path)

    def content_id(self) -> str:
        """What caches key this image on: its SHA-256, or for a table row the dataset fingerprint and the row."""
        if self.sha256:
            return self.sha256
        return self.row.content_id if self.row is not None else sha256_file(self.path)


@dataclass(frozen=True)
class DatasetIndex:
    """Everything `scan_dataset` found: items per role in sorted order, plus problems for check_images."""

    config: DataConfig
    layout: Layout  # layout of the training folder (the first training source)
    train: tuple[ImageItem, ...]
    reg: tuple[ImageItem, ...] = ()
    validation: tuple[ImageItem, ...] = ()
    problems: tuple[Problem, ...] = ()  # bad files found while scanning; their items are already left out
    missing_captions: int = 0  # images that got an empty caption (no caption file, folder name or default)
    sources: tuple[SourceSummary, ...] = ()  # per source and subset, for the plan

    @property
    def items(self) -> tuple[ImageItem, ...]:
        """All items: training, then regularization, then validation."""
        return self.train + self.reg + self.validation


@dataclass(frozen=True)
class SourceSummary:
    """One source or subset as the plan reports it."""

    key: str  # the config key that names it (data.path, data.subsets[1].path, ...)
    name: str
    kind: str  # folder, kohya, metadata, table (with its format)
    role: str  # train, reg or validation
    images: int
    repeats: tuple[int, ...]  # distinct repeat counts
    missing_captions: int
    problems: int


@dataclass
class _Scan:
    layout: Layout
    items: list[ImageItem]
    problems: list[Problem]
    missing_captions: int = 0
    multiline_captions: int = 0
    kind: str = ""


def scan_dataset(cfg: DataConfig, seed: int = 0) -> DatasetIndex:
    """Find the training, regularization and validation images named by `cfg`.

    `cfg.path` (and `reg_path`, `validation_path`) must be real folders: the caller resolves `builtin:`
    names first. Bad files (undecodable captions, bad metadata lines, missing files) do not raise here:
    they become `problems` and their images are left out, so `check_images` can report every problem at
    once. Raises DataError when a folder does not exist or holds no images at all. `seed` picks the
    `validation_split` hold-out.
    """
    train_scans: list[_Scan] = []
    reg_scans: list[_Scan] = []
    summaries: list[SourceSummary] = []
    for source in source_configs(cfg):
        scan = _scan_source(source)
        (reg_scans if source.is_reg else train_scans).append(scan)
        summaries.append(_summary(source, scan))
    validation = _empty_scan()
    train_items: tuple[ImageItem, ...] = tuple(item for scan in train_scans for item in scan.items)
    if cfg.validation_path:
        validation = _scan_source(validation_source(cfg))
        validation.items = [replace(item, repeats=1) for item in validation.items]  # N_name counts not
    elif cfg.validation_split > 0:
        train_items, held_out = split_validation(train_items, cfg.validation_split, seed)
        validation.items = list(held_out)

    scans = (*train_scans, *reg_scans, validation)
    return DatasetIndex(
        config=cfg,
        layout=train_scans[0].layout if train_scans else "folder",
        train=train_items,
        reg=tuple(replace(item, is_reg=True) for scan in reg_scans for item in scan.items),
        validation=tuple(validation.items),
        problems=tuple(p for scan in scans for p in scan.problems),
        missing_captions=sum(scan.missing_captions for scan in scans),
        sources=tuple(summaries),
    )


def _scan_source(source: SourceConfig) -> _Scan:
    """One data.path / reg_path / subset: a table through `datasets`, or a folder as before."""
    cfg = source.cfg
    policy = caption_policy(cfg, is_reg=source.is_reg, own_default=source.own_default_caption)
    table = scan_table(cfg, source.key)
    if isinstance(table, Path):
        scan = _scan_role(table, source.prefix, cfg.repeats, policy, source.key)
    else:
        scan = _Scan(layout="table", items=[], problems=list(table.problems), kind=table.kind)
        name = source.name or subset_name(cfg.path or "")
        for record in table.records:
            text, caption_source = (record.text, "metadata") if record.text is not None else (None, "none")
            if text is None:
                text, caption_source = fallback_caption(None, policy)
            scan.missing_captions += caption_source == "none"
            item = ImageItem(
                key=f"{source.prefix}/{record.name}",
                path=record.path,
                caption=with_trigger(text, policy),
                subset=name,
                repeats=cfg.repeats,
                caption_source=caption_source,  # type: ignore[arg-type]
                size=record.size,
                row=record.row,
            )
            scan.items.append(item)
        if not scan.items and not scan.problems:
            raise DataError(f"{source.key}: {cfg.path} has no rows")
        _log_caption_counts(Path(str(cfg.path)), scan, policy)
    if source.rules is not None or source.name:
        scan.items = [replace(item, rules=source.rules, subset=source.name or item.subset) for item in scan.items]
    return scan


def _summary(source: SourceConfig, scan: _Scan) -> SourceSummary:
    return SourceSummary(
        key=source.key,
        name=source.name or subset_name(source.cfg.path or ""),
        kind=scan.kind or scan.layout,
        role="reg" if source.is_reg else "train",
        images=len(scan.items),
        repeats=tuple(sorted({item.repeats for item in scan.items})),
        missing_captions=scan.missing_captions,
        problems=len(scan.problems),
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


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _list_dir(folder: Path) -> tuple[list[Path], list[Path]]:
    """Visible files and subfolders of `folder`, each sorted by NFC name (codepoint order, OS-independent)."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: _nfc(p.name))
    return [p for p in entries if p.is_file()], [p for p in entries if p.is_dir()]


def _scan_role(root: Path, role: str, repeats: int, policy: CaptionPolicy, config_key: str) -> _Scan:
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


def _log_caption_counts(root: Path, scan: _Scan, policy: CaptionPolicy) -> None:
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
    root: Path, files: list[Path], folders: list[Path], role: str, repeats: int, policy: CaptionPolicy
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


def _scan_kohya(root: Path, files: list[Path], folders: list[Path], role: str, policy: CaptionPolicy) -> _Scan:
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
    policy: CaptionPolicy,
) -> None:
    for image in images:
        key = f"{role}/{_nfc(image.relative_to(root).as_posix())}"
        text, caption_path, problem, multiline = read_caption_file(image, policy.extension)
        if problem is not None:
            scan.problems.append(replace(problem, item_key=key))
            continue
        scan.multiline_captions += multiline
        warn_control_characters(caption_path, text)
        source: CaptionSource = "file"
        if text is None:
            text, source = fallback_caption(folder_caption, policy)
        scan.missing_captions += source == "none"
        scan.items.append(
            ImageItem(
                key=key,
                path=image,
                caption=with_trigger(text, policy),
                subset=subset,
                repeats=repeats,
                caption_source=source,
                caption_path=caption_path,
            )
        )


def _scan_metadata(root: Path, metadata: Path, role: str, repeats: int, policy: CaptionPolicy) -> _Scan:
    """Hugging Face imagefolder: metadata.jsonl lines or metadata.csv rows (imagefolder.py reads them)."""
    entries, problems, listed = read_metadata(root, metadata)
    scan = _Scan(layout="metadata", items=[], problems=problems)
    for relative, image, text in entries:
        warn_control_characters(metadata, text, f" (the caption of {relative})")
        source: CaptionSource = "metadata"
        if text is None:
            text, source = fallback_caption(None, policy)
        scan.missing_captions += source == "none"
        scan.items.append(
            ImageItem(
                key=f"{role}/{relative}",
                path=image,
                caption=with_trigger(text, policy),
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

"""What a `data.path` is, and a table source's rows: image reference, caption and optional size per row.

Columns are chosen by `data.image_column` / `data.caption_column` when set, else detected: an Image-typed
column, else the first of the usual names; an error lists the columns when that cannot decide. Optional
`width`/`height` columns give each image's size, so planning and bucketing never decode it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from loha_train.data.common import IMAGE_EXTENSIONS, DataError, Problem
from loha_train.data.sources.hub import is_hub, resolve_hub
from loha_train.data.sources.rows import RowRef, TableFormat, TableSpec, fingerprint, open_table

SourceKind = Literal["folder", "imagefolder", "saved", "table", "shards", "hub"]
IMAGE_NAMES = ("image", "img", "images", "file_name", "image_path", "jpg", "png", "webp")
CAPTION_NAMES = ("text", "caption", "prompt", "tags", "txt")
_FORMATS: dict[str, TableFormat] = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
}


class TableRecord(NamedTuple):
    """One row: `name` (its part of the item key), the image (file, or row reference), caption and size."""

    name: str
    path: Path  # the image file, or for an image stored in the table the table's location (for messages)
    row: RowRef | None
    text: str | None
    size: tuple[int, int] | None  # (width, height) from the size columns


@dataclass(frozen=True)
class TableRead:
    """What `read_table` found."""

    spec: TableSpec
    records: list[TableRecord]
    problems: list[Problem]
    columns: tuple[str, str, str | None, str | None]  # image, caption, width, height columns used
    fingerprint: str


@dataclass(frozen=True)
class Columns:
    """The configured column names (None: detect)."""

    image: str | None = None
    caption: str | None = None
    width: str | None = None
    height: str | None = None


def detect_source(path: str) -> SourceKind:
    """What `path` is, from the path alone (no dataset is opened)."""
    if is_hub(path):
        return "hub"
    p = Path(path).expanduser()
    if p.is_file():
        return "table" if p.suffix.lower() in _FORMATS else "folder"
    if not p.is_dir():
        return "folder"  # the folder scan reports "does not exist"
    if (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()):
        return "saved"
    if (p / "metadata.jsonl").is_file() or (p / "metadata.csv").is_file():
        return "imagefolder"
    entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    if any(e.suffix.lower() in IMAGE_EXTENSIONS for e in entries if e.is_file()) or any(e.is_dir() for e in entries):
        return "shards" if _shard_files(p) and not _has_images(p) else "folder"
    return "shards" if _shard_files(p) else "folder"


def _has_images(folder: Path) -> bool:
    return any(e.suffix.lower() in IMAGE_EXTENSIONS for e in folder.rglob("*") if e.is_file())


def _shard_files(folder: Path) -> list[Path]:
    """The data files of a folder of shards: every file (at any depth) of the first format present."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for suffixes in ((".parquet",), (".arrow",), (".jsonl", ".json"), (".csv",)):
        found = [p for p in files if p.suffix.lower() in suffixes and ".loha-cache" not in p.parts]
        if found:
            return found
    return []


def locate(
    path: str, kind: SourceKind, split: str, revision: str | None, config: str | None, key: str
) -> Path | TableSpec:
    """A folder to scan as images (imagefolders, hub imagefolders), or the TableSpec to open with `datasets`."""
    if kind == "hub":
        found = resolve_hub(path, split, revision, config, key)
        if len(found) == 1 and found[0].is_dir():
            return found[0]
        return _files_spec(path, found, found[0].parent)
    p = Path(path).expanduser()
    if kind == "saved":
        return TableSpec("saved", path, (str(p),), split, base=str(p))
    if kind == "table":
        return _files_spec(path, [p], p.parent)
    if kind == "shards":
        return _files_spec(path, _shard_files(p), p)
    return p


def _files_spec(location: str, files: list[Path], base: Path) -> TableSpec:
    formats = {_FORMATS[f.suffix.lower()] for f in files}
    if len(formats) != 1:
        raise DataError(f"{location}: mixes data file formats ({', '.join(sorted(formats))}); keep one per source")
    return TableSpec(formats.pop(), location, tuple(str(f) for f in files), base=str(base))


def read_table(spec: TableSpec, wanted: Columns, key: str) -> TableRead:
    """Every row's record (in table order), with the problems of rows that cannot train."""
    dataset = open_table(spec)
    names = list(dataset.column_names)
    features = dataset.features
    image = _pick(wanted.image, names, features, IMAGE_NAMES, "image", key, spec.location)
    caption = _pick(wanted.caption, names, features, CAPTION_NAMES, "caption", key, spec.location)
    width = _optional(wanted.width, "width", names, key, spec.location)
    height = _optional(wanted.height, "height", names, key, spec.location)
    if (width is None) != (height is None):
        width = height = None  # both or neither
    read = [c for c in (caption, width, height) if c is not None]
    table = dataset.select_columns(read).with_format("arrow")[:] if read else None
    texts = table.column(caption).to_pylist() if table is not None and caption else [None] * len(dataset)
    widths = table.column(width).to_pylist() if table is not None and width else None
    heights = table.column(height).to_pylist() if table is not None and height else None
    stored = type(features[image]).__name__ == "Image" or _is_binary(features[image])
    paths = None if stored else dataset.select_columns([image]).with_format("arrow")[:].column(image).to_pylist()
    print_ = fingerprint(spec)
    records: list[TableRecord] = []
    problems: list[Problem] = []
    digits = len(str(max(len(dataset) - 1, 0)))
    for i in range(len(dataset)):
        size = _size(widths[i], heights[i]) if widths is not None and heights is not None else None
        text = _caption_text(texts[i])
        if paths is None:
            records.append(
                TableRecord(f"{i:0{digits}d}", Path(spec.location), RowRef(spec, i, image, print_), text, size)
            )
            continue
        value = paths[i]
        if not isinstance(value, str) or not value:
            problems.append(Problem(Path(spec.location), f"row {i}: the {image!r} cell is empty", line=None))
            continue
        file = Path(value) if Path(value).is_absolute() else Path(spec.base) / value
        records.append(TableRecord(value.replace("\\", "/"), file, None, text, size))
    return TableRead(spec, records, problems, (image, caption or "", width, height), print_)


def _is_binary(feature: Any) -> bool:
    """Bytes in the cell: a binary column, or a {bytes, path} struct written without the Image feature's metadata."""
    if isinstance(feature, dict) and "bytes" in feature:
        return True
    return getattr(feature, "dtype", None) in ("binary", "large_binary")


def _pick(
    wanted: str | None, names: list[str], features: Any, usual: tuple[str, ...], what: str, key: str, where: str
) -> str:
    if wanted is not None:
        if wanted not in names:
            raise DataError(
                f"{key}: data.{what}_column {wanted!r} is not a column of {where} (columns: {', '.join(names)})"
            )
        return wanted
    if what == "image":
        typed = [n for n in names if type(features[n]).__name__ == "Image"]
        if len(typed) == 1:
            return typed[0]
        if len(typed) > 1:
            raise DataError(
                f"{key}: {where} has several image columns ({', '.join(typed)}); choose one with data.image_column"
            )
    lowered = {n.lower(): n for n in names}
    for name in usual:
        if name in lowered:
            return lowered[name]
    raise DataError(
        f"{key}: cannot tell which column of {where} holds the {what}s (columns: {', '.join(names)}); set "
        f"data.{what}_column (looked for {', '.join(usual)})"
    )


def _optional(wanted: str | None, what: str, names: list[str], key: str, where: str) -> str | None:
    if wanted is not None and wanted not in names:
        raise DataError(
            f"{key}: data.{what}_column {wanted!r} is not a column of {where} (columns: {', '.join(names)})"
        )
    return wanted or (what if what in names else None)


def _size(width: Any, height: Any) -> tuple[int, int] | None:
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return (width, height)
    return None


def _caption_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):  # a tags column
        value = ", ".join(str(v).strip() for v in value if str(v).strip())
    text = str(value).strip()
    return text or None

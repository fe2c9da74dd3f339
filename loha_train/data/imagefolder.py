"""Hugging Face imagefolder metadata: `metadata.jsonl` lines or `metadata.csv` rows of file_name + text/caption.

Both files name each image by `file_name` (relative to the folder) and give its caption in a `text` or
`caption` field, as the `datasets` imagefolder builder reads them. Bad records are Problems naming the file and
line, never exceptions, so every problem of a dataset is reported at once.
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from pathlib import Path, PurePosixPath
from typing import Any

from loha_train.data.common import IMAGE_EXTENSIONS, Problem, decode_text

METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # the first one present is read

Entry = tuple[str, Path, str | None]  # (NFC posix path relative to the folder, image file, caption or None)


def metadata_file(root: Path) -> Path | None:
    """The metadata file of `root`, if it has one (metadata.jsonl wins over metadata.csv)."""
    return next((root / name for name in METADATA_FILES if (root / name).is_file()), None)


def read_metadata(root: Path, metadata: Path) -> tuple[list[Entry], list[Problem], dict[str, int]]:
    """(entries sorted by path, problems, listed paths -> line) of a metadata.jsonl or metadata.csv."""
    content, problem = decode_text(metadata)
    if problem is not None:
        return [], [problem], {}
    records = _csv_records(content) if metadata.suffix == ".csv" else _jsonl_records(content)
    seen: dict[str, int] = {}
    entries: list[Entry] = []
    problems: list[Problem] = []
    for line_number, record in records:
        entry = _check_record(root, metadata, record, line_number, seen)
        if isinstance(entry, str):
            problems.append(Problem(metadata, entry, line=line_number))
        else:
            entries.append(entry)
    return sorted(entries, key=lambda e: e[0]), problems, seen


def _jsonl_records(content: str) -> list[tuple[int, Any]]:
    records: list[tuple[int, Any]] = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_number, json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((line_number, f"not valid JSON ({e.msg} at column {e.colno})"))
    return records


def _csv_records(content: str) -> list[tuple[int, Any]]:
    """Rows of a CSV with a header line (`file_name,text`), as dicts; an empty cell is a missing value."""
    reader = csv.DictReader(io.StringIO(content, newline=""))
    if reader.fieldnames is None or "file_name" not in reader.fieldnames:
        return [(1, 'the header line must name a "file_name" column (e.g. file_name,text)')]
    records: list[tuple[int, Any]] = []
    start = 2  # the first data row follows the header
    for row in reader:
        if None in row:
            records.append((start, f"{len(row[None]) + len(reader.fieldnames)} cells, the header has "  # type: ignore[index]
                            f"{len(reader.fieldnames)}; quote cells that contain commas"))  # fmt: skip
        else:
            records.append((start, {k: v for k, v in row.items() if v not in (None, "")}))
        start = reader.line_num + 1
    return records


def _check_record(root: Path, metadata: Path, record: Any, line_number: int, seen: dict[str, int]) -> Entry | str:
    """The record's entry, or what is wrong with it (a message for a Problem at `line_number`)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return 'expected a JSON object like {"file_name": "a.png", "text": "a caption"}'
    file_name = record.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        return f'missing "file_name" (the image path relative to {metadata.name})'
    relative = PurePosixPath(file_name.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts:
        return f"file_name {file_name!r} must be a path inside {root}"
    if relative.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"file_name {file_name!r} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    key = unicodedata.normalize("NFC", relative.as_posix())
    if key in seen:
        return f"file_name {file_name!r} is listed twice (first on line {seen[key]})"
    seen[key] = line_number
    image = root.joinpath(*relative.parts)
    if not image.is_file():
        return f"file {file_name!r} not found in {root}"
    text = record["text"] if "text" in record else record.get("caption")
    if text is not None and not isinstance(text, str):
        return f'"text"/"caption" must be a string, got {type(text).__name__}'
    text = text.strip() if text else None
    return key, image, text or None

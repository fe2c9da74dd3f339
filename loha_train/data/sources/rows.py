"""How a table source is reopened in any process (`TableSpec`), and one row's image bytes (`RowRef`)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from loha_train.data.common import DataError

TableFormat = Literal["saved", "parquet", "arrow", "json", "csv"]


@dataclass(frozen=True)
class TableSpec:
    """A table as the `datasets` library loads it: a save_to_disk folder, or data files of one format."""

    format: TableFormat
    location: str  # the configured path (or hf:OWNER/NAME), for messages and item keys
    files: tuple[str, ...] = ()  # data files (sorted); for "saved" the folder
    split: str = "train"  # for a save_to_disk DatasetDict
    base: str = ""  # folder that relative image paths in the table are relative to


@lru_cache(maxsize=16)
def open_table(spec: TableSpec) -> Any:
    """The `datasets.Dataset` of `spec` (memory-mapped arrow; opened once per process)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if spec.format == "saved":
            loaded = datasets.load_from_disk(spec.files[0])
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise DataError(
                        f"{spec.location}: the saved DatasetDict has no split {spec.split!r} (it has "
                        f"{', '.join(loaded)}); set data.hf_split"
                    )
                loaded = loaded[spec.split]
            return loaded
        if spec.format == "arrow":
            return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in spec.files])
        return datasets.load_dataset(spec.format, data_files=list(spec.files), split="train")
    except DataError:
        raise
    except Exception as e:  # the library's own errors (bad files, schema mismatch between shards): one message
        raise DataError(f"{spec.location}: the datasets library cannot read it ({type(e).__name__}: {e})") from e


@lru_cache(maxsize=16)
def arrow_view(spec: TableSpec) -> Any:
    """The table with rows as pyarrow tables: image cells stay encoded bytes, whatever the column's feature."""
    return open_table(spec).with_format("arrow")


def fingerprint(spec: TableSpec) -> str:
    """The dataset's fingerprint (changes when its data change); the cache key of its rows together with the row."""
    dataset = open_table(spec)
    value = getattr(dataset, "_fingerprint", None)
    if value:
        return str(value)
    digest = hashlib.sha256()
    for name in spec.files:
        stat = Path(name).stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class RowRef:
    """One image stored inside a table: its row and column. Picklable, so DataLoader workers reopen the table."""

    spec: TableSpec
    row: int
    column: str
    fingerprint: str  # of the table when it was scanned

    @property
    def content_id(self) -> str:
        """What the latent cache keys this image on: the dataset fingerprint and the row."""
        return f"{self.fingerprint}#{self.row}"

    def read_bytes(self) -> bytes:
        """The encoded image (PNG, JPEG, ...) of the row."""
        value = arrow_view(self.spec)[self.row].column(self.column)[0].as_py()
        return image_bytes(value, self.spec.base, f"{self.spec.location} row {self.row}")

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read_bytes())


def image_bytes(value: Any, base: str, where: str) -> bytes:
    """The bytes of an image cell: {"bytes", "path"} (datasets' Image feature), raw bytes, or a file path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else Path(base) / value
        try:
            return path.read_bytes()
        except OSError as e:
            raise DataError(f"{where}: cannot read the image file {path} ({e.strerror or e})") from e
    if hasattr(value, "save"):  # a decoded PIL image (a dataset without the Image feature's decode=False)
        out = io.BytesIO()
        value.save(out, format="PNG")
        return out.getvalue()
    raise DataError(f"{where}: the image cell is empty or not an image ({type(value).__name__})")

"""Data sources beyond image folders: 🤗 datasets tables (save_to_disk, parquet/arrow/jsonl/csv, hf: hub ids).

`detect_source` says what a `data.path` is; `read_table` loads a table source through the `datasets` library and
returns one record per row (caption, size columns, and where the image bytes are); `RowRef` reopens a row's image
in any process. Folders of images with caption files stay with `data.scan`.
"""

from loha_train.data.sources.hub import HUB_PREFIX, is_hub, resolve_hub
from loha_train.data.sources.rows import RowRef, TableSpec, open_table
from loha_train.data.sources.tables import SourceKind, TableRead, TableRecord, detect_source, read_table

__all__ = [
    "HUB_PREFIX",
    "RowRef",
    "SourceKind",
    "TableRead",
    "TableRecord",
    "TableSpec",
    "detect_source",
    "is_hub",
    "open_table",
    "read_table",
    "resolve_hub",
]

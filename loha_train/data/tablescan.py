"""A source read through the `datasets` library: detect, locate, read the rows, log what was used."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from loha_train.config import DataConfig
from loha_train.data.common import Problem
from loha_train.data.sources import TableRecord, detect_source
from loha_train.data.sources.tables import Columns, locate, read_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableScan:
    """The rows of a table source, its problems, and what it is (for the plan)."""

    records: list[TableRecord]
    problems: list[Problem]
    kind: str  # e.g. "parquet table", "save_to_disk", "hub parquet"


def scan_table(cfg: DataConfig, key: str) -> TableScan | Path:
    """The rows of cfg.path when it is a table source; else the folder to scan for images and caption files."""
    path = str(cfg.path)
    kind = detect_source(path)
    if kind in ("folder", "imagefolder"):
        return Path(path).expanduser()
    located = locate(path, kind, cfg.hf_split, cfg.hf_revision, cfg.hf_config, key)
    if isinstance(located, Path):
        return located
    columns = Columns(cfg.image_column, cfg.caption_column, cfg.width_column, cfg.height_column)
    read = read_table(located, columns, key)
    image, caption, width, height = read.columns
    sized = f", sizes from {width}/{height}" if width else ""
    logger.info("%s: %d rows; image column %r, caption column %r%s", path, len(read.records), image, caption, sized)
    label = {"saved": "save_to_disk", "hub": f"hub {located.format}"}.get(kind, f"{located.format} table")
    return TableScan(read.records, read.problems, label)

"""`hf:OWNER/NAME` sources: found in the local Hugging Face cache only (never downloaded during a run).

Two caches are searched: the hub cache (`hf download OWNER/NAME --repo-type dataset` fills it; its snapshot
folders hold the repository's parquet/arrow/jsonl/csv files or an imagefolder) and the `datasets` cache (arrow
files written by `datasets.load_dataset`). Nothing here touches the network, so an uncached id fails at once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loha_train.data.common import DataError

HUB_PREFIX = "hf:"
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
TABLE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


def is_hub(path: str) -> bool:
    return path.startswith(HUB_PREFIX)


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return _hf_home() / "hub"


def datasets_cache() -> Path:
    """Where `datasets` keeps prepared arrow files: $HF_DATASETS_CACHE, else $HF_HOME/datasets."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    return _hf_home() / "datasets"


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser()


def resolve_hub(location: str, split: str, revision: str | None, config: str | None, key: str) -> list[Path]:
    """The cached files (or one imagefolder folder) of `hf:OWNER/NAME` for `split`; DataError when not cached."""
    repo_id = location[len(HUB_PREFIX) :].strip("/")
    if not _ID.match(repo_id):
        raise DataError(f"{key}: {location!r} is not a hub dataset id; write hf:OWNER/NAME (e.g. hf:user/my-images)")
    snapshot = _snapshot(repo_id, revision)
    if snapshot is not None:
        root = snapshot / config if config and (snapshot / config).is_dir() else snapshot
        files = _split_files(root, split)
        if files:
            return files
        if any((root / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):
            return [root]
    arrows = _prepared_arrow(repo_id, split, config)
    if arrows:
        return arrows
    revision_text = f" --revision {revision}" if revision else ""
    raise DataError(
        f"{key}: the hub dataset {repo_id} (split {split!r}{f', config {config!r}' if config else ''}) is not in "
        f"the local Hugging Face cache ({hub_cache()}), and loha-train never downloads during a run. Download it "
        f"first with `hf download {repo_id} --repo-type dataset{revision_text}` (or run `datasets.load_dataset"
        f"('{repo_id}')` once with the network on; HF_DATASETS_OFFLINE=1 keeps later runs offline), or point "
        "data.path at a local copy."
    )


def _snapshot(repo_id: str, revision: str | None) -> Path | None:
    repo = hub_cache() / f"datasets--{repo_id.replace('/', '--')}"
    wanted = revision or "main"
    commit = wanted if _COMMIT.match(wanted) else None
    ref = repo / "refs" / wanted
    if commit is None and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    if commit and (repo / "snapshots" / commit).is_dir():
        return repo / "snapshots" / commit
    return None


def _split_files(root: Path, split: str) -> list[Path]:
    """The data files of `split` under `root`, of the first format present (parquet, arrow, jsonl/json, csv),
    named as the hub names splits (`train-00000-of-00002.parquet`, `data/train/...`, `test.csv`)."""
    pattern = re.compile(rf"(^|[-_./]){re.escape(split)}([-_.0-9]|$)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.parts))
    for suffixes in ((".parquet",), (".arrow",), (".jsonl", ".json"), (".csv",)):
        found = [p for p in files if p.suffix in suffixes and p.name not in ("metadata.jsonl", "metadata.csv")]
        chosen = [p for p in found if pattern.search(p.relative_to(root).as_posix())]
        if chosen:
            return chosen
        if found and split == "train" and not any(re.search(r"(test|valid|validation|eval)", p.name) for p in found):
            return found  # a repository without split names: everything is train, as datasets reads it
    return []


def _prepared_arrow(repo_id: str, split: str, config: str | None) -> list[Path]:
    """Arrow files `datasets.load_dataset` prepared: <cache>/OWNER___NAME/<config>/<version>/<hash>/*-<split>*.arrow."""
    base = datasets_cache() / repo_id.replace("/", "___")
    if not base.is_dir():
        return []
    configs = [base / config] if config else sorted(p for p in base.iterdir() if p.is_dir())
    for folder in configs:
        found = sorted(folder.glob(f"*/*/*-{split}.arrow")) + sorted(folder.glob(f"*/*/*-{split}-*.arrow"))
        if found:
            newest = max(found, key=lambda p: p.stat().st_mtime).parent
            return sorted(p for p in found if p.parent == newest)
    return []

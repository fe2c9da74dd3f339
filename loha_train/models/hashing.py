"""sha256 of model weight files, remembered per (path, size, mtime) in memory and in the cache dir."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_MEMORY: dict[str, str] = {}


def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """sha256 (hex) of a file; for .safetensors only of the tensor data after the header (WebUI's addnet hash).

    Hashing a 2-7 GB checkpoint takes seconds, so results are kept per (absolute path, size, mtime) in memory and,
    when `cache_file` is given, in that JSON file across runs. A changed file has a new key and is hashed again.
    """
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key in _MEMORY:
        return _MEMORY[key]
    stored = _load(cache_file) if cache_file else {}
    if key not in stored:
        stored[key] = _sha256(path)
        if cache_file:
            _save(cache_file, stored)
    _MEMORY[key] = stored[key]
    return stored[key]


def folder_sha256(root: Path, cache_file: Path | None = None) -> str:
    """sha256 over a folder's weight files: their relative paths and file hashes (configs do not count).

    Raises FileNotFoundError when the folder holds no weight files.
    """
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{root}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    lines = "".join(f"{p.relative_to(root).as_posix()} {file_sha256(p, cache_file)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if path.suffix == ".safetensors":
            (header_len,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + header_len)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path, data: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # the cache only saves time; a read-only cache dir must not stop a run

"""Shared pieces of the data package: the error type, problem records, seeded RNGs and file hashing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# .gif and .tif/.tiff train on their first frame (an animated GIF's first frame, a multi-page TIFF's first page)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def non_finite_latents(where: str) -> DataError:
    """The error for an image the VAE turned into NaN/inf latents (`where` names it)."""
    return DataError(
        f"{where}: the VAE encoded this image to non-finite latents (NaN or inf), which would poison training; "
        "encode in float32 (model.vae_dtype: fp32), or check the image and the VAE"
    )


class DataError(Exception):
    """A dataset problem the user must fix: the message names the file(s) and what is wrong."""


@dataclass(frozen=True)
class Problem:
    """One bad file found while scanning or checking; `item_key` names the image it makes unusable."""

    path: Path
    message: str
    line: int | None = None  # 1-based line number inside `path`, for metadata.jsonl
    item_key: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


def _as_int(part: int | str) -> int:
    if isinstance(part, int):
        return part & 0xFFFF_FFFF_FFFF_FFFF if part < 0 else part  # SeedSequence takes no negatives
    return int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "little")


def derive_rng(*parts: int | str) -> np.random.Generator:
    """A generator seeded only by `parts` (e.g. seed, "caption", epoch, slot): no global RNG state.

    Strings are hashed stably (blake2b), so the stream is the same on every OS, Python and process.
    """
    return np.random.default_rng(np.random.SeedSequence([_as_int(p) for p in parts]))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def decode_text(path: Path) -> tuple[str, Problem | None]:
    """Read a text file as UTF-8 (a BOM is allowed); other encodings are a problem, never mojibake."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        return "", Problem(
            path,
            f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); re-save it with UTF-8 encoding",
        )

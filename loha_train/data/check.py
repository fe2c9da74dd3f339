"""Up-front dataset checks: every image opened and decoded once, every problem reported together."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from loha_train.config import DataConfig
from loha_train.data.buckets import Bucket, assign_bucket, bucket_resolutions, smallest_usable_side
from loha_train.data.common import DataError, Problem, sha256_bytes
from loha_train.data.scan import DatasetIndex, ImageItem

logger = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # rotated by 90 degrees: width and height swap


@dataclass(frozen=True)
class CheckReport:
    """The outcome of `check_images`."""

    index: DatasetIndex  # usable items only, each with `size` and `sha256` set; `problems` cleared
    problems: tuple[Problem, ...]  # every problem found while scanning and checking (skipped ones)
    checked: int  # images opened


def check_images(
    index: DatasetIndex,
    skip_bad: bool,
    *,
    max_workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Open and fully decode every image; record its size and content hash; collect every problem.

    Problems: unreadable, zero-byte, truncated or corrupt images, images too small to place without
    upscaling (bucket_no_upscale), plus the scan's problems (non-UTF-8 captions, bad metadata.jsonl lines,
    missing files). With `skip_bad` False any problem raises one DataError listing all of them; with True
    they are logged as warnings and the affected images dropped. Raises DataError as well when no usable
    training images remain (or none in a configured reg/validation folder). JPEGs are decoded at 1/8
    scale, which still reads the whole stream (so truncation is caught) at a fraction of the cost.
    `progress(done, total)` is called after each image.
    """
    cfg = index.config
    buckets = bucket_resolutions(cfg) if cfg.bucketing else ()
    items = index.items
    total = len(items)
    results: list[tuple[ImageItem, Problem | None]] = []
    sized = [item for item in items if item.row is not None and item.size is not None]  # table size columns
    if sized:
        results += [_check_one(item, cfg, buckets) for item in sized]  # nothing to decode: no thread pool
        items = tuple(item for item in items if not (item.row is not None and item.size is not None))
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for result in pool.map(lambda item: _check_one(item, cfg, buckets), items):
            results.append(result)
            if progress is not None:
                progress(len(results), total)

    problems = list(index.problems) + [p for _, p in results if p is not None]
    if problems and not skip_bad:
        raise DataError(_problems_message(problems, cfg))
    for problem in problems:
        logger.warning("skipping bad data: %s", problem)
    if problems:
        logger.warning("skipped %d bad files (data.skip_bad_images is on)", len(problems))

    good = {item.key: item for item, problem in results if problem is None}
    cleaned = replace(
        index,
        train=tuple(good[i.key] for i in index.train if i.key in good),
        reg=tuple(good[i.key] for i in index.reg if i.key in good),
        validation=tuple(good[i.key] for i in index.validation if i.key in good),
        problems=(),
    )
    _require_nonempty(cleaned, problems)
    _warn_crops(cleaned.items, cfg, buckets)
    return CheckReport(index=cleaned, problems=tuple(problems), checked=total)


def image_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation is applied."""
    width, height = image.size
    if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def read_image_size(path: Path | BinaryIO) -> tuple[int, int]:
    """(width, height) of an image file as displayed, from its header."""
    with Image.open(path) as image:
        return image_size(image)


def _check_one(item: ImageItem, cfg: DataConfig, buckets: tuple[Bucket, ...]) -> tuple[ImageItem, Problem | None]:
    def problem(message: str) -> tuple[ImageItem, Problem]:
        return item, Problem(item.path, f"row {item.row.row}: {message}" if item.row else message, item_key=item.key)

    if item.row is not None and item.size is not None:
        return _check_size(item, item.size, cfg, buckets, problem)  # size columns: planned without decoding
    try:
        data = item.read_bytes()
    except (OSError, DataError) as e:
        return problem(f"cannot read the file ({getattr(e, 'strerror', None) or e})")
    if not data:
        return problem("empty file (0 bytes); re-export or re-download it")
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image_size(image)
            if image.format in ("JPEG", "MPO"):
                image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
            image.load()
    except UnidentifiedImageError:
        return problem("not a readable image (unknown or corrupt format)")
    except Image.DecompressionBombError as e:
        return problem(f"image too large to open safely ({e})")
    except (OSError, SyntaxError, ValueError) as e:
        return problem(f"truncated or corrupt image ({e}); re-export or re-download it")
    return _check_size(replace(item, size=size, sha256=sha256_bytes(data)), size, cfg, buckets, problem)


def _check_size(
    checked: ImageItem,
    size: tuple[int, int],
    cfg: DataConfig,
    buckets: tuple[Bucket, ...],
    problem: Callable[[str], tuple[ImageItem, Problem]],
) -> tuple[ImageItem, Problem | None]:
    ratio = max(size) / max(1, min(size))
    if ratio > cfg.max_aspect_ratio:
        return problem(
            f"{size[0]}x{size[1]} has an aspect ratio of {ratio:.1f}:1, more than data.max_aspect_ratio "
            f"({cfg.max_aspect_ratio:g}): it would train as a crop keeping {kept_fraction(size, cfg, buckets):.0%} "
            "of the image. Crop or split it, or raise data.max_aspect_ratio"
        )
    if cfg.bucketing and assign_bucket(size, cfg, buckets) is None:
        return problem(
            f"{size[0]}x{size[1]} is too small to train on: with data.bucket_no_upscale its short side must be at "
            f"least {smallest_usable_side(cfg)} px (smaller images than data.bucket_min_side={cfg.bucket_min_side} "
            "get their own smaller bucket). Use a larger image, or set data.bucket_no_upscale: false to upscale it"
        )
    return checked, None


def kept_fraction(size: tuple[int, int], cfg: DataConfig, buckets: tuple[Bucket, ...]) -> float:
    """How much of an image (width, height) its bucket keeps after the resize-and-crop: 1.0 for a perfect fit."""
    bucket = assign_bucket(size, cfg, buckets) if cfg.bucketing else (cfg.resolution, cfg.resolution)
    if bucket is None:
        return 1.0
    image_ratio, bucket_ratio = size[0] / size[1], bucket[0] / bucket[1]
    return min(image_ratio / bucket_ratio, bucket_ratio / image_ratio)


CROP_WARNING = 0.6  # warn when a bucket keeps less than this fraction of an image


def _warn_crops(items: tuple[ImageItem, ...], cfg: DataConfig, buckets: tuple[Bucket, ...]) -> None:
    """Warn (before the plan) about images whose aspect ratio no bucket fits, naming the worst."""
    kept = sorted((kept_fraction(i.size, cfg, buckets), i.path) for i in items if i.size is not None)
    cropped = [(fraction, path) for fraction, path in kept if fraction < CROP_WARNING]
    if cropped:
        worst, path = cropped[0]
        logger.warning(
            "%d image(s) have an aspect ratio no bucket fits and lose more than %.0f%% to cropping (worst: %s "
            "keeps %.0f%%); crop them yourself, or widen the buckets (data.bucket_min_side/bucket_max_side)",
            len(cropped),
            100 * (1 - CROP_WARNING),
            path,
            100 * worst,
        )


def _problems_message(problems: list[Problem], cfg: DataConfig) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return (
        f"found {count} in the dataset (data.path: {cfg.path}):\n{lines}\n"
        "Fix or remove these files, or set data.skip_bad_images: true to skip them with a warning."
    )


def _require_nonempty(index: DatasetIndex, problems: list[Problem]) -> None:
    cfg = index.config
    roles = [("data.path", cfg.path, index.train)]
    if cfg.reg_path:
        roles.append(("data.reg_path", cfg.reg_path, index.reg))
    if cfg.validation_path:
        roles.append(("data.validation_path", cfg.validation_path, index.validation))
    for key, folder, items in roles:
        if not items:
            raise DataError(
                f"{key}: no usable images left in {folder} after skipping {len(problems)} bad files "
                "(listed in the warnings above); fix them or add images"
            )

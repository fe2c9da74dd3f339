"""Aspect-ratio buckets, the resize/crop plan of each image, and loading an image as a pixel tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from loha_train.config import DataConfig
from loha_train.data.common import DataError
from loha_train.data.imaging import to_8bit

Bucket = tuple[int, int]  # (width, height) in pixels, as in kohya's ss_bucket_info


@dataclass(frozen=True)
class CropPlan:
    """How one image becomes a training tensor: resize to `resized`, crop `target` at (left, top), flip.

    All sizes are (width, height); `left`/`top` are in the resized image (SDXL's crops_coords_top_left).
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    target: Bucket
    left: int
    top: int
    flip: bool = False

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop in the resized image as the model sees it, i.e. after any flip."""
        left = self.resized[0] - self.left - self.target[0] if self.flip else self.left
        return (self.top, left)


def bucket_resolutions(cfg: DataConfig) -> tuple[Bucket, ...]:
    """kohya's bucket set: sides multiples of bucket_step in [min, max] side, area <= resolution^2.

    For every width w the tallest fitting height is taken (and its transpose), plus the largest square.
    Sorted by (width, height).
    """
    step, area = cfg.bucket_step, cfg.resolution**2
    low = math.ceil(cfg.bucket_min_side / step) * step
    high = cfg.bucket_max_side // step * step
    square = min(math.isqrt(area) // step * step, high)
    buckets: set[Bucket] = {(square, square)} if square >= low else set()
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            buckets.update({(width, height), (height, width)})
    if not buckets:
        raise DataError(
            f"no bucket fits: data.bucket_min_side={cfg.bucket_min_side}, data.bucket_max_side="
            f"{cfg.bucket_max_side}, data.bucket_step={step} and data.resolution={cfg.resolution} leave no "
            "side length that is a multiple of the step, within [min, max] and with area <= resolution^2."
        )
    return tuple(sorted(buckets))


@lru_cache(maxsize=1 << 16)  # large datasets repeat sizes: planning 100k table rows must take seconds
def assign_bucket(size: tuple[int, int], cfg: DataConfig, buckets: tuple[Bucket, ...]) -> Bucket | None:
    """The bucket an image of `size` (width, height) trains in, or None if it cannot be placed.

    Bucketing off: resolution x resolution. Otherwise the bucket whose aspect ratio is closest in log
    space (so an image and its transpose get transposed buckets; ties go to the larger area). With
    bucket_no_upscale, an image too small to cover that bucket gets its own size instead: scaled down
    to the area bound if needed, sides rounded down to bucket_step and capped at bucket_max_side, even below
    bucket_min_side (kohya does the same); None only for an image too small to train at all
    (smallest_usable_side).
    """
    if not cfg.bucketing:
        return (cfg.resolution, cfg.resolution)
    width, height = size
    log_ar = math.log(width / height)

    def distance(bucket: Bucket) -> tuple[float, int, Bucket]:
        return (round(abs(math.log(bucket[0] / bucket[1]) - log_ar), 9), -bucket[0] * bucket[1], bucket)

    best = min(buckets, key=distance)
    if not cfg.bucket_no_upscale or (width >= best[0] and height >= best[1]):
        return best
    return _own_size_bucket(size, cfg)


def _own_size_bucket(size: tuple[int, int], cfg: DataConfig) -> Bucket | None:
    width, height = size
    step = cfg.bucket_step
    scale = min(1.0, math.sqrt(cfg.resolution**2 / (width * height)))
    high = cfg.bucket_max_side // step * step
    bucket = (
        min(math.floor(width * scale + 1e-6) // step * step, high),
        min(math.floor(height * scale + 1e-6) // step * step, high),
    )
    return bucket if min(bucket) >= smallest_usable_side(cfg) else None


MIN_TRAINABLE_SIDE = 64  # px: below this an image is too small to train on without upscaling it


def smallest_usable_side(cfg: DataConfig) -> int:
    """The short side below which bucket_no_upscale cannot place an image: 64 px (bucket_min_side if that is
    lower), rounded up to bucket_step."""
    return math.ceil(min(cfg.bucket_min_side, MIN_TRAINABLE_SIDE) / cfg.bucket_step) * cfg.bucket_step


def plan_crop(size: tuple[int, int], target: Bucket) -> CropPlan:
    """Resize `size` to just cover `target` (keeping the aspect ratio), then crop the center."""
    width, height = size
    scale = max(target[0] / width, target[1] / height)
    resized = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
    return CropPlan(
        original=size,
        resized=resized,
        target=target,
        left=(resized[0] - target[0]) // 2,
        top=(resized[1] - target[1]) // 2,
    )


def randomize_plan(plan: CropPlan, random_crop: bool, flip: bool, rng: np.random.Generator) -> CropPlan:
    """A random crop position and/or a coin-flip mirror, drawn from `rng` (crop first, then flip)."""
    left, top = plan.left, plan.top
    if random_crop:
        left = int(rng.integers(0, plan.resized[0] - plan.target[0] + 1))
        top = int(rng.integers(0, plan.resized[1] - plan.target[1] + 1))
    mirrored = bool(rng.random() < 0.5) if flip else False
    return replace(plan, left=left, top=top, flip=mirrored)


def open_rgb(path: Path | BinaryIO) -> Image.Image:
    """The image as the viewer shows it: EXIF orientation applied, transparency composited on white."""
    with Image.open(path) as image:
        image = to_8bit(ImageOps.exif_transpose(image))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def load_pixels(path: Path | BinaryIO, plan: CropPlan, where: str | None = None) -> torch.Tensor:
    """The cropped image as a float32 tensor (3, H, W) in [-1, 1], H x W = plan.target (height, width).

    `path` is a file or the bytes of a table row (`where` names it in messages)."""
    image = open_rgb(path)
    if image.size != plan.original:
        raise DataError(
            f"{where or path}: the image is {image.size[0]}x{image.size[1]} but was {plan.original[0]}x"
            f"{plan.original[1]} when the dataset was checked; it changed during the run"
        )
    array = np.asarray(place(image, plan), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def place(image: Image.Image, plan: CropPlan) -> Image.Image:
    """`plan`'s resize (LANCZOS), crop and flip applied to `image`: pixels and their loss masks take these same
    steps, so a mask stays aligned with its image."""
    if image.size != plan.resized:
        image = image.resize(plan.resized, Image.Resampling.LANCZOS)
    image = image.crop((plan.left, plan.top, plan.left + plan.target[0], plan.top + plan.target[1]))
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image

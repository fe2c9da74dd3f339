"""Loss masks (kohya's masked loss): from the alpha channel or a mask folder, resized and cropped like the image.

A mask is stored as uint8 (H, W) at the crop's pixel size (255 = fully trained) and becomes float in [0, 1] in the
batch; the step area-resamples it to the latent grid (`training/step.py`, `apply_loss_mask`), as kohya's
`apply_masked_loss` does. An image without a mask (no alpha channel, a regularization image) weighs 1 everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from loha_train.config import DataConfig
from loha_train.data.buckets import CropPlan, place
from loha_train.data.common import IMAGE_EXTENSIONS, DataError, sha256_file
from loha_train.data.imaging import to_8bit
from loha_train.data.scan import ImageItem

_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def has_alpha(item: ImageItem) -> bool:
    """Whether the image carries transparency (an alpha band, or a palette/greyscale transparency entry)."""
    with Image.open(item.image_source()) as image:
        return image.mode in _ALPHA_MODES or "transparency" in image.info


@dataclass(frozen=True)
class MaskSource:
    """Where each image's mask comes from: `alpha` (its own alpha channel) or `files` (item key -> mask file)."""

    alpha: bool
    files: dict[str, Path]
    with_mask: frozenset[str]  # keys of the items that have a mask (the others weigh 1)

    def identity(self, item: ImageItem) -> str | None:
        """What the mask of `item` is, for cache keys (None: no mask)."""
        if item.key not in self.with_mask:
            return None
        return "alpha" if self.alpha else f"file:{sha256_file(self.files[item.key])}"

    def load(self, item: ImageItem, plan: CropPlan) -> torch.Tensor | None:
        """The mask of `item` under `plan` as uint8 (H, W) = plan.target (height, width), or None."""
        if item.key not in self.with_mask:
            return None
        if self.alpha:
            with Image.open(item.image_source()) as image:
                image = ImageOps.exif_transpose(to_8bit(image))
                mask = image.convert("RGBA").getchannel("A")
            where = item.where
        else:
            where = self.files[item.key]
            with Image.open(where) as image:
                mask = to_8bit(ImageOps.exif_transpose(image)).convert("RGB").getchannel("R")
        return crop_mask(mask, plan, where)

    def summary(self, items: Sequence[ImageItem]) -> str:
        """The plan's line: how many images train with a mask and how many without."""
        masked = sum(item.key in self.with_mask for item in items)
        source = "alpha channel" if self.alpha else "data.mask_path"
        return f"; masked loss ({source}): {masked} image(s) with a mask, {len(items) - masked} without"


def crop_mask(mask: Image.Image, plan: CropPlan, where: Path | str) -> torch.Tensor:
    """A single-band mask image put through the image's resize, crop and flip (`load_pixels`' steps)."""
    if mask.size != plan.original:
        raise DataError(
            f"{where}: the mask is {mask.size[0]}x{mask.size[1]} but its image is {plan.original[0]}x"
            f"{plan.original[1]}; a mask must have its image's size"
        )
    return torch.from_numpy(np.asarray(place(mask, plan), dtype=np.uint8).copy())


def mask_source(cfg: DataConfig, items: Sequence[ImageItem], optional: Sequence[ImageItem] = ()) -> MaskSource | None:
    """The masks of `items` (and of `optional`, e.g. validation images) for data.alpha_mask / data.mask_path;
    None when masked loss is off.

    With data.mask_path every non-regularization image of `items` needs a mask file with its file stem (any image
    extension) in that folder, as kohya requires a conditioning image for each; missing ones are one DataError
    naming them. Regularization images train without a mask, and `optional` images without one weigh 1.
    """
    if cfg.alpha_mask:
        everything = (*items, *optional)
        return MaskSource(True, {}, frozenset(item.key for item in everything if has_alpha(item)))
    if cfg.mask_path is None:
        return None
    folder = Path(cfg.mask_path)
    if not folder.is_dir():
        raise DataError(f"data.mask_path: {folder} is not a folder of mask images")
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(path.stem, path)
    files, missing = {}, []
    for item in items:
        if item.is_reg:
            continue
        if item.path.stem in by_stem:
            files[item.key] = by_stem[item.path.stem]
        else:
            missing.append(item.path.name)
    files |= {item.key: by_stem[item.path.stem] for item in optional if item.path.stem in by_stem}
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"data.mask_path: no mask in {folder} for {len(missing)} image(s): {shown}. Each image needs a mask "
            "with the same file name stem (e.g. cat.png for cat.jpg); white trains, black is ignored."
        )
    return MaskSource(False, files, frozenset(files))

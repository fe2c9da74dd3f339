"""The map-style dataset the sampler indexes with SampleRefs, and the collate that builds training batches."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import Dataset

from loha_train.config import DataConfig
from loha_train.data.buckets import CropPlan, assign_bucket, bucket_resolutions, load_pixels, plan_crop, randomize_plan
from loha_train.data.caches import LatentCache, TextEmbeddingCache
from loha_train.data.captions import caption_rng, process_caption
from loha_train.data.check import read_image_size
from loha_train.data.common import DataError, derive_rng
from loha_train.data.masks import MaskSource
from loha_train.data.sampler import SampleRef
from loha_train.data.scan import ImageItem


def plan_crops(items: Sequence[ImageItem], cfg: DataConfig) -> tuple[CropPlan, ...]:
    """Each item's bucket and center-crop plan (items need `size`, which check_images sets)."""
    buckets = bucket_resolutions(cfg) if cfg.bucketing else ()
    plans = []
    for item in items:
        size = item.size or read_image_size(item.image_source())
        bucket = assign_bucket(size, cfg, buckets)
        if bucket is None:
            raise DataError(f"{item.where}: {size[0]}x{size[1]} is too small for any bucket; run check_images")
        plans.append(plan_crop(size, bucket))
    return tuple(plans)


class ImageDataset(Dataset):
    """Samples for SampleRefs: the step's caption, latents (cached) or pixels, and SDXL size conditioning.

    `augment` True (training): captions go through `process_caption`, and random_crop/flip apply, all seeded
    by (seed, epoch, slot). `augment` False (validation): captions and crops are used as they are. With
    `latents` there is no random crop; flip picks the cached mirrored latents (both orientations are cached, as
    kohya caches `latents_flipped`). With `masks` each sample carries its loss mask under the same crop and flip.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        cfg: DataConfig,
        seed: int,
        *,
        augment: bool = True,
        latents: LatentCache | None = None,
        text: TextEmbeddingCache | None = None,
        masks: MaskSource | None = None,
    ) -> None:
        self.items = tuple(items)
        self.cfg = cfg
        self.seed = seed
        self.augment = augment
        self.latents = latents
        self.text = text
        self.masks = masks
        self.plans = plan_crops(self.items, cfg)
        if latents is not None and augment and any(r.random_crop for r in self._all_rules()):
            raise DataError("data.random_crop needs data.cache_latents: none")

    def _all_rules(self) -> list[DataConfig]:
        return [self.cfg, *{id(i.rules): i.rules for i in self.items if i.rules is not None}.values()]

    @property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        """Each item's bucket (width, height), for BucketBatchSampler."""
        return tuple(plan.target for plan in self.plans)

    def cache_entries(self) -> list[tuple[ImageItem, CropPlan]]:
        """(item, plan) pairs for LatentCache.prepare: with flip (training) each plan and its mirror."""
        entries = list(zip(self.items, self.plans, strict=True))
        if self.augment:  # a subset's own flip rule decides for its images
            entries += [(item, replace(plan, flip=True)) for item, plan in entries if (item.rules or self.cfg).flip]
        return entries

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, ref: SampleRef) -> dict[str, Any]:
        item, plan = self.items[ref.item], self.plans[ref.item]
        rules = item.rules or self.cfg  # a subset's own caption rules, flip, random_crop, prior_loss_weight
        caption = item.caption
        if self.augment:
            caption = process_caption(caption, rules, caption_rng(self.seed, ref.epoch, ref.slot))
            if rules.random_crop or rules.flip:
                rng = derive_rng(self.seed, "crop", ref.epoch, ref.slot)
                plan = randomize_plan(plan, rules.random_crop, rules.flip, rng)
        sample: dict[str, Any] = {
            "key": item.key,
            "caption": caption,
            "is_reg": item.is_reg,
            "loss_weight": rules.prior_loss_weight if item.is_reg else 1.0,
            "original_size": (plan.original[1], plan.original[0]),
            "crop_top_left": plan.crop_top_left,
            "target_size": (plan.target[1], plan.target[0]),
        }
        mask = None
        if self.latents is not None:
            cached = self.latents.entry(item, plan)
            sample["latents"], mask = cached["latents"], cached.get("mask")
        else:
            sample["pixels"] = load_pixels(item.image_source(), plan, item.where)
            mask = self.masks.load(item, plan) if self.masks is not None else None
        if self.masks is not None:
            sample["mask"] = mask  # None: this image has no mask (weighs 1 everywhere)
        if self.text is not None:
            sample["text_embeddings"] = self.text.get(caption)
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch.

    Returns `latents` (B, C, h, w) or `pixels` (B, 3, H, W) in [-1, 1]; `captions` (list of B str);
    `keys` (list of B item keys); `is_reg` (B,) bool; `loss_weight` (B,) float32; `original_size`,
    `crop_top_left`, `target_size` (B, 2) int64 in SDXL's (height, width) / (top, left) order;
    `text_embeddings` (dict of stacked tensors) when a text cache is used; and with masked loss `loss_mask`
    (B, 1, H, W) float32 in [0, 1] at pixel size, ones for images without a mask (kohya fills them so too).
    """
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "is_reg": torch.tensor([s["is_reg"] for s in samples], dtype=torch.bool),
        "loss_weight": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
    }
    for name in ("original_size", "crop_top_left", "target_size"):
        batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.int64)
    for name in ("latents", "pixels"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    if "mask" in samples[0]:
        height, width = (int(v) for v in samples[0]["target_size"])
        masks = [
            torch.full((height, width), 255, dtype=torch.uint8) if s["mask"] is None else s["mask"] for s in samples
        ]
        batch["loss_mask"] = torch.stack(masks).unsqueeze(1).float().div_(255.0)
    if "text_embeddings" in samples[0]:
        names = samples[0]["text_embeddings"]
        batch["text_embeddings"] = {n: torch.stack([s["text_embeddings"][n] for s in samples]) for n in names}
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group, but only the main process decides
    when to stop (after a checkpoint); a worker stops when the main process ends or shuts it down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

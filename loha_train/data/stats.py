"""Provenance: a dataset fingerprint, kohya's ss_tag_frequency, ss_dataset_dirs and ss_bucket_info shapes."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from typing import Any

from loha_train.data.dataset import plan_crops
from loha_train.data.sampler import allocate_quota
from loha_train.data.scan import DatasetIndex, ImageItem


def dataset_fingerprint(index: DatasetIndex) -> dict[str, Any]:
    """Counts plus a SHA-256 over every item's role, key, image bytes, caption and repeats, in order.

    Returns {"images", "reg_images", "validation_images": int, "repeats": training samples per epoch,
    "reg_repeats": sum of reg repeats, "sha256": hex}. Equal fingerprints mean the same images with the
    same captions and repeats; the folder's location does not matter (keys are relative).
    """
    digest = hashlib.sha256()
    for role, items in (("train", index.train), ("reg", index.reg), ("validation", index.validation)):
        for item in items:
            image_hash = item.content_id()
            record = [role, item.key, image_hash, item.caption, item.repeats]
            digest.update(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    return {
        "images": len(index.train),
        "reg_images": len(index.reg),
        "validation_images": len(index.validation),
        "repeats": sum(item.repeats for item in index.train),
        "reg_repeats": sum(item.repeats for item in index.reg),
        "sha256": digest.hexdigest(),
    }


def tag_frequencies(index: DatasetIndex) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {subset folder name: {tag: occurrences}}.

    As sd-scripts' `BaseDataset.set_tag_frequency`: every training and regularization caption (as trained here,
    trigger word included), split on the separator, stripped, lower-cased, each occurrence counted once
    whatever the image's repeats.
    """
    separator = index.config.caption_separator
    frequencies: dict[str, Counter[str]] = defaultdict(Counter)
    for item in index.train + index.reg:
        frequencies[item.subset].update(t.strip().lower() for t in item.caption.split(separator) if t.strip())
    return {subset: dict(sorted(counts.items())) for subset, counts in sorted(frequencies.items())}


def dataset_dirs(items: tuple[ImageItem, ...]) -> dict[str, dict[str, int]]:
    """kohya's ss_dataset_dirs (training items) or ss_reg_dataset_dirs (regularization items): one entry per
    folder (`10_mychar`), {"n_repeats": its repeats, "img_count": its images}; WebUI sums img_count."""
    dirs: dict[str, dict[str, int]] = {}
    for item in items:
        entry = dirs.setdefault(item.subset, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs


def images_times_repeats(items: tuple[ImageItem, ...]) -> int:
    """kohya's ss_num_train_images / ss_num_reg_images: images x repeats, summed over folders."""
    return sum(item.repeats for item in items)


def bucket_info(index: DatasetIndex) -> dict[str, Any]:
    """kohya's ss_bucket_info: {"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}.

    `count` is samples per epoch in that bucket (training repeats plus the regularization quota, as
    BucketBatchSampler draws them); `mean_img_ar_error` is the mean |bucket w/h - image w/h| over the
    training and regularization images. Items need `size` (check_images sets it).
    """
    train, reg = index.train, index.reg
    plans = plan_crops(train + reg, index.config)
    counts: Counter[tuple[int, int]] = Counter()
    reg_pool: Counter[tuple[int, int]] = Counter()
    for item, plan in zip(train + reg, plans, strict=True):
        (reg_pool if item.is_reg else counts)[plan.target] += item.repeats
    counts.update(allocate_quota(sum(counts.values()), dict(reg_pool)))
    errors = [abs(p.target[0] / p.target[1] - p.original[0] / p.original[1]) for p in plans]
    return {
        "buckets": {
            i: {"resolution": list(bucket), "count": counts[bucket]} for i, bucket in enumerate(sorted(counts))
        },
        "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0,
    }

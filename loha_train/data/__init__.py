"""Images and captions -> training batches: discovery, checks, buckets, sampling, captions and caches.

Typical use by the training recipe::

    index = check_images(scan_dataset(cfg.data, seed), skip_bad=cfg.data.skip_bad_images).index
    dataset = ImageDataset(index.train + index.reg, cfg.data, seed, latents=cache, text=text_cache)
    cache.prepare(dataset.cache_entries(), encode=vae_encode)
    sampler = BucketBatchSampler(dataset.items, dataset.buckets, batch_size, seed)
    sampler.set_epoch(epoch, start_batch)  # exact resume
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
"""

from loha_train.data import sources
from loha_train.data.buckets import (
    Bucket,
    CropPlan,
    assign_bucket,
    bucket_resolutions,
    load_pixels,
    plan_crop,
    randomize_plan,
)
from loha_train.data.caches import (
    CacheStats,
    LatentCache,
    TextEmbeddingCache,
    default_cache_dir,
    fixed_captions,
)
from loha_train.data.captions import caption_rng, captions_vary, process_caption
from loha_train.data.check import CheckReport, check_images, read_image_size
from loha_train.data.common import DataError, Problem, derive_rng
from loha_train.data.dataset import ImageDataset, collate, ignore_stop_signals, plan_crops
from loha_train.data.sampler import BucketBatchSampler, SampleRef
from loha_train.data.scan import DatasetIndex, ImageItem, SourceSummary, scan_dataset, split_validation
from loha_train.data.stats import (
    bucket_info,
    dataset_dirs,
    dataset_fingerprint,
    images_times_repeats,
    tag_frequencies,
)
from loha_train.data.streaming import StreamBatches, stream_fingerprint
from loha_train.data.subsets import all_rules, source_configs

__all__ = [
    "Bucket",
    "BucketBatchSampler",
    "CacheStats",
    "CheckReport",
    "CropPlan",
    "DataError",
    "DatasetIndex",
    "ImageDataset",
    "ImageItem",
    "LatentCache",
    "Problem",
    "SampleRef",
    "SourceSummary",
    "StreamBatches",
    "TextEmbeddingCache",
    "all_rules",
    "assign_bucket",
    "bucket_info",
    "bucket_resolutions",
    "caption_rng",
    "captions_vary",
    "check_images",
    "collate",
    "dataset_dirs",
    "dataset_fingerprint",
    "default_cache_dir",
    "derive_rng",
    "fixed_captions",
    "ignore_stop_signals",
    "images_times_repeats",
    "load_pixels",
    "plan_crop",
    "plan_crops",
    "process_caption",
    "randomize_plan",
    "read_image_size",
    "scan_dataset",
    "source_configs",
    "sources",
    "split_validation",
    "stream_fingerprint",
    "tag_frequencies",
]

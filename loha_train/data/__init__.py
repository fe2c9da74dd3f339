"""Images and captions -> training batches: discovery, checks, buckets, sampling, captions and caches."""

from loha_train.data.buckets import (
    Bucket,
    CropPlan,
    assign_bucket,
    bucket_resolutions,
    load_pixels,
    plan_crop,
    randomize_plan,
)
from loha_train.data.captions import caption_rng, captions_vary, process_caption
from loha_train.data.check import CheckReport, check_images, read_image_size
from loha_train.data.common import DataError, Problem, derive_rng
from loha_train.data.scan import DatasetIndex, ImageItem, scan_dataset, split_validation

__all__ = [
    "Bucket",
    "CheckReport",
    "CropPlan",
    "DataError",
    "DatasetIndex",
    "ImageItem",
    "Problem",
    "assign_bucket",
    "bucket_resolutions",
    "caption_rng",
    "captions_vary",
    "check_images",
    "derive_rng",
    "load_pixels",
    "plan_crop",
    "process_caption",
    "randomize_plan",
    "read_image_size",
    "scan_dataset",
    "split_validation",
]

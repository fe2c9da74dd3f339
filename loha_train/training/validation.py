"""The validation loss: the held-out images with fixed noise and timesteps, adapters in eval mode."""

from __future__ import annotations

from typing import Any

import torch

from loha_train import data
from loha_train.config import Config
from loha_train.models.bundle import ModelBundle
from loha_train.training.data_pipeline import DataPipeline
from loha_train.training.step import micro_step


@torch.no_grad()
def validation_loss(cfg: Config, bundle: ModelBundle, accelerator: Any, pipeline: DataPipeline) -> float:
    """Loss on the held-out set with fixed noise and timesteps (seeded by the item), adapters in eval mode."""
    assert pipeline.validation is not None
    sampler = data.BucketBatchSampler(
        pipeline.validation.items, pipeline.validation.buckets, cfg.train.batch_size, cfg.train.seed, shuffle=False
    )
    unet = bundle.unet
    was_training = unet.training
    unet.eval()
    total, count = 0.0, 0
    rng_state = torch.random.get_rng_state()
    try:
        for n, refs in enumerate(sampler.epoch_batches(0)):
            batch = data.collate([pipeline.validation[r] for r in refs])
            torch.manual_seed(cfg.train.seed * 1000003 + n)
            with accelerator.autocast():
                total += micro_step(cfg, bundle, accelerator.device, batch).item() * len(refs)
            count += len(refs)
    finally:
        torch.random.set_rng_state(rng_state)
        unet.train(was_training)
    return total / max(count, 1)

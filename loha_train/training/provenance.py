"""The adapter file's metadata as a function of the run's progress: kohya ss_*, modelspec and our provenance."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loha_train import __version__, data
from loha_train.config import Config, config_to_dict
from loha_train.fileformat.metadata import build_metadata
from loha_train.loha.inject import LoHaNetwork
from loha_train.models import builtin
from loha_train.models.bundle import ModelBundle
from loha_train.models.detect import model_hash
from loha_train.training.data_pipeline import DataPipeline
from loha_train.training.plan import RunPlan
from loha_train.training.setup import used_alpha


def provenance(
    cfg: Config, bundle: ModelBundle, pipeline: DataPipeline, plan: RunPlan, network: LoHaNetwork
) -> Callable[[dict[str, Any]], dict[str, str]]:
    """A function of the run's progress that returns the adapter file's metadata (kohya, modelspec, ours)."""
    started = time.time()
    config = config_to_dict(cfg)
    if cfg.network.init_from:  # the file's alphas were loaded: record what the adapters use, not the config's
        config["network"]["alpha"] = used_alpha(network)
    fixed = {
        "config": config,
        "network": network,
        "family": bundle.family,
        "prediction_type": bundle.prediction_type,
        "base_model_hash": model_hash(cfg.model.path),
        "base_model_name": Path(cfg.model.path).name if not builtin.is_builtin(cfg.model.path) else cfg.model.path,
        "dataset": {
            "fingerprint": pipeline.fingerprint,
            "tag_frequency": data.tag_frequencies(pipeline.index),
            "bucket_info": data.bucket_info(pipeline.index),
            "dataset_dirs": data.dataset_dirs(pipeline.index.train),
            "reg_dataset_dirs": data.dataset_dirs(pipeline.index.reg),
            "num_train_images": data.images_times_repeats(pipeline.index.train),
            "num_reg_images": data.images_times_repeats(pipeline.index.reg),
        },
        "plan": {
            "total_steps": plan.total_steps,
            "effective_batch": plan.effective_batch,
            "world_size": plan.world_size,
            "steps_per_epoch": plan.steps_per_epoch,
        },
        "version": __version__,
        "started_at": started,
    }

    def metadata(stats: dict[str, Any]) -> dict[str, str]:
        return build_metadata(**fixed, stats=stats)

    return metadata

"""Resuming: the settings a checkpoint must share with the run, where the run restarts, and what a resume changes."""

from __future__ import annotations

import logging
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from loha_train.config import Config, config_to_dict
from loha_train.config.check import iter_fields, to_plain
from loha_train.training import checkpoint
from loha_train.training.checkpoint import CheckpointError, TrainState
from loha_train.training.data_pipeline import DataPipeline
from loha_train.training.plan import Position, RunPlan, rescale_position

logger = logging.getLogger(__name__)

_RESUME_IGNORED = {
    "network.init_from",
    "data.num_workers",
    "data.skip_bad_images",
    "data.cache_latents",
    "data.cache_text_embeddings",
    "data.validation_path",
}
# gradient_accumulation may change (the batch position is per micro-batch): with the number of processes it is
# how a resumed run keeps its effective batch; warn_if_layout_changed warns when the effective batch changes.
# train.lr_pattern decides the optimizer's parameter groups, whose saved state must fit them.
_RESUME_TRAIN = {"train.batch_size", "train.seed", "train.lr_pattern"}


def resume_settings(cfg: Config, pipeline: DataPipeline, base_hash: str) -> dict[str, Any]:
    """The dotted settings a resumed run must share with its checkpoint (what the adapter and data order depend on)."""
    flat = _flatten(config_to_dict(cfg))
    keep = {
        k: v
        for k, v in flat.items()
        if (k.startswith(("model.", "network.", "data.", "train.ema")) or k in _RESUME_TRAIN)
        and k not in _RESUME_IGNORED
    }
    keep["model.content_sha256"] = base_hash
    keep["data.content_sha256"] = pipeline.fingerprint["sha256"]
    return keep


def setting_defaults() -> dict[str, Any]:
    """Every setting's default by dotted key, in the plain form `resume_settings` records (for checkpoints
    written before a setting existed)."""
    out: dict[str, Any] = {}
    for key, _owner, f in iter_fields(Config):
        if f.default is not MISSING:
            out[key] = to_plain(f.default)
        elif f.default_factory is not MISSING:
            out[key] = to_plain(f.default_factory())
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in {"rank_pattern", "alpha_pattern", "lr_pattern"}:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_resumed(accelerator: Any, path: Path, settings: dict[str, Any]) -> TrainState:
    """Load checkpoint `path` into the prepared objects, after refusing changed settings by name."""
    saved = TrainState.read(path)  # refuses a checkpoint of another loha-train version
    changed = checkpoint.settings_differences(saved.settings, settings, setting_defaults())
    if changed:
        raise CheckpointError(
            f"Cannot resume from {path}: settings that decide what the adapter learns changed since it was "
            "written: " + "; ".join(changed) + ". Restore them, or start a new run in another output.dir."
        )
    return checkpoint.load_checkpoint(accelerator, path)


def start_position(saved: TrainState | None, world_size: int, batches_per_epoch: int) -> Position | None:
    """Where a resumed run starts (the checkpoint's position in this run's number of processes); None if new."""
    if saved is None:
        return None
    position = Position(saved.step, saved.epoch, saved.batch_in_epoch)
    return rescale_position(position, saved.world_size, world_size, batches_per_epoch)


def warn_if_layout_changed(saved: TrainState, plan: RunPlan) -> None:
    """Say what a resume with another number of processes or effective batch keeps and what it changes."""
    changes = []
    if saved.world_size != plan.world_size:
        changes.append(f"{saved.world_size} -> {plan.world_size} processes")
    same_batch = saved.effective_batch in (0, plan.effective_batch)
    if not same_batch:
        changes.append(f"effective batch {saved.effective_batch} -> {plan.effective_batch} (lr is not rescaled)")
    if not changes:
        return
    divisible = saved.batch_in_epoch * saved.world_size % plan.world_size == 0
    outcome = (
        "the remaining steps see the batches and noise an uninterrupted run would (when an epoch's batches "
        "divide evenly by both process counts)"
        if same_batch and divisible
        else "the batches from here on differ from those of an uninterrupted run"
    )
    logger.warning("resuming at step %d with %s: %s", saved.step, "; ".join(changes), outcome)

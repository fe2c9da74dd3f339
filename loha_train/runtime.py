"""The parts of a training step and its setup: data pipeline, optimizer, loss, seeds, samples, provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import __version__, builtin, data
from .config import Config, DataConfig, config_to_dict
from .inject import LoHaNetwork
from .metrics import MetricsLog
from .models import ModelBundle, model_hash
from .plan import RunPlan
from .sampling import SampleModels, generate, save_samples
from .text import encode_captions, sdxl_time_ids

logger = logging.getLogger(__name__)


# --- data ---------------------------------------------------------------------------------------------------------


@dataclass
class DataPipeline:
    """The checked dataset, its sampler and loader, and the optional validation set."""

    index: data.DatasetIndex
    data_cfg: DataConfig  # cfg.data with builtin: paths resolved
    dataset: data.ImageDataset
    sampler: data.BucketBatchSampler
    loader: DataLoader
    validation: data.ImageDataset | None
    problems: int  # bad files skipped (data.skip_bad_images)
    summary: str
    fingerprint: dict[str, Any]  # data.dataset_fingerprint of the checked index


def resolve_data_config(cfg: DataConfig) -> DataConfig:
    """cfg with `builtin:` dataset names replaced by their generated folders."""
    updates = {
        key: str(builtin.resolve_builtin(value))
        for key in ("path", "reg_path", "validation_path")
        if isinstance(value := getattr(cfg, key), str) and builtin.is_builtin(value)
    }
    return dataclasses.replace(cfg, **updates) if updates else cfg


def build_data(cfg: Config, bundle: ModelBundle, accelerator: Any, *, encode: bool = True) -> DataPipeline:
    """Scan and check every image up front, then (unless `encode` is False) fill the latent/text caches."""
    data_cfg = resolve_data_config(cfg.data)
    seed = cfg.train.seed
    report = data.check_images(data.scan_dataset(data_cfg, seed), skip_bad=data_cfg.skip_bad_images)
    index = report.index
    latents = _latent_cache(cfg, data_cfg, bundle) if data_cfg.cache_latents != "none" else None
    text = _text_cache(cfg, data_cfg, bundle, index) if _can_cache_text(cfg) else None
    train_items = index.train + index.reg
    dataset = data.ImageDataset(train_items, data_cfg, seed, latents=latents, text=text)
    validation = (
        data.ImageDataset(index.validation, data_cfg, seed, augment=False, latents=latents, text=text)
        if index.validation
        else None
    )
    if encode:
        _fill_caches(bundle, accelerator, latents, text, dataset, validation, data_cfg, index, cfg)
    sampler = data.BucketBatchSampler(
        dataset.items,
        dataset.buckets,
        cfg.train.batch_size,
        seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=data_cfg.num_workers,
        worker_init_fn=data.ignore_stop_signals,
    )
    summary = (
        f"{len(index.train)} images ({index.layout} layout), {len(index.reg)} regularization, "
        f"{len(index.validation)} validation; {len(set(dataset.buckets))} bucket(s); "
        f"{sampler.samples_per_epoch} samples per epoch"
        + (f"; {len(report.problems)} bad file(s) skipped" if report.problems else "")
    )
    fingerprint = data.dataset_fingerprint(index)
    return DataPipeline(
        index, data_cfg, dataset, sampler, loader, validation, len(report.problems), summary, fingerprint
    )


def _can_cache_text(cfg: Config) -> bool:
    return cfg.data.cache_text_embeddings and not cfg.network.train_text_encoder and not data.captions_vary(cfg.data)


def _identity(bundle: ModelBundle, cfg: Config, part: str) -> str:
    """A stable identity for cache keys: the base model's content hash (and the separate VAE's, if any)."""
    parts = [model_hash(cfg.model.path), part]
    if part == "vae" and cfg.model.vae_path:
        parts.append(model_hash(cfg.model.vae_path))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _latent_cache(cfg: Config, data_cfg: DataConfig, bundle: ModelBundle) -> data.LatentCache:
    folder = data.default_cache_dir(data_cfg.path) / "latents" if data_cfg.cache_latents == "disk" else None
    return data.LatentCache(data_cfg.cache_latents, _identity(bundle, cfg, "vae"), folder)  # type: ignore[arg-type]


def _text_cache(cfg: Config, data_cfg: DataConfig, bundle: ModelBundle, index: data.DatasetIndex) -> Any:
    return data.TextEmbeddingCache(_identity(bundle, cfg, "text"), cfg.model.clip_skip)


def vae_encode(bundle: ModelBundle, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (the distribution's mode, so caching is deterministic)."""
    vae = bundle.vae
    device = next(vae.parameters()).device
    latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def _fill_caches(
    bundle: ModelBundle,
    accelerator: Any,
    latents: data.LatentCache | None,
    text: Any,
    dataset: data.ImageDataset,
    validation: data.ImageDataset | None,
    data_cfg: DataConfig,
    index: data.DatasetIndex,
    cfg: Config,
) -> None:
    """Encode what is not cached yet; with several processes each encodes its shard of the latents."""
    if latents is not None:
        entries = dataset.cache_entries() + (validation.cache_entries() if validation else [])
        _fill_latents(bundle, accelerator, latents, entries)
    if text is not None:
        captions = data.fixed_captions(index.train + index.reg + index.validation, data_cfg)

        def encode_text(chunk: list[str]) -> dict[str, torch.Tensor]:
            out = encode_captions(bundle.text_encoders, bundle.tokenizers, chunk, cfg.model.clip_skip)
            return {k: v.float().cpu() for k, v in out.items()}

        text.prepare(captions, encode_text)


def _fill_latents(
    bundle: ModelBundle, accelerator: Any, latents: data.LatentCache, entries: list[tuple[Any, Any]]
) -> None:
    """Encode the latents not cached yet, each once over all processes.

    With several processes each encodes every world_size-th distinct entry. A memory cache then receives the
    other processes' shards (gathered); a disk cache finds them in its folder. The final pass encodes only what
    a process still misses: nothing, unless a disk cache folder is not shared (nodes with local disks).
    """

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae_encode(bundle, pixels).cpu()

    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        distinct = list({latents.key(item, plan): (item, plan) for item, plan in entries}.values())
        mine = distinct[rank::world]
        stats = latents.prepare(mine, encode)
        logger.info("latents (rank %d): %d encoded, %d reused from the cache", rank, stats.encoded, stats.reused)
        if latents.mode == "memory":
            from accelerate.utils import gather_object

            for shard in gather_object([latents.export(mine)]):
                latents.absorb(shard)
        accelerator.wait_for_everyone()
    stats = latents.prepare(entries, encode)
    logger.info("latents: %d encoded, %d reused from the cache", stats.encoded, stats.reused)


# --- optimizer ----------------------------------------------------------------------------------------------------


def build_optimizer(cfg: Config, network: LoHaNetwork, total_steps: int) -> tuple[Any, Any]:
    """The optimizer over the adapter parameters (one group per component) and its LR schedule."""
    from diffusers.optimization import get_scheduler

    t = cfg.train
    lrs = {
        "unet": t.unet_lr or t.lr,
        "text_encoder": t.text_encoder_lr or t.lr,
        "text_encoder_2": t.text_encoder_lr or t.lr,
    }
    groups = [
        {"params": params, "lr": lr} for component, lr in lrs.items() if (params := list(network.parameters(component)))
    ]
    optimizer = make_optimizer(t.optimizer, groups, cfg)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


class OptimizerUnavailable(Exception):
    """An optimizer whose package is not installed."""


def make_optimizer(name: str, groups: list[dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if name == "adamw":
        # fused: one kernel over all adapter tensors (3x faster than the per-tensor loop on CPU, same results)
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(
            groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay, fused=fused
        )
    if name == "adamw8bit":
        bnb = _optional_import("bitsandbytes", "train.optimizer: adamw8bit", "bitsandbytes")
        return bnb.optim.AdamW8bit(
            groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
        )
    prodigy = _optional_import("prodigyopt", "train.optimizer: prodigy", "prodigyopt")
    return prodigy.Prodigy(groups, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)


def check_optimizer_available(name: str) -> None:
    """Fail before any model loads when the chosen optimizer's package is missing."""
    packages = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}
    if name in packages:
        _optional_import(packages[name], f"train.optimizer: {name}", packages[name])


def _optional_import(module: str, key: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OptimizerUnavailable(
            f"{key} needs the {package} package, which is not installed ({err}). Install it with "
            f"`pip install {package}` or use train.optimizer: adamw."
        ) from None


# --- one micro-step ------------------------------------------------------------------------------------------------


def seed_everything_for(seed: int, step: int, micro: int) -> None:
    """Seed the global RNGs from (seed, step, micro-batch): noise, timesteps and dropouts then depend only on
    where the run is, so a resumed run draws exactly what an uninterrupted one would.

    `micro` numbers the step's micro-batches over all processes (see `global_micro_index`), not per process, so
    N processes draw what one process accumulating N times as many micro-batches would.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def global_micro_index(micro: int, rank: int, world_size: int) -> int:
    """Which of the step's micro-batches over all processes this is: rank r's j-th micro-batch is the global batch
    j * world_size + r of the step (the sampler deals global batches round-robin), as for one process."""
    return micro * world_size + rank


def micro_step(cfg: Config, bundle: ModelBundle, accelerator: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The diffusion loss of one micro-batch (noise, timesteps, target, weighting), averaged over samples."""
    device = accelerator.device
    latents = batch["latents"].to(device) if "latents" in batch else vae_encode(bundle, batch["pixels"])
    cond = _conditioning(cfg, bundle, batch, device)
    noise, timesteps = _noise_and_timesteps(cfg, bundle, latents)
    return diffusion_loss(cfg, bundle, latents, noise, timesteps, cond, batch["loss_weight"].to(device))


def _noise_and_timesteps(cfg: Config, bundle: ModelBundle, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn_like(latents)
    if cfg.train.noise_offset > 0:
        noise = noise + cfg.train.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
    steps = bundle.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
    return noise, timesteps


def _conditioning(cfg: Config, bundle: ModelBundle, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if "text_embeddings" in batch:
        cond = {k: v.to(device) for k, v in batch["text_embeddings"].items()}
    else:
        grad = torch.enable_grad() if cfg.network.train_text_encoder else torch.no_grad()
        with grad:
            cond = encode_captions(bundle.text_encoders, bundle.tokenizers, batch["captions"], cfg.model.clip_skip)
    if bundle.family == "sdxl":
        time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"]).to(device)
        cond["added_cond_kwargs"] = {"text_embeds": cond.pop("text_embeds"), "time_ids": time_ids}
    return cond


def diffusion_loss(
    cfg: Config,
    bundle: ModelBundle,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    cond: dict[str, Any],
    loss_weight: torch.Tensor,
) -> torch.Tensor:
    """MSE between the UNet's prediction and the epsilon or v target, min-SNR and prior weighted."""
    sched = bundle.noise_scheduler
    noisy = sched.add_noise(latents, noise, timesteps)
    target = sched.get_velocity(latents, noise, timesteps) if bundle.prediction_type == "v_prediction" else noise
    unet_dtype = next(p for p in bundle.unet.parameters()).dtype
    hidden = cond["encoder_hidden_states"].to(unet_dtype)
    pred = bundle.unet(noisy.to(unet_dtype), timesteps, hidden, added_cond_kwargs=cond.get("added_cond_kwargs")).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.train.min_snr_gamma:
        loss = loss * min_snr_weight(sched, timesteps, cfg.train.min_snr_gamma, bundle.prediction_type)
    return (loss * loss_weight).mean()


def min_snr_weight(scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


# --- validation, samples -------------------------------------------------------------------------------------------


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
                total += micro_step(cfg, bundle, accelerator, batch).item() * len(refs)
            count += len(refs)
    finally:
        torch.random.set_rng_state(rng_state)
        unet.train(was_training)
    return total / max(count, 1)


def sample_now(
    cfg: Config, bundle: ModelBundle, accelerator: Any, network: LoHaNetwork, log: MetricsLog, folder: Path, step: int
) -> None:
    """Generate the configured prompts on the main process; the others wait."""
    if accelerator.is_main_process:
        models = SampleModels(
            accelerator.unwrap_model(bundle.unet),
            bundle.vae,
            [accelerator.unwrap_model(te) for te in bundle.text_encoders],
            bundle.tokenizers,
            bundle.scheduler_config,
        )
        rng_state = torch.random.get_rng_state()
        images = generate(models, cfg.sample, cfg.data.resolution, autocast=accelerator.autocast())
        torch.random.set_rng_state(rng_state)
        grid_path = save_samples(images, folder, step)
        from PIL import Image

        with Image.open(grid_path) as grid:
            log.image("samples", grid.copy(), step)
    accelerator.wait_for_everyone()


# --- provenance and resume ------------------------------------------------------------------------------------------


_RESUME_IGNORED = {
    "network.init_from",
    "data.num_workers",
    "data.skip_bad_images",
    "data.cache_latents",
    "data.cache_text_embeddings",
    "data.validation_path",
}
# gradient_accumulation may change (the batch position is per micro-batch): with the number of processes it is
# how a resumed run keeps its effective batch; train.train warns when the effective batch changes.
_RESUME_TRAIN = {"train.batch_size", "train.seed"}


def resume_settings(cfg: Config, pipeline: DataPipeline, base_hash: str) -> dict[str, Any]:
    """The dotted settings a resumed run must share with its checkpoint (what the adapter and data order depend on)."""
    flat = _flatten(config_to_dict(cfg))
    keep = {
        k: v
        for k, v in flat.items()
        if (k.startswith(("model.", "network.", "data.")) or k in _RESUME_TRAIN) and k not in _RESUME_IGNORED
    }
    keep["model.content_sha256"] = base_hash
    keep["data.content_sha256"] = pipeline.fingerprint["sha256"]
    return keep


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in {"rank_pattern", "alpha_pattern"}:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def provenance(
    cfg: Config, bundle: ModelBundle, pipeline: DataPipeline, plan: RunPlan, network: LoHaNetwork
) -> Callable[[dict[str, Any]], dict[str, str]]:
    """A function of the run's progress that returns the adapter file's metadata (kohya, modelspec, ours)."""
    from .metadata import build_metadata

    started = time.time()
    fixed = {
        "config": config_to_dict(cfg),
        "network": network,
        "family": bundle.family,
        "prediction_type": bundle.prediction_type,
        "base_model_hash": model_hash(cfg.model.path),
        "base_model_name": Path(cfg.model.path).name if not builtin.is_builtin(cfg.model.path) else cfg.model.path,
        "dataset": {
            "fingerprint": pipeline.fingerprint,
            "tag_frequency": data.tag_frequencies(pipeline.index),
            "bucket_info": data.bucket_info(pipeline.index),
            "dirs": {str(pipeline.data_cfg.path): len(pipeline.index.train)},
            "num_train_images": len(pipeline.index.train),
            "num_reg_images": len(pipeline.index.reg),
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

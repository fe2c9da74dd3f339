"""One micro-step of diffusion training as pure functions: seeding, noise and timesteps, conditioning, the loss."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F

from loha_train.config import Config
from loha_train.data.common import non_finite_latents
from loha_train.models.bundle import ModelBundle
from loha_train.models.encode import encode_captions, sdxl_time_ids, vae_encode


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


def _encoded(bundle: ModelBundle, batch: dict[str, Any]) -> torch.Tensor:
    """data.cache_latents: none: the batch's latents, encoded now; a non-finite one stops the run naming the image."""
    latents = vae_encode(bundle, batch["pixels"])
    bad = [key for key, latent in zip(batch["keys"], latents, strict=True) if not torch.isfinite(latent).all()]
    if bad:
        raise non_finite_latents(", ".join(map(str, bad)))
    return latents


def micro_step(cfg: Config, bundle: ModelBundle, device: torch.device, batch: dict[str, Any]) -> torch.Tensor:
    """The diffusion loss of one micro-batch (noise, timesteps, target, weighting), averaged over samples."""
    latents = batch["latents"].to(device) if "latents" in batch else _encoded(bundle, batch)
    cond = conditioning(cfg, bundle, batch, device)
    noise, timesteps = noise_and_timesteps(cfg, bundle, latents)
    mask = batch["loss_mask"].to(device) if "loss_mask" in batch else None
    return diffusion_loss(cfg, bundle, latents, noise, timesteps, cond, batch["loss_weight"].to(device), mask)


def noise_and_timesteps(cfg: Config, bundle: ModelBundle, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (plus `train.noise_offset` per channel) and uniform timesteps, from the global RNG."""
    noise = torch.randn_like(latents)
    if cfg.train.noise_offset > 0:
        noise = noise + cfg.train.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
    steps = bundle.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
    return noise, timesteps


def conditioning(cfg: Config, bundle: ModelBundle, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The UNet's text conditioning for a batch (cached or encoded now), with SDXL's size/crop time ids."""
    if "text_embeddings" in batch:
        cond = {k: v.to(device) for k, v in batch["text_embeddings"].items()}
    else:
        grad = torch.enable_grad() if cfg.network.train_text_encoder else torch.no_grad()
        with grad:
            cond = encode_captions(
                bundle.text_encoders,
                bundle.tokenizers,
                batch["captions"],
                cfg.model.clip_skip,
                cfg.model.max_token_length,
            )
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
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction and the epsilon or v target, masked, min-SNR and prior weighted."""
    sched = bundle.noise_scheduler
    noisy = sched.add_noise(latents, noise, timesteps)
    target = sched.get_velocity(latents, noise, timesteps) if bundle.prediction_type == "v_prediction" else noise
    unet_dtype = next(p for p in bundle.unet.parameters()).dtype
    hidden = cond["encoder_hidden_states"].to(unet_dtype)
    pred = bundle.unet(noisy.to(unet_dtype), timesteps, hidden, added_cond_kwargs=cond.get("added_cond_kwargs")).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if loss_mask is not None:
        loss = apply_loss_mask(loss, loss_mask)
    loss = loss.mean(dim=(1, 2, 3))
    if cfg.train.min_snr_gamma:
        loss = loss * min_snr_weight(sched, timesteps, cfg.train.min_snr_gamma, bundle.prediction_type)
    return (loss * loss_weight).mean()


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """kohya's masked loss: the per-element loss (B, C, h, w) times the mask (B, 1, H, W) in [0, 1], area-resampled
    to the latent grid. The caller then averages over every element, as kohya does (not over the mask's area), so
    a half-masked image contributes half the loss of an unmasked one."""
    mask = F.interpolate(mask.to(loss.dtype), size=loss.shape[2:], mode="area")
    return loss * mask


def min_snr_weight(scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr

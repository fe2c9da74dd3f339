"""One micro-step of diffusion training as pure functions: seeding, noise and timesteps, conditioning, the loss."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from loha_train.config import Config, ConfigError, ConfigProblem, TrainConfig
from loha_train.data.common import non_finite_latents
from loha_train.models.bundle import ModelBundle
from loha_train.models.encode import encode_captions, sdxl_time_ids, vae_encode
from loha_train.training.noise import draw_noise


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
    draw = draw_noise(cfg.train, latents, bundle.noise_scheduler.config.num_train_timesteps)
    weight = batch["loss_weight"].to(device)
    mask = batch["loss_mask"].to(device) if "loss_mask" in batch else None
    return diffusion_loss(
        cfg, bundle, latents, draw.noise, draw.timesteps, cond, weight, input_noise=draw.input_noise, loss_mask=mask
    )


def noise_and_timesteps(cfg: Config, bundle: ModelBundle, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss target's noise and the timesteps, as a step draws them (noise.py) from the global RNG."""
    draw = draw_noise(cfg.train, latents, bundle.noise_scheduler.config.num_train_timesteps)
    return draw.noise, draw.timesteps


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
    *,
    input_noise: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`train.loss` between the UNet's prediction and the epsilon or v target, per element, masked
    (`loss_mask`, kohya's masked loss), averaged per sample, then weighted per sample (prior loss weight,
    min-SNR, v-like scaling, debiased estimation) and averaged.

    `input_noise` (default `noise`) makes the UNet's input; it differs from the target's noise by the input
    perturbation (train.ip_noise_gamma), as in kohya.
    """
    sched = bundle.noise_scheduler
    noisy = sched.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    target = sched.get_velocity(latents, noise, timesteps) if bundle.prediction_type == "v_prediction" else noise
    unet_dtype = next(p for p in bundle.unet.parameters()).dtype
    hidden = cond["encoder_hidden_states"].to(unet_dtype)
    pred = bundle.unet(noisy.to(unet_dtype), timesteps, hidden, added_cond_kwargs=cond.get("added_cond_kwargs")).sample
    threshold = huber_threshold(cfg.train, sched, timesteps)
    loss = elementwise_loss(pred.float(), target.float(), cfg.train.loss, threshold)
    if loss_mask is not None:
        loss = apply_loss_mask(loss, loss_mask)
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    return (loss * timestep_weight(cfg, sched, timesteps, bundle.prediction_type) * loss_weight).mean()


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str, threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """kohya's `conditional_loss` without reduction: l2, l1, or the pseudo-Huber losses with a per-sample
    threshold c (huber: 2c(sqrt(d^2 + c^2) - c); smooth_l1: 2(sqrt(d^2 + c^2) - c))."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if threshold is None:
        raise ValueError(f"loss {loss_type!r} needs a threshold")
    c = threshold.view(-1, *([1] * (pred.ndim - 1)))
    smooth = torch.sqrt((pred - target) ** 2 + c**2) - c
    if loss_type == "huber":
        return 2 * c * smooth
    if loss_type == "smooth_l1":
        return 2 * smooth
    raise ValueError(f"unknown loss {loss_type!r}")


def huber_threshold(train: TrainConfig, scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor | None:
    """The pseudo-Huber threshold per sample (kohya's `get_huber_threshold_if_needed`); None for l2 and l1.

    constant: huber_c x huber_scale; exponential: exp(-a t) x huber_scale with a = -ln(huber_c) / T (so c at
    t = T); snr: (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t = sqrt((1 - abar_t) / abar_t).
    """
    if train.loss not in ("huber", "smooth_l1"):
        return None
    if train.huber_schedule == "constant":
        return torch.full(timesteps.shape, train.huber_c * train.huber_scale, device=timesteps.device)
    if train.huber_schedule == "exponential":
        a = -math.log(train.huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-a * timesteps) * train.huber_scale
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    sigmas = ((1.0 - alphas) / alphas) ** 0.5
    return (1 - train.huber_c) / (1 + sigmas) ** 2 + train.huber_c


def timestep_weight(cfg: Config, scheduler: Any, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The per-sample loss weight from the timestep's SNR, in kohya's order: min-SNR-gamma, then the v-prediction
    scaling like epsilon (SNR / (SNR + 1)), then debiased estimation (1 / sqrt(SNR); v: 1 / (SNR + 1)); the last
    two cap SNR at 1000 as kohya does (t = 0 would be near infinite)."""
    t = cfg.train
    weight = torch.ones(timesteps.shape, device=timesteps.device)
    if t.min_snr_gamma:
        weight = weight * min_snr_weight(scheduler, timesteps, t.min_snr_gamma, prediction_type)
    if not (t.scale_v_pred_loss_like_noise_pred or t.debiased_estimation):
        return weight
    capped = torch.clamp(snr(scheduler, timesteps), max=1000)
    if t.scale_v_pred_loss_like_noise_pred:
        weight = weight * capped / (capped + 1)
    if t.debiased_estimation:
        weight = weight * (1 / (capped + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(capped))
    return weight


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) of each timestep."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return alphas / (1 - alphas)


def check_prediction_type(cfg: Config, prediction_type: str) -> None:
    """train.scale_v_pred_loss_like_noise_pred on a model found to predict epsilon: a ConfigError, as kohya refuses."""
    if cfg.train.scale_v_pred_loss_like_noise_pred and prediction_type != "v_prediction":
        raise ConfigError(
            [
                ConfigProblem(
                    "train.scale_v_pred_loss_like_noise_pred",
                    f"needs a v-prediction model; this one predicts {prediction_type}",
                )
            ]
        )


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

"""The noise and timesteps of a training step, kohya's options included (offset noise with random strength and
adaptive scale, pyramid noise, input perturbation, a timestep range), all drawn from the global torch RNG.

The draws come in kohya's order (`get_noise_noisy_latents_and_timesteps`): the noise, the offset's strength and
offset, the pyramid levels, the timesteps, then the perturbation's strength and noise. kohya draws the pyramid's
level ratio from Python's `random`; here it comes from torch's RNG, which the trainer seeds per micro-batch, so a
resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from loha_train.config import TrainConfig


class NoiseDraw(NamedTuple):
    """The loss target's noise, the noise the UNet input is made with (they differ by the input perturbation),
    and the timesteps."""

    noise: torch.Tensor
    input_noise: torch.Tensor
    timesteps: torch.Tensor


def draw_noise(train: TrainConfig, latents: torch.Tensor, num_train_timesteps: int) -> NoiseDraw:
    """Noise and timesteps for `latents` as `train` configures them (kohya's definitions)."""
    device = latents.device
    noise = torch.randn_like(latents)
    if train.noise_offset > 0:
        strength = torch.rand(1, device=device) * train.noise_offset if train.noise_offset_random_strength else None
        noise = offset_noise(latents, noise, train.noise_offset if strength is None else strength, train)
    if train.multires_noise_iterations:
        noise = pyramid_noise(noise, train.multires_noise_iterations, train.multires_noise_discount)
    high = num_train_timesteps if train.max_timestep is None else train.max_timestep
    if train.min_timestep < high:
        timesteps = torch.randint(train.min_timestep, high, (latents.shape[0],), device=device)
    else:  # kohya: min == max trains that one timestep
        timesteps = torch.full((latents.shape[0],), high, device=device, dtype=torch.long)
    input_noise = noise
    if train.ip_noise_gamma:
        gamma = train.ip_noise_gamma
        strength = torch.rand(1, device=device) * gamma if train.ip_noise_gamma_random_strength else gamma
        input_noise = noise + strength * torch.randn_like(latents)
    return NoiseDraw(noise, input_noise, timesteps)


def offset_noise(
    latents: torch.Tensor, noise: torch.Tensor, offset: float | torch.Tensor, train: TrainConfig
) -> torch.Tensor:
    """Offset noise: a per-channel constant (strength `offset`, plus adaptive_noise_scale x |channel mean| when set,
    never below 0) added to the noise."""
    if train.adaptive_noise_scale is not None:
        mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + train.adaptive_noise_scale * mean, min=0.0)
    return noise + offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise: level i adds noise drawn at 1/r^i of the size (r uniform in [2, 4)), upsampled
    bilinearly and weighted by discount^i, until a side reaches 1; rescaled to unit standard deviation."""
    b, c, h, w = noise.shape
    upsample = torch.nn.Upsample(size=(h, w), mode="bilinear")
    for i in range(iterations):
        r = float(torch.rand(())) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        noise = noise + upsample(torch.randn(b, c, hn, wn, device=noise.device)) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()

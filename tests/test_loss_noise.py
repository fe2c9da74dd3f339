"""kohya's loss and noise options against their published formulas: the loss types and Huber schedules, SNR
weightings (debiased estimation, v-prediction scaled like epsilon), offset/pyramid/input-perturbation noise and the
timestep range, each computed here from kohya's definitions for the same random draws."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loha_train.config import ConfigError, TrainConfig
from loha_train.training import step
from loha_train.training.noise import draw_noise
from tests.test_train import tiny_config


def train(**sets: Any) -> TrainConfig:
    return dataclasses.replace(TrainConfig(max_steps=1), **sets)


def alphas_cumprod() -> torch.Tensor:
    """alpha_bar of SD's scaled-linear schedule from its published betas, float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


T = torch.tensor([0, 1, 10, 250, 500, 999])


# ------------------------------------------------------------------------------------------------ loss types
def test_loss_types_are_kohyas_per_element_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g) * 3, torch.randn(3, 4, 5, 5, generator=g)
    c = torch.tensor([0.1, 0.5, 2.0])
    d, cc = (pred - target).double(), c.double().view(3, 1, 1, 1)
    expected = {
        "l2": d**2,
        "l1": d.abs(),
        "huber": 2 * cc * (torch.sqrt(d**2 + cc**2) - cc),  # kohya: 2c(sqrt(d^2 + c^2) - c)
        "smooth_l1": 2 * (torch.sqrt(d**2 + cc**2) - cc),  # kohya: 2(sqrt(d^2 + c^2) - c)
    }
    for name, ref in expected.items():
        got = step.elementwise_loss(pred, target, name, c)
        assert got.shape == pred.shape, name  # per element: a mask can weight it before the reduction
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6), name
    # pseudo-Huber: quadratic (d^2) for |d| << c, linear (2c|d|) for |d| >> c
    small, big = torch.full((1, 1, 1, 1), 1e-3, dtype=torch.float64), torch.full((1, 1, 1, 1), 1e3)
    one = torch.tensor([1.0], dtype=torch.float64)
    assert step.elementwise_loss(small, 0 * small, "huber", one).item() == pytest.approx(1e-6, rel=1e-3)
    assert step.elementwise_loss(big, 0 * big, "huber", one).item() == pytest.approx(2e3, rel=1e-3)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_thresholds_follow_kohyas_schedules(schedule: str) -> None:
    c, scale = 0.2, 1.5
    got = step.huber_threshold(
        train(loss="huber", huber_c=c, huber_scale=scale, huber_schedule=schedule), scheduler(), T
    )
    t = T.double()
    if schedule == "constant":
        ref = torch.full_like(t, c * scale)
    elif schedule == "exponential":  # exp(-a t), a = -ln(c) / 1000: c^(t / 1000), so c at the noisiest timestep
        ref = c ** (t / 1000) * scale
    else:  # (1 - c) / (1 + sigma)^2 + c with sigma = sqrt((1 - abar) / abar): near 1 at t = 0, c at high noise
        ab = alphas_cumprod()[T]
        ref = (1 - c) / (1 + ((1 - ab) / ab).sqrt()) ** 2 + c
    assert got is not None and torch.allclose(got.double(), ref, rtol=1e-4), (got, ref)
    assert step.huber_threshold(train(loss="l2"), scheduler(), T) is None


def test_snr_weights_are_kohyas_debiased_estimation_and_v_scaling() -> None:
    snr = alphas_cumprod()[T] / (1 - alphas_cumprod()[T])
    capped = snr.clamp(max=1000)  # kohya caps SNR at 1000 (t = 0 is near infinite)
    cases = {
        ("epsilon", "debiased"): 1 / capped.sqrt(),
        ("v_prediction", "debiased"): 1 / (capped + 1),
        ("v_prediction", "scale_v"): capped / (capped + 1),
        # kohya's order: min-SNR-gamma (v: min(snr, 5) / (snr + 1)), then scale_v, then debiased
        ("v_prediction", "all"): snr.clamp(max=5) / (snr + 1) * capped / (capped + 1) / (capped + 1),
    }
    for (prediction, which), ref in cases.items():
        sets = {"debiased": {"debiased_estimation": True}, "scale_v": {"scale_v_pred_loss_like_noise_pred": True}}
        options = sets.get(which, {**sets["debiased"], **sets["scale_v"], "min_snr_gamma": 5.0})
        cfg = SimpleNamespace(train=train(**options))
        got = step.timestep_weight(cfg, scheduler(), T, prediction)  # type: ignore[arg-type]
        assert torch.allclose(got.double(), ref, rtol=1e-4), (prediction, which)
    assert torch.equal(step.timestep_weight(SimpleNamespace(train=train()), scheduler(), T, "epsilon"), torch.ones(6))  # type: ignore[arg-type]


class _Predicts(nn.Module):
    """A UNet stand-in: records its input and predicts a given tensor."""

    def __init__(self, prediction: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.prediction = prediction
        self.seen = torch.empty(0)

    def forward(self, noisy: torch.Tensor, *args: object, **kwargs: object) -> SimpleNamespace:
        self.seen = noisy
        return SimpleNamespace(sample=self.prediction)


def test_the_step_loss_is_the_per_sample_mean_weighted_as_kohya_and_the_input_perturbed() -> None:
    """huber (snr schedule) per element, averaged per sample, times prior weight and debiased weight; the UNet
    sees latents noised with noise + gamma * extra noise while the target stays the plain noise (kohya)."""
    g = torch.Generator().manual_seed(1)
    x0, noise, extra = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(3))
    pred = torch.randn(3, 4, 6, 6, generator=g)
    t, weight = torch.tensor([5, 400, 990]), torch.tensor([1.0, 0.5, 2.0])
    cfg = tiny_config(Path("unused"), train__loss="huber", train__debiased_estimation=True, train__huber_c=0.3)
    unet = _Predicts(pred)
    bundle = SimpleNamespace(noise_scheduler=scheduler(), prediction_type="epsilon", unet=unet)
    cond = {"encoder_hidden_states": torch.zeros(3, 1, 1)}
    loss = step.diffusion_loss(cfg, bundle, x0, noise, t, cond, weight, input_noise=noise + 0.1 * extra)  # type: ignore[arg-type]

    ab = alphas_cumprod()[t]
    sigma = ((1 - ab) / ab).sqrt()
    c = ((1 - 0.3) / (1 + sigma) ** 2 + 0.3).view(3, 1, 1, 1)
    d = pred.double() - noise.double()
    per_sample = (2 * c * (torch.sqrt(d**2 + c**2) - c)).mean(dim=(1, 2, 3))
    ref = (per_sample * weight * (1 / (ab / (1 - ab)).clamp(max=1000).sqrt())).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    abv = ab.view(3, 1, 1, 1)
    perturbed = abv.sqrt() * x0 + (1 - abv).sqrt() * (noise + 0.1 * extra)
    assert torch.allclose(unet.seen.double(), perturbed, atol=1e-5)


def test_scale_v_pred_loss_like_noise_pred_needs_a_v_model() -> None:
    cfg = tiny_config(Path("unused"), train__scale_v_pred_loss_like_noise_pred=True)
    step.check_prediction_type(cfg, "v_prediction")
    with pytest.raises(ConfigError, match="scale_v_pred_loss_like_noise_pred: needs a v-prediction model"):
        step.check_prediction_type(cfg, "epsilon")


# ------------------------------------------------------------------------------------------------ noise
def kohya_draws(latents: torch.Tensor, t: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kohya's get_noise_noisy_latents_and_timesteps with every option on, in its order of draws (the pyramid's
    level ratio from torch's RNG instead of Python's `random`)."""
    b, ch, h, w = latents.shape
    noise = torch.randn_like(latents)
    offset = torch.rand(1) * t.noise_offset  # noise_offset_random_strength
    offset = torch.clamp(offset + t.adaptive_noise_scale * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0.0)
    noise = noise + offset * torch.randn((b, ch, 1, 1))
    for i in range(t.multires_noise_iterations):  # pyramid_noise_like
        r = torch.rand(()).item() * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        noise += F.interpolate(torch.randn(b, ch, hn, wn), size=(h, w), mode="bilinear") * t.multires_noise_discount**i
        if hn == 1 or wn == 1:
            break
    noise = noise / noise.std()
    timesteps = torch.randint(t.min_timestep, t.max_timestep or 1000, (b,))
    strength = torch.rand(1) * t.ip_noise_gamma  # ip_noise_gamma_random_strength
    return noise, noise + strength * torch.randn_like(latents), timesteps


@pytest.mark.parametrize("iterations", [3, 10])  # 10: the pyramid stops where a side reaches 1
def test_noise_options_draw_kohyas_numbers(iterations: int) -> None:
    t = train(
        noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.05,
        multires_noise_iterations=iterations, multires_noise_discount=0.4,
        ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, min_timestep=100, max_timestep=300,
    )  # fmt: skip
    latents = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(3)) + 0.5
    torch.manual_seed(7)
    ours = draw_noise(t, latents, 1000)
    torch.manual_seed(7)
    ref = kohya_draws(latents, t)
    for name, a, b in zip(("noise", "input noise", "timesteps"), ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), name
    assert ((ours.timesteps >= 100) & (ours.timesteps < 300)).all()
    assert ours.noise.std().item() == pytest.approx(1.0, rel=1e-5)  # the pyramid rescales to unit std


def test_default_noise_is_the_plain_draw_and_fixed_timestep_ranges_hold() -> None:
    latents = torch.zeros(4, 4, 8, 8)
    torch.manual_seed(5)
    ours = draw_noise(train(), latents, 1000)
    torch.manual_seed(5)
    noise, timesteps = torch.randn_like(latents), torch.randint(0, 1000, (4,))
    assert torch.equal(ours.noise, noise) and torch.equal(ours.timesteps, timesteps)
    assert ours.input_noise is ours.noise
    # kohya: min == max trains that single timestep
    assert draw_noise(train(min_timestep=300, max_timestep=300), latents, 1000).timesteps.tolist() == [300] * 4
    # fixed strengths (no random strength): offset 0.1 + 0.05 |mean|, perturbation 0.2
    t = train(noise_offset=0.1, adaptive_noise_scale=0.05, ip_noise_gamma=0.2)
    latents = torch.full((1, 2, 4, 4), -2.0)
    torch.manual_seed(9)
    ours = draw_noise(t, latents, 1000)
    torch.manual_seed(9)
    base = torch.randn_like(latents)
    noise = base + (0.1 + 0.05 * 2.0) * torch.randn(1, 2, 1, 1)
    torch.randint(0, 1000, (1,))
    assert torch.allclose(ours.noise, noise) and torch.allclose(ours.input_noise, noise + 0.2 * torch.randn_like(base))

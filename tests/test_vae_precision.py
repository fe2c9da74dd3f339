"""VAE precision and the latent cache: the VAE encodes in its own dtype (force_upcast honoured, model.vae_dtype
overrides), outside autocast; the cache key holds that dtype; a non-finite latent stops the run naming the image."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_data_caches import data_cfg, make_image

from loha_train.config import ModelConfig, config_from_dict
from loha_train.data import DataError, ImageDataset, LatentCache, check_images, scan_dataset
from loha_train.models.encode import vae_encode
from loha_train.models.loading import load_models
from loha_train.training.data_pipeline import latent_identity

pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")


@torch.no_grad()
def test_vae_encodes_in_its_own_precision_under_autocast() -> None:
    bundle = load_models(ModelConfig(path="builtin:tiny-sd-random"))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    vae = bundle.vae  # the reference: diffusers' encode in float32, scaled as the pipelines' scaling_factor says
    want = vae.encode(pixels.float()).latent_dist.mode() * vae.config.scaling_factor
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what training runs the step in with mixed_precision
        got = vae_encode(bundle, pixels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_force_upcast_keeps_the_vae_in_float32_and_vae_dtype_overrides() -> None:
    bundle = load_models(ModelConfig(path="builtin:tiny-sdxl", dtype="bf16"))
    assert bundle.vae.config.force_upcast  # diffusers' default, and what SDXL's VAE config says
    assert bundle.vae.dtype == torch.float32 and bundle.unet.dtype == torch.bfloat16
    assert (
        load_models(ModelConfig(path="builtin:tiny-sdxl", dtype="bf16", vae_dtype="bf16")).vae.dtype == torch.bfloat16
    )


def test_latent_cache_key_holds_the_vae_precision(tmp_path: Path) -> None:
    make_image(tmp_path / "data" / "a.png", (64, 64))
    raw = {
        "model": {"path": "builtin:tiny-sd-random"},
        "data": {"path": str(tmp_path / "data")},
        "train": {"max_steps": 1},
        "output": {"dir": "o"},
    }
    cfg = config_from_dict(raw, check_paths=False)
    ids = {
        d: latent_identity(cfg, SimpleNamespace(vae=SimpleNamespace(dtype=d))) for d in (torch.float32, torch.bfloat16)
    }
    dc = data_cfg(tmp_path / "data")
    index = check_images(scan_dataset(dc), skip_bad=False).index
    (entry,) = ImageDataset(index.train, dc, seed=0).cache_entries()
    keys = {LatentCache("disk", vae_id, tmp_path / "cache").key(*entry) for vae_id in ids.values()}
    assert len(keys) == 2, "fp32 and bf16 latents must not share a cache entry"


def test_a_non_finite_latent_names_the_image(tmp_path: Path) -> None:
    make_image(tmp_path / "data" / "broken.png", (64, 64))
    dc = data_cfg(tmp_path / "data")
    index = check_images(scan_dataset(dc), skip_bad=False).index
    cache = LatentCache("memory", "vae")
    dataset = ImageDataset(index.train, dc, seed=0, latents=cache)
    with pytest.raises(DataError, match=r"broken\.png: the VAE encoded this image to non-finite latents"):
        cache.prepare(dataset.cache_entries(), lambda px: torch.full((px.shape[0], 4, 8, 8), float("nan")))

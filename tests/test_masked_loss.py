"""Masked loss (kohya's alpha_mask / masked_loss) and flip with cached latents: masks follow the image's crop and
flip, reach the latent grid by area resampling, survive the latent caches, and weight the loss as kohya does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from loha_train.config import DataConfig
from loha_train.data import DataError, ImageDataset, LatentCache, check_images, collate, load_pixels, scan_dataset
from loha_train.data.masks import mask_source
from loha_train.data.sampler import SampleRef
from loha_train.training.step import apply_loss_mask

W, H = 64, 48  # a bucket of its own (data_cfg below), so no resize: the expected masks are plain geometry


def data_cfg(path: Path, **overrides) -> DataConfig:
    small = {"resolution": 64, "bucket_min_side": 16, "bucket_max_side": 128, "bucket_step": 16}
    return DataConfig(path=str(path), **{**small, **overrides})


def rgba_image(path: Path, opaque_columns: int, seed: int) -> None:
    """Noise RGB (so a mirror image differs) with alpha 255 in the first `opaque_columns` columns, 0 elsewhere."""
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = np.zeros((H, W, 1), dtype=np.uint8)
    alpha[:, :opaque_columns] = 255
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(path)


@pytest.fixture
def rgba_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for n, columns in enumerate((16, 40, 64)):
        rgba_image(folder / f"{n}.png", columns, seed=n)
        (folder / f"{n}.txt").write_text(f"thing{n}")
    Image.new("RGB", (W, H), (10, 20, 30)).save(folder / "3.png")  # no alpha channel: weighs 1 everywhere
    (folder / "3.txt").write_text("plain")
    return folder


def encoder(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 8x average pooling to 4 channels (position-preserving, so a mirror shows)."""
    pooled = F.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def dataset_for(cfg: DataConfig, cache: LatentCache | None) -> ImageDataset:
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    masks = mask_source(cfg, index.train)
    if cache is not None:
        cache.masks = masks
    dataset = ImageDataset(index.train, cfg, seed=3, latents=cache, masks=masks)
    if cache is not None:
        cache.prepare(dataset.cache_entries(), encoder, batch_size=2)
    return dataset


def expected_mask(columns: int, flipped: bool) -> torch.Tensor:
    mask = torch.zeros(H, W)
    mask[:, :columns] = 1.0
    return mask.flip(1) if flipped else mask


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_alpha_masks_and_flips_follow_the_image(rgba_dir: Path, tmp_path: Path, cache: str) -> None:
    cfg = data_cfg(rgba_dir, alpha_mask=True, flip=True, cache_latents=cache)
    latents = None if cache == "none" else LatentCache(cache, "vae", tmp_path / "cache")  # type: ignore[arg-type]
    dataset = dataset_for(cfg, latents)
    uncached = dataset_for(data_cfg(rgba_dir, alpha_mask=True, flip=True, cache_latents="none"), None)
    flips = set()
    for slot in range(16):
        ref = SampleRef(item=slot % 4, epoch=slot // 4, slot=slot)
        sample, plain = dataset[ref], uncached[ref]
        batch = collate([sample])
        # the flip drawn for (seed, epoch, slot) is the one an uncached run draws: crop_top_left is the same
        assert sample["crop_top_left"] == plain["crop_top_left"]
        item = dataset.items[ref.item]
        pixels = load_pixels(item.path, dataset.plans[ref.item])
        flipped = not torch.equal(plain["pixels"], pixels)
        flips.add(flipped)
        if latents is not None:  # the cached latents are those of the mirrored image when the draw mirrors
            want = encoder((pixels.flip(2) if flipped else pixels)[None])[0]
            torch.testing.assert_close(sample["latents"], want)
        columns = {"0.png": 16, "1.png": 40, "2.png": 64, "3.png": W}[item.path.name]
        torch.testing.assert_close(batch["loss_mask"][0, 0], expected_mask(columns, flipped))
    assert flips == {True, False}


def test_disk_cache_keeps_masks_across_runs(rgba_dir: Path, tmp_path: Path) -> None:
    cfg = data_cfg(rgba_dir, alpha_mask=True, cache_latents="disk")
    dataset_for(cfg, LatentCache("disk", "vae", tmp_path / "cache"))
    again = LatentCache("disk", "vae", tmp_path / "cache")
    dataset = dataset_for(cfg, again)  # everything reused: an encoder call would also be fine, but none is needed
    entry = again.entry(dataset.items[0], dataset.plans[0])
    assert (
        entry["mask"].dtype == torch.uint8 and entry["mask"][:, :16].eq(255).all() and entry["mask"][:, 16:].eq(0).all()
    )
    unmasked = LatentCache("disk", "vae", tmp_path / "cache")  # the same images without masks: other entries
    assert unmasked.key(dataset.items[0], dataset.plans[0]) != again.key(dataset.items[0], dataset.plans[0])
    # a memory cache hands its masks to another process's cache with the latents
    memory = LatentCache("memory", "vae", masks=again.masks)
    memory.absorb(again.export(dataset.cache_entries()))
    assert torch.equal(memory.entry(dataset.items[0], dataset.plans[0])["mask"], entry["mask"])


def test_mask_folder_masks_use_the_red_channel_and_missing_ones_are_an_error(tmp_path: Path) -> None:
    images, masks = tmp_path / "data", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for n in range(2):
        Image.new("RGB", (W, H), (200, 10, 10)).save(images / f"{n}.jpg")
    mask = np.zeros((H, W, 3), dtype=np.uint8)
    mask[: H // 2, :, 0] = 255  # top half trains (R channel; G and B are ignored as kohya ignores them)
    mask[:, :, 1] = 255
    Image.fromarray(mask).save(masks / "0.png")
    cfg = data_cfg(images, mask_path=str(masks), cache_latents="none")
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    with pytest.raises(DataError, match=r"no mask in .* for 1 image\(s\): 1\.jpg"):
        mask_source(cfg, index.train)
    # a validation image without a mask is fine (it weighs 1); one with a mask uses it
    lenient = mask_source(cfg, index.train[:1], optional=index.train[1:])
    assert lenient is not None and lenient.with_mask == {index.train[0].key}
    Image.fromarray(mask).save(masks / "1.png")
    source = mask_source(cfg, index.train)
    assert source is not None and source.summary(index.train).endswith("2 image(s) with a mask, 0 without")
    dataset = ImageDataset(index.train, cfg, seed=0, masks=source)
    want = torch.zeros(H, W)
    want[: H // 2] = 1.0
    torch.testing.assert_close(collate([dataset[SampleRef(0, 0, 0)]])["loss_mask"][0, 0], want)
    Image.fromarray(mask[:, : W // 2]).save(masks / "1.png")  # a mask of another size than its image
    with pytest.raises(DataError, match="a mask must have its image's size"):
        ImageDataset(index.train, cfg, seed=0, masks=mask_source(cfg, index.train))[SampleRef(1, 0, 0)]


def test_apply_loss_mask_is_kohyas_area_resampled_product() -> None:
    """kohya's apply_masked_loss: interpolate(mask, size=latent grid, mode="area") * loss, then the mean over every
    element. Area resampling by 8 is the mean of each 8x8 pixel block, computed here by reshaping."""
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(2, 4, 6, 8, generator=gen)
    mask = (torch.rand(2, 1, 48, 64, generator=gen) > 0.5).float()
    block_mean = mask.reshape(2, 1, 6, 8, 8, 8).mean(dim=(3, 5))
    want = (loss * block_mean).mean(dim=(1, 2, 3))
    got = apply_loss_mask(loss, mask).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, want)
    # a mask of ones leaves the loss alone; an image half masked out contributes about half its loss
    torch.testing.assert_close(apply_loss_mask(loss, torch.ones_like(mask)), loss)
    half = torch.zeros_like(mask)
    half[..., :32] = 1.0
    torch.testing.assert_close(apply_loss_mask(loss, half).sum(), loss[..., :4].sum())


@pytest.mark.usefixtures("builtin_cache")
@torch.no_grad()
def test_the_step_weights_each_element_by_the_masks_area_mean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole micro-step against kohya's formula: mean over elements of (pred - target)^2 * area(mask), with
    the UNet's own prediction and the step's own noise recorded."""
    from test_train import tiny_config

    from loha_train.models.loading import load_models
    from loha_train.training import step

    cfg = tiny_config(tmp_path)
    bundle = load_models(cfg.model)
    preds: list[torch.Tensor] = []
    noises: list[torch.Tensor] = []
    hook = bundle.unet.register_forward_hook(lambda _m, _a, out: preds.append(out.sample.float()))
    draw = step.draw_noise
    monkeypatch.setattr(step, "draw_noise", lambda *a: (r := draw(*a), noises.append(r.noise))[0])
    channels = bundle.unet.config.in_channels
    gen = torch.Generator().manual_seed(1)
    mask = (torch.rand(2, 1, 96, 80, generator=gen) > 0.3).float()
    batch = {
        "latents": torch.randn(2, channels, 12, 10, generator=gen),
        "captions": ["a red circle", "a blue square"],
        "keys": ["a", "b"],
        "loss_weight": torch.tensor([1.0, 0.5]),
        "loss_mask": mask,
    }
    torch.manual_seed(0)
    got = step.micro_step(cfg, bundle, torch.device("cpu"), batch)
    hook.remove()
    area = mask.reshape(2, 1, 12, 8, 10, 8).mean(dim=(3, 5))
    per_image = ((preds[0] - noises[0]) ** 2 * area).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, (per_image * batch["loss_weight"]).mean())
    unmasked = ((preds[0] - noises[0]) ** 2).mean(dim=(1, 2, 3))
    assert not torch.allclose(per_image, unmasked)

"""Latent and text-embedding caches (reuse, invalidation, atomic files) and the provenance helpers."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from loha_train.config import DataConfig
from loha_train.data import (
    BucketBatchSampler,
    DataError,
    ImageDataset,
    LatentCache,
    TextEmbeddingCache,
    bucket_info,
    check_images,
    collate,
    dataset_fingerprint,
    fixed_captions,
    load_pixels,
    scan_dataset,
    tag_frequencies,
)

SIZES = [(64, 64), (96, 48), (64, 64), (48, 96), (96, 48)]


def make_image(path: Path, size: tuple[int, int], color=(120, 60, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def data_cfg(path: Path, **overrides) -> DataConfig:
    small = {"resolution": 64, "bucket_min_side": 32, "bucket_max_side": 128, "bucket_step": 16}
    return DataConfig(path=str(path), **{**small, **overrides})


class CountingEncoder:
    """A stand-in VAE: 8x average pooling to 4 channels; records every batch it sees."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    @property
    def images(self) -> int:
        return sum(shape[0] for shape in self.batches)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.min() >= -1 and pixels.max() <= 1
        self.batches.append(tuple(pixels.shape))
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    for n, size in enumerate(SIZES):
        make_image(tmp_path / "data" / f"{n}.png", size, color=(40 * n, 100, 200))
        (tmp_path / "data" / f"{n}.txt").write_text(f"sks, thing{n}, red")
    return tmp_path / "data"


def prepared(cfg: DataConfig, cache: LatentCache, encoder: CountingEncoder) -> ImageDataset:
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    dataset = ImageDataset(index.train, cfg, seed=0, latents=cache)
    cache.prepare(dataset.cache_entries(), encoder, batch_size=2)
    return dataset


def test_disk_cache_is_reused_across_runs(data_dir, tmp_path):
    cfg, encoder = data_cfg(data_dir), CountingEncoder()
    first = prepared(cfg, LatentCache("disk", "vae-a", tmp_path / "cache"), encoder)
    assert encoder.images == len(SIZES)
    assert all(shape[0] <= 2 for shape in encoder.batches)  # batched per bucket, at most batch_size
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == len(SIZES)
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary files left behind

    again = LatentCache("disk", "vae-a", tmp_path / "cache")
    stats = again.prepare(first.cache_entries(), encoder)
    assert stats.encoded == 0 and stats.reused == len(SIZES) and encoder.images == len(SIZES)
    item, plan = first.cache_entries()[1]
    expected = encoder(load_pixels(item.path, plan)[None])[0]
    assert torch.equal(again.get(item, plan), expected)


@pytest.mark.parametrize(
    "change",
    ["vae", "resolution", "image bytes", "dtype"],
)
def test_disk_cache_invalidation(change, data_dir, tmp_path):
    cfg, encoder = data_cfg(data_dir), CountingEncoder()
    prepared(cfg, LatentCache("disk", "vae-a", tmp_path / "cache"), encoder)
    vae, dtype = "vae-a", torch.float32
    if change == "vae":
        vae = "vae-b"
    elif change == "resolution":
        cfg = replace(cfg, resolution=48)
    elif change == "image bytes":
        make_image(data_dir / "0.png", SIZES[0], color=(1, 2, 3))
    elif change == "dtype":
        dtype = torch.float16
    encoder.batches.clear()
    prepared(cfg, LatentCache("disk", vae, tmp_path / "cache", dtype=dtype), encoder)
    assert encoder.images == (1 if change == "image bytes" else len(SIZES))


def test_corrupt_cache_file_is_recomputed(data_dir, tmp_path):
    cfg, encoder = data_cfg(data_dir), CountingEncoder()
    prepared(cfg, LatentCache("disk", "vae-a", tmp_path / "cache"), encoder)
    victim = sorted((tmp_path / "cache").glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:20])
    encoder.batches.clear()
    prepared(cfg, LatentCache("disk", "vae-a", tmp_path / "cache"), encoder)
    assert encoder.images == 1


def test_memory_cache_feeds_batches(data_dir):
    cfg, encoder = data_cfg(data_dir), CountingEncoder()
    cache = LatentCache("memory", "vae-a")
    dataset = prepared(cfg, cache, encoder)
    sampler = BucketBatchSampler(dataset.items, dataset.buckets, batch_size=2, seed=0)
    for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate):
        _, channels, height, width = batch["latents"].shape
        assert channels == 4 and "pixels" not in batch
        assert batch["target_size"][0].tolist() == [height * 8, width * 8]
    assert encoder.images == len(SIZES)


def test_cached_latents_refuse_random_crop(data_dir):
    cfg = data_cfg(data_dir, random_crop=True)
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    with pytest.raises(DataError, match="cache_latents: none"):
        ImageDataset(index.train, cfg, seed=0, latents=LatentCache("memory", "vae"))


def fake_text_encoder(calls: list[list[str]]):
    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        calls.append(captions)
        lengths = torch.tensor([float(len(c)) for c in captions])
        return {"hidden_states": lengths[:, None, None].expand(-1, 77, 8).clone(), "pooled": lengths[:, None]}

    return encode_text


def test_text_cache_encodes_each_caption_once(data_dir, tmp_path):
    cfg = data_cfg(data_dir, caption_dropout=0.5)
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    captions = fixed_captions(index.train, cfg)
    assert "" in captions and len(captions) == len(SIZES) + 1
    calls: list[list[str]] = []
    cache = TextEmbeddingCache("clip-a", clip_skip=2, mode="disk", cache_dir=tmp_path / "text")
    assert cache.prepare(captions * 2, fake_text_encoder(calls), batch_size=4).encoded == len(captions)
    assert [len(c) for c in calls] == [4, 2]
    assert TextEmbeddingCache("clip-a", 2, mode="disk", cache_dir=tmp_path / "text").prepare(
        captions, fake_text_encoder(calls)
    ).reused == len(captions)
    assert TextEmbeddingCache("clip-a", 1, mode="disk", cache_dir=tmp_path / "text").prepare(
        captions, fake_text_encoder(calls)
    ).encoded == len(captions)  # clip_skip is part of the key
    out = cache.get("sks, thing1, red")
    assert out["hidden_states"].shape == (77, 8) and out["pooled"].item() == len("sks, thing1, red")

    dataset = ImageDataset(index.train, cfg, seed=0, text=cache)
    sampler = BucketBatchSampler(dataset.items, dataset.buckets, batch_size=2, seed=0)
    for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate):
        pooled = batch["text_embeddings"]["pooled"][:, 0].tolist()
        assert pooled == [float(len(c)) for c in batch["captions"]]


def test_text_cache_refuses_varying_captions(data_dir):
    cfg = data_cfg(data_dir, shuffle_captions=True)
    index = scan_dataset(cfg)
    with pytest.raises(DataError, match="shuffle_captions"):
        fixed_captions(index.train, cfg)
    with pytest.raises(DataError, match="not in the text-embedding cache"):
        TextEmbeddingCache("clip").get("anything")


# --- provenance ---------------------------------------------------------------------------------------


def test_fingerprint_tracks_content_captions_and_repeats(data_dir):
    def fingerprint(**overrides) -> dict:
        return dataset_fingerprint(check_images(scan_dataset(data_cfg(data_dir, **overrides)), skip_bad=False).index)

    base = fingerprint()
    assert base["images"] == len(SIZES) and base["repeats"] == len(SIZES) and len(base["sha256"]) == 64
    assert fingerprint() == base
    assert fingerprint(repeats=2)["sha256"] != base["sha256"]
    (data_dir / "1.txt").write_text("other caption")
    changed_caption = fingerprint()
    assert changed_caption["sha256"] != base["sha256"]
    make_image(data_dir / "2.png", SIZES[2], color=(9, 9, 9))
    assert fingerprint()["sha256"] != changed_caption["sha256"]
    json.dumps(base)


def test_tag_frequency_in_kohya_shape(tmp_path):
    make_image(tmp_path / "3_a" / "x.png", (64, 64))
    (tmp_path / "3_a" / "x.txt").write_text("red, blue")
    make_image(tmp_path / "3_a" / "y.png", (64, 64))
    (tmp_path / "3_a" / "y.txt").write_text("red,  green ,")
    make_image(tmp_path / "1_b" / "z.png", (64, 64))
    index = scan_dataset(data_cfg(tmp_path, trigger_word="sks"))
    assert tag_frequencies(index) == {
        "1_b": {"b": 1, "sks": 1},
        "3_a": {"blue": 1, "green": 1, "red": 2, "sks": 2},
    }


def test_bucket_info_in_kohya_shape(data_dir, tmp_path):
    make_image(tmp_path / "reg" / "r.png", (64, 64))
    cfg = data_cfg(data_dir, repeats=3, reg_path=str(tmp_path / "reg"))
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    info = bucket_info(index)
    resolutions = [b["resolution"] for b in info["buckets"].values()]
    assert list(info["buckets"]) == list(range(len(resolutions))) and resolutions == sorted(resolutions)
    dataset = ImageDataset(index.train + index.reg, cfg, seed=0)
    sampler = BucketBatchSampler(dataset.items, dataset.buckets, batch_size=1, seed=0)
    assert sum(b["count"] for b in info["buckets"].values()) == sampler.samples_per_epoch == 2 * 3 * len(SIZES)
    assert info["mean_img_ar_error"] >= 0
    json.loads(json.dumps(info))

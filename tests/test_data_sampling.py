"""Epoch plans (repeats, reg interleave, buckets, resume, shards) and the batches the dataset yields."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from loha_train.config import DataConfig
from loha_train.data import (
    BucketBatchSampler,
    ImageDataset,
    ImageItem,
    check_images,
    collate,
    scan_dataset,
)

SIZES = [(64, 64), (96, 48), (48, 96), (64, 64), (80, 48), (64, 64), (96, 48)]


def make_image(path: Path, size: tuple[int, int], color=(120, 60, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def data_cfg(path: Path, **overrides) -> DataConfig:
    small = {"resolution": 64, "bucket_min_side": 32, "bucket_max_side": 128, "bucket_step": 16}
    return DataConfig(path=str(path), **{**small, **overrides})


def fake_items(buckets: list[tuple[int, int]], repeats: int = 1, reg: list[tuple[int, int]] = ()):
    """Items and buckets without files, for sampler-only tests."""
    items = [
        ImageItem(key=f"train/{i}", path=Path(f"{i}.png"), caption="", subset="s", repeats=repeats)
        for i in range(len(buckets))
    ]
    items += [
        ImageItem(key=f"reg/{i}", path=Path(f"r{i}.png"), caption="", subset="r", is_reg=True) for i in range(len(reg))
    ]
    return items, list(buckets) + list(reg)


BUCKETS = [(64, 64)] * 7 + [(96, 48)] * 5 + [(48, 96)] * 3 + [(80, 48)]


def flat(batches) -> list:
    return [ref for batch in batches for ref in batch]


def test_every_sample_appears_repeats_times_in_same_bucket_batches():
    items, buckets = fake_items(BUCKETS, repeats=3)
    sampler = BucketBatchSampler(items, buckets, batch_size=4, seed=0)
    batches = sampler.epoch_batches(0)
    assert Counter(ref.item for ref in flat(batches)) == {i: 3 for i in range(len(BUCKETS))}
    assert len({ref.slot for ref in flat(batches)}) == 3 * len(BUCKETS)
    for batch in batches:
        assert 1 <= len(batch) <= 4 and len({buckets[ref.item] for ref in batch}) == 1
    assert len(sampler) == len(batches) == sum(-(-3 * n // 4) for n in (7, 5, 3, 1))
    assert sampler.samples_per_epoch == 3 * len(BUCKETS)


def test_order_is_seeded_by_seed_and_epoch():
    items, buckets = fake_items(BUCKETS, repeats=2)

    def order(seed: int, epoch: int) -> list:
        return BucketBatchSampler(items, buckets, 3, seed).epoch_batches(epoch)

    assert order(5, 2) == order(5, 2)
    assert order(5, 2) != order(5, 3)
    assert order(5, 2) != order(6, 2)
    unshuffled = BucketBatchSampler(items, buckets, 3, seed=5, shuffle=False).epoch_batches(2)
    assert [ref.item for ref in flat(unshuffled)] == sorted(
        (ref.item for ref in flat(unshuffled)), key=lambda i: (buckets[i], i)
    )


def test_resume_at_epoch_and_batch_equals_uninterrupted_run():
    items, buckets = fake_items(BUCKETS, repeats=2, reg=[(64, 64), (96, 48)])

    def run(sampler: BucketBatchSampler, first_epoch: int, start_batch: int, epochs: int) -> list:
        seen = []
        for epoch in range(first_epoch, epochs):
            sampler.set_epoch(epoch, start_batch if epoch == first_epoch else 0)
            seen.extend(iter(sampler))
        return seen

    full = run(BucketBatchSampler(items, buckets, 2, seed=3), 0, 0, 3)
    steps_before = len(BucketBatchSampler(items, buckets, 2, seed=3)) + 4  # stop inside epoch 1
    resumed = run(BucketBatchSampler(items, buckets, 2, seed=3), 1, 4, 3)
    assert full[steps_before:] == resumed
    with pytest.raises(ValueError, match="outside an epoch"):
        BucketBatchSampler(items, buckets, 2, seed=3).set_epoch(0, 999)


@pytest.mark.parametrize(("replicas", "batch_size"), [(2, 4), (3, 4), (4, 3)])
def test_shards_are_disjoint_equal_and_cover_the_epoch(replicas, batch_size):
    items, buckets = fake_items(BUCKETS, repeats=2)
    whole = BucketBatchSampler(items, buckets, batch_size, seed=1, num_replicas=replicas)
    shards = [
        BucketBatchSampler(items, buckets, batch_size, seed=1, num_replicas=replicas, rank=r).epoch_batches(4)
        for r in range(replicas)
    ]
    assert len({len(shard) for shard in shards}) == 1
    assert all(len(shard) == len(whole) for shard in shards)
    refs = [ref for shard in shards for ref in flat(shard)]
    assert len(refs) == len(set(refs)) == 2 * len(BUCKETS)  # disjoint, every sample exactly once
    assert sorted(refs) == sorted(flat(whole.global_batches(4)))
    for batch in (b for shard in shards for b in shard):
        assert len({buckets[ref.item] for ref in batch}) == 1


def test_shards_pad_when_no_batch_can_be_split():
    items, buckets = fake_items(BUCKETS[:5])
    shards = [BucketBatchSampler(items, buckets, 1, seed=0, num_replicas=2, rank=r) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    refs = flat(shards[0].epoch_batches(0)) + flat(shards[1].epoch_batches(0))
    assert {ref.item for ref in refs} == set(range(5)) and len(refs) == 6


def test_reg_samples_match_train_samples_and_rotate_through_the_pool():
    reg = [(64, 64)] * 6 + [(96, 48)] * 4
    items, buckets = fake_items([(64, 64), (96, 48)], repeats=2, reg=reg)
    sampler = BucketBatchSampler(items, buckets, batch_size=2, seed=0)
    lengths, used = set(), Counter()
    for epoch in range(5):
        refs = flat(sampler.epoch_batches(epoch))
        reg_refs = [ref for ref in refs if items[ref.item].is_reg]
        assert len(reg_refs) == len(refs) - len(reg_refs) == 4  # as many reg as train samples
        lengths.add(len(sampler.epoch_batches(epoch)))
        used.update(ref.item for ref in reg_refs)
    assert lengths == {len(sampler)}  # the batch count never changes between epochs
    assert set(used) == set(range(2, 2 + len(reg)))  # every reg image used within a few epochs
    for bucket in set(reg):  # within a bucket, the endless shuffle spreads the draws evenly
        counts = [used[i] for i in range(2, 2 + len(reg)) if buckets[i] == bucket]
        assert max(counts) - min(counts) <= 1


def test_reg_pool_smaller_than_train_is_repeated():
    items, buckets = fake_items([(64, 64)] * 5, repeats=2, reg=[(64, 64)] * 2)
    refs = flat(BucketBatchSampler(items, buckets, 4, seed=0).epoch_batches(0))
    assert sorted(Counter(ref.item for ref in refs if ref.item >= 5).values()) == [5, 5]


# --- dataset and collate ------------------------------------------------------------------------------


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    for n, size in enumerate(SIZES):
        make_image(tmp_path / "train" / "4_thing" / f"{n}.png", size)
        (tmp_path / "train" / "4_thing" / f"{n}.txt").write_text(f"tag{n}, red, blue, green")
    make_image(tmp_path / "reg" / "dog.png", (64, 64), color=(0, 0, 0))
    make_image(tmp_path / "reg" / "dog2.png", (96, 48), color=(255, 255, 255))
    return tmp_path


def test_batches_carry_everything_training_needs(dataset_dir):
    cfg = data_cfg(dataset_dir / "train", reg_path=str(dataset_dir / "reg"), prior_loss_weight=0.5)
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    dataset = ImageDataset(index.train + index.reg, cfg, seed=0)
    sampler = BucketBatchSampler(dataset.items, dataset.buckets, batch_size=3, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == len(sampler)
    assert sum(len(b["keys"]) for b in batches) == 2 * 4 * len(SIZES)
    for batch in batches:
        n, _, height, width = batch["pixels"].shape
        assert batch["pixels"].dtype == torch.float32 and -1 <= batch["pixels"].min() <= batch["pixels"].max() <= 1
        assert len(batch["captions"]) == len(batch["keys"]) == n
        assert batch["is_reg"].dtype == torch.bool and batch["is_reg"].shape == (n,)
        assert torch.equal(batch["loss_weight"], torch.where(batch["is_reg"], 0.5, 1.0))
        assert batch["target_size"].tolist() == [[height, width]] * n
        assert batch["original_size"].shape == batch["crop_top_left"].shape == (n, 2)
    reg_captions = {c for b in batches for c, r in zip(b["captions"], b["is_reg"], strict=True) if r}
    assert reg_captions == {""}


def test_original_size_and_crop_are_sdxl_ordered(dataset_dir):
    cfg = data_cfg(dataset_dir / "train")
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    dataset = ImageDataset(index.train, cfg, seed=0)
    wide = next(i for i, item in enumerate(dataset.items) if item.size == (96, 48))
    sample = dataset[
        BucketBatchSampler(dataset.items, dataset.buckets, 1, 0).epoch_batches(0)[0][0]._replace(item=wide)
    ]
    assert sample["original_size"] == (48, 96)
    (bucket,) = {dataset.buckets[wide]}
    assert sample["target_size"] == (bucket[1], bucket[0])
    assert sample["pixels"].shape[1:] == sample["target_size"]


def test_dataloader_resume_gives_the_same_captions_and_crops(dataset_dir):
    cfg = data_cfg(
        dataset_dir / "train",
        shuffle_captions=True,
        keep_tokens=1,
        tag_dropout=0.3,
        random_crop=True,
        flip=True,
        cache_latents="none",
    )
    index = check_images(scan_dataset(cfg), skip_bad=False).index

    def steps(epoch: int, start: int) -> list:
        dataset = ImageDataset(index.train, cfg, seed=9)
        sampler = BucketBatchSampler(dataset.items, dataset.buckets, batch_size=2, seed=9)
        sampler.set_epoch(epoch, start)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
        return [(b["keys"], b["captions"], b["crop_top_left"].tolist(), b["pixels"]) for b in loader]

    full, resumed = steps(1, 0), steps(1, 5)
    assert len(full) > 5
    for a, b in zip(full[5:], resumed, strict=True):
        assert a[:3] == b[:3] and torch.equal(a[3], b[3])
    assert [s[1] for s in steps(2, 0)] != [s[1] for s in full]


def test_validation_dataset_is_not_augmented(dataset_dir):
    cfg = data_cfg(dataset_dir / "train", shuffle_captions=True, caption_dropout=0.5, validation_split=0.3)
    index = check_images(scan_dataset(cfg, seed=0), skip_bad=False).index
    dataset = ImageDataset(index.validation, cfg, seed=0, augment=False)
    sampler = BucketBatchSampler(dataset.items, dataset.buckets, 4, seed=0, shuffle=False)
    captions = [
        c for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate) for c in batch["captions"]
    ]
    assert sorted(captions) == sorted(item.caption for item in index.validation)


def test_workers_give_the_same_batches_as_the_main_process(dataset_dir):
    cfg = data_cfg(dataset_dir / "train", shuffle_captions=True, flip=True, cache_latents="none")
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    dataset = ImageDataset(index.train, cfg, seed=4)
    sampler = BucketBatchSampler(dataset.items, dataset.buckets, batch_size=3, seed=4)

    def run(workers: int) -> list:
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        return [(b["captions"], b["pixels"]) for b in loader]

    for (captions_a, pixels_a), (captions_b, pixels_b) in zip(run(0), run(2), strict=True):
        assert captions_a == captions_b and torch.equal(pixels_a, pixels_b)

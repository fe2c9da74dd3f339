"""Dataset discovery, checks, captions and buckets (loha_train.data), on tiny images made in tmp_path."""

from __future__ import annotations

import ast
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loha_train.config import DataConfig
from loha_train.data import (
    DataError,
    assign_bucket,
    bucket_resolutions,
    caption_rng,
    check_images,
    load_pixels,
    plan_crop,
    process_caption,
    randomize_plan,
    scan_dataset,
)


def make_image(path: Path, size: tuple[int, int] = (64, 64), color=(200, 30, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def data_cfg(path: Path, **overrides) -> DataConfig:
    small = {"resolution": 64, "bucket_min_side": 32, "bucket_max_side": 128, "bucket_step": 16}
    return DataConfig(path=str(path), **{**small, **overrides})


def keys(items) -> list[str]:
    return [item.key for item in items]


# --- discovery ----------------------------------------------------------------------------------------


def test_plain_folder_reads_images_and_same_stem_captions(tmp_path, caplog):
    make_image(tmp_path / "b.jpg")
    make_image(tmp_path / "a.png")
    write(tmp_path / "a.txt", "a red square, simple\n")
    make_image(tmp_path / "c.webp")
    write(tmp_path / "c.caption", "from a .caption file")
    make_image(tmp_path / "d.BMP")
    write(tmp_path / "notes.md", "not an image")
    make_image(tmp_path / ".loha-cache" / "x.png")  # hidden: the cache lives here
    with caplog.at_level(logging.WARNING):
        index = scan_dataset(data_cfg(tmp_path, repeats=3))
    assert index.layout == "folder"
    assert keys(index.train) == ["train/a.png", "train/b.jpg", "train/c.webp", "train/d.BMP"]
    assert [i.caption for i in index.train] == ["a red square, simple", "", "from a .caption file", ""]
    assert [i.caption_source for i in index.train] == ["file", "none", "file", "none"]
    assert all(i.repeats == 3 and not i.is_reg and i.subset == tmp_path.name for i in index.train)
    assert index.missing_captions == 2
    assert "2 of 4 images" in caplog.text


def test_trigger_word_and_default_caption(tmp_path):
    make_image(tmp_path / "a.png")
    write(tmp_path / "a.txt", "red, square")
    make_image(tmp_path / "b.png")
    write(tmp_path / "b.txt", "sks, already triggered")
    make_image(tmp_path / "c.png")
    index = scan_dataset(data_cfg(tmp_path, trigger_word="sks", default_caption="a photo"))
    assert [i.caption for i in index.train] == ["sks, red, square", "sks, already triggered", "sks, a photo"]
    assert index.train[2].caption_source == "default"
    assert index.missing_captions == 0
    only_trigger = scan_dataset(data_cfg(tmp_path, trigger_word="sks"))
    assert only_trigger.train[2].caption == "sks"


def test_kohya_subfolders_give_repeats_subsets_and_folder_captions(tmp_path, caplog):
    make_image(tmp_path / "10_my char" / "a.png")
    write(tmp_path / "10_my char" / "a.txt", "tagged")
    make_image(tmp_path / "10_my char" / "b.png")
    make_image(tmp_path / "2_" / "c.png")
    make_image(tmp_path / "extras" / "ignored.png")
    with caplog.at_level(logging.WARNING):
        index = scan_dataset(data_cfg(tmp_path, repeats=7, default_caption="fallback"))
    assert index.layout == "kohya"
    assert keys(index.train) == ["train/10_my char/a.png", "train/10_my char/b.png", "train/2_/c.png"]
    assert [i.repeats for i in index.train] == [10, 10, 2]  # the folder's N overrides data.repeats
    assert [i.subset for i in index.train] == ["10_my char", "10_my char", "2_"]
    # caption file > folder name (DreamBooth class tokens) > default_caption
    assert [i.caption for i in index.train] == ["tagged", "my char", "fallback"]
    assert "extras" in caplog.text


def test_kohya_layout_reports_loose_images_and_zero_repeats(tmp_path):
    make_image(tmp_path / "1_ok" / "a.png")
    make_image(tmp_path / "0_none" / "b.png")
    make_image(tmp_path / "loose.png")
    index = scan_dataset(data_cfg(tmp_path))
    assert keys(index.train) == ["train/1_ok/a.png"]
    messages = {p.path.name: p.message for p in index.problems}
    assert "N_name" in messages["loose.png"] and "repeat count 0" in messages["0_none"]


def test_metadata_jsonl_layout(tmp_path):
    make_image(tmp_path / "imgs" / "b.png")
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "c.png")
    lines = [
        {"file_name": "imgs/b.png", "caption": "from caption"},
        {"file_name": "a.png", "text": "from text"},
        {"file_name": "c.png"},
    ]
    write(tmp_path / "metadata.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    index = scan_dataset(data_cfg(tmp_path, default_caption="dflt"))
    assert index.layout == "metadata" and not index.problems
    assert keys(index.train) == ["train/a.png", "train/c.png", "train/imgs/b.png"]
    assert [i.caption for i in index.train] == ["from text", "dflt", "from caption"]


def test_metadata_problems_name_file_and_line(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    content = [
        json.dumps({"file_name": "a.png", "text": "ok"}),
        "{not json",
        json.dumps({"file_name": "missing.png", "text": "x"}),
        json.dumps({"text": "no file name"}),
        json.dumps({"file_name": "a.png", "text": "again"}),
        json.dumps({"file_name": "../outside.png"}),
    ]
    write(tmp_path / "metadata.jsonl", "\n".join(content))
    index = scan_dataset(data_cfg(tmp_path))
    assert keys(index.train) == ["train/a.png"]
    assert [p.line for p in index.problems] == [2, 3, 4, 5, 6]
    assert all(p.path.name == "metadata.jsonl" for p in index.problems)
    assert "not valid JSON" in index.problems[0].message
    assert "'missing.png' not found" in index.problems[1].message
    assert "listed twice (first on line 1)" in index.problems[3].message


def test_regularization_images_skip_trigger_and_default(tmp_path):
    make_image(tmp_path / "train" / "a.png")
    make_image(tmp_path / "reg" / "1_dog" / "r1.png")
    make_image(tmp_path / "reg" / "1_dog" / "r2.png")
    write(tmp_path / "reg" / "1_dog" / "r2.txt", "a dog on grass")
    cfg = data_cfg(tmp_path / "train", reg_path=str(tmp_path / "reg"), trigger_word="sks", default_caption="x")
    index = scan_dataset(cfg)
    assert [i.caption for i in index.train] == ["sks, x"]
    assert keys(index.reg) == ["reg/1_dog/r1.png", "reg/1_dog/r2.png"]
    assert [i.caption for i in index.reg] == ["dog", "a dog on grass"]
    assert all(i.is_reg for i in index.reg)
    plain = scan_dataset(data_cfg(tmp_path / "train", reg_path=str(tmp_path / "reg" / "1_dog"), reg_repeats=4))
    assert [i.repeats for i in plain.reg] == [4, 4]


def test_validation_path_and_seeded_split(tmp_path):
    for n in range(10):
        make_image(tmp_path / "train" / f"{n:02d}.png")
    make_image(tmp_path / "val" / "5_x" / "v.png")
    index = scan_dataset(data_cfg(tmp_path / "train", validation_path=str(tmp_path / "val"), repeats=2))
    assert keys(index.validation) == ["validation/5_x/v.png"] and len(index.train) == 10
    assert index.validation[0].repeats == 1

    cfg = data_cfg(tmp_path / "train", validation_split=0.3, repeats=2)
    first, again, other = scan_dataset(cfg, seed=1), scan_dataset(cfg, seed=1), scan_dataset(cfg, seed=2)
    assert len(first.validation) == 3 and len(first.train) == 7
    assert keys(first.validation) == keys(again.validation)
    assert keys(first.validation) != keys(other.validation)
    assert set(keys(first.validation)).isdisjoint(keys(first.train))
    assert all(i.repeats == 1 for i in first.validation)
    assert keys(first.validation) == sorted(keys(first.validation))


def test_order_is_sorted_not_creation_order(tmp_path):
    names = [f"{c}.png" for c in "zyxabc"]
    for name in random.Random(0).sample(names, len(names)):
        make_image(tmp_path / name)
    assert keys(scan_dataset(data_cfg(tmp_path)).train) == [f"train/{c}.png" for c in "abcxyz"]


def test_missing_or_empty_folder_raises(tmp_path):
    with pytest.raises(DataError, match=r"data\.path: .*does not exist"):
        scan_dataset(data_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        scan_dataset(data_cfg(tmp_path / "empty"))
    make_image(tmp_path / "ok" / "a.png")
    with pytest.raises(DataError, match=r"data\.reg_path"):
        scan_dataset(data_cfg(tmp_path / "ok", reg_path=str(tmp_path / "empty")))


def test_caption_encodings(tmp_path):
    make_image(tmp_path / "bom.png")
    write(tmp_path / "bom.txt", "\ufeffcafé, naïve".encode())
    make_image(tmp_path / "latin.png")
    write(tmp_path / "latin.txt", "café".encode("latin-1"))
    make_image(tmp_path / "multi.png")
    write(tmp_path / "multi.txt", "\n  first line \nsecond line\n")
    index = scan_dataset(data_cfg(tmp_path))
    assert {i.key: i.caption for i in index.train} == {"train/bom.png": "café, naïve", "train/multi.png": "first line"}
    (problem,) = index.problems
    assert problem.path.name == "latin.txt" and problem.item_key == "train/latin.png"
    assert "not valid UTF-8" in problem.message and "re-save" in problem.message


# --- checks -------------------------------------------------------------------------------------------


def make_bad_dataset(root: Path) -> None:
    make_image(root / "good.png", size=(80, 48))
    write(root / "zero.png", b"")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for name in ("trunc.png", "trunc.jpg"):
        noisy.save(root / name)
        write(root / name, (root / name).read_bytes()[:-2000])
    write(root / "garbage.webp", b"this is not an image at all")
    make_image(root / "tiny.png", size=(20, 20))
    make_image(root / "latin.png")
    write(root / "latin.txt", "café".encode("latin-1"))


BAD_FILES = ["zero.png", "trunc.png", "trunc.jpg", "garbage.webp", "tiny.png", "latin.txt"]


def test_check_lists_every_bad_file_in_one_error(tmp_path):
    make_bad_dataset(tmp_path)
    with pytest.raises(DataError) as raised:
        check_images(scan_dataset(data_cfg(tmp_path)), skip_bad=False)
    message = str(raised.value)
    assert f"found {len(BAD_FILES)} problems" in message
    for name in BAD_FILES:
        assert str(tmp_path / name) in message
    assert "0 bytes" in message and "truncated or corrupt" in message and "too small" in message
    assert "skip_bad_images" in message


def test_check_skip_bad_drops_and_warns(tmp_path, caplog):
    make_bad_dataset(tmp_path)
    with caplog.at_level(logging.WARNING):
        report = check_images(scan_dataset(data_cfg(tmp_path)), skip_bad=True)
    assert keys(report.index.train) == ["train/good.png"]
    assert sorted(p.path.name for p in report.problems) == sorted(BAD_FILES)
    assert f"skipped {len(BAD_FILES)} bad files" in caplog.text
    (good,) = report.index.train
    assert good.size == (80, 48) and good.sha256 is not None and len(good.sha256) == 64


def test_check_reports_metadata_problems(tmp_path):
    make_image(tmp_path / "a.png")
    write(tmp_path / "metadata.jsonl", '{"file_name": "a.png"}\n{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: file 'gone\.png' not found"):
        check_images(scan_dataset(data_cfg(tmp_path)), skip_bad=False)
    assert len(check_images(scan_dataset(data_cfg(tmp_path)), skip_bad=True).index.train) == 1


def test_check_with_nothing_usable_left_raises(tmp_path):
    write(tmp_path / "zero.png", b"")
    with pytest.raises(DataError, match="no usable images left"):
        check_images(scan_dataset(data_cfg(tmp_path)), skip_bad=True)


def test_small_images_are_fine_when_upscaling_is_allowed(tmp_path):
    make_image(tmp_path / "tiny.png", size=(20, 20))
    report = check_images(scan_dataset(data_cfg(tmp_path, bucket_no_upscale=False)), skip_bad=False)
    assert report.index.train[0].size == (20, 20)


def test_check_uses_exif_orientation(tmp_path):
    image = Image.new("RGB", (64, 32))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed 32 wide, 64 tall
    image.save(tmp_path / "rotated.jpg", exif=exif)
    report = check_images(scan_dataset(data_cfg(tmp_path)), skip_bad=False)
    assert report.index.train[0].size == (32, 64)


# --- captions -----------------------------------------------------------------------------------------

TAGS = "sks, first, second, t1, t2, t3, t4, t5, t6"


def test_shuffle_keeps_kept_tokens_and_trigger_in_place():
    cfg = data_cfg(Path("."), shuffle_captions=True, keep_tokens=2, trigger_word="sks")
    orders = set()
    for slot in range(30):
        tags = process_caption(TAGS, cfg, caption_rng(0, 0, slot)).split(", ")
        assert tags[:3] == ["sks", "first", "second"]
        assert sorted(tags[3:]) == ["t1", "t2", "t3", "t4", "t5", "t6"]
        orders.add(tuple(tags))
    assert len(orders) > 10


def test_keep_tokens_without_trigger_word():
    cfg = data_cfg(Path("."), shuffle_captions=True, keep_tokens=1)
    for slot in range(10):
        assert process_caption(TAGS, cfg, caption_rng(0, 0, slot)).startswith("sks, ")


def test_tag_dropout_statistics_and_kept_tags_survive():
    cfg = data_cfg(Path("."), tag_dropout=0.5, keep_tokens=1)
    kept = []
    for slot in range(2000):
        tags = process_caption("keep, a, b, c, d", cfg, caption_rng(1, 0, slot)).split(", ")
        assert tags[0] == "keep"
        kept.append(len(tags) - 1)
    assert abs(np.mean(kept) / 4 - 0.5) < 0.03


def test_caption_dropout_statistics():
    cfg = data_cfg(Path("."), caption_dropout=0.3)
    results = [process_caption("sks, a", cfg, caption_rng(2, 0, slot)) for slot in range(3000)]
    assert set(results) == {"", "sks, a"}
    assert abs(results.count("") / len(results) - 0.3) < 0.03


def test_captions_are_a_function_of_seed_epoch_and_slot():
    cfg = data_cfg(Path("."), shuffle_captions=True, tag_dropout=0.2, caption_dropout=0.1)

    def run(seed: int, epoch: int) -> list[str]:
        return [process_caption(TAGS, cfg, caption_rng(seed, epoch, slot)) for slot in range(20)]

    assert run(0, 3) == run(0, 3)
    assert run(0, 3) != run(0, 4)
    assert run(0, 3) != run(1, 3)
    # a slot's caption does not depend on which slots were processed before it (resume mid-epoch)
    assert process_caption(TAGS, cfg, caption_rng(0, 3, 17)) == run(0, 3)[17]


def test_fixed_captions_are_returned_verbatim():
    cfg = data_cfg(Path("."))
    assert process_caption(" odd ,spacing,,", cfg, caption_rng(0, 0, 0)) == " odd ,spacing,,"
    custom = data_cfg(Path("."), shuffle_captions=True, caption_separator="|")
    assert sorted(process_caption("a|b |c", custom, caption_rng(0, 0, 0)).split("| ")) == ["a", "b", "c"]


# --- buckets ------------------------------------------------------------------------------------------

KOHYA_512 = {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (768, 320)}


def test_bucket_set_bounds_and_kohya_compatibility():
    cfg = DataConfig(path=".", resolution=512)
    buckets = bucket_resolutions(cfg)
    assert set(buckets) >= KOHYA_512 and (1024, 256) in buckets and (704, 320) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert min(w, h) >= 256 and max(w, h) <= 1024 and w * h <= 512 * 512
        assert (h, w) in buckets
    odd = bucket_resolutions(DataConfig(path=".", resolution=600, bucket_step=32, bucket_min_side=250))
    assert all(w % 32 == 0 and h % 32 == 0 and min(w, h) >= 256 and w * h <= 600 * 600 for w, h in odd)


def test_bucket_set_that_cannot_exist_raises():
    with pytest.raises(DataError, match="no bucket fits"):
        bucket_resolutions(DataConfig(path=".", resolution=128, bucket_min_side=256))


def test_assign_picks_the_closest_aspect_ratio():
    cfg = DataConfig(path=".", resolution=512, bucket_no_upscale=False)
    buckets = bucket_resolutions(cfg)
    rng = random.Random(0)
    for _ in range(300):
        size = (rng.randint(100, 3000), rng.randint(100, 3000))
        w, h = assign_bucket(size, cfg, buckets)
        error = abs(math.log((w / h) / (size[0] / size[1])))
        assert all(error <= abs(math.log((bw / bh) / (size[0] / size[1]))) + 1e-9 for bw, bh in buckets)
        assert assign_bucket((size[1], size[0]), cfg, buckets) == (h, w)  # transposes agree
    assert assign_bucket((1000, 1000), cfg, buckets) == (512, 512)
    assert assign_bucket((300, 1200), cfg, buckets) == (256, 1024)


def test_no_upscale_buckets():
    cfg = DataConfig(path=".", resolution=512)
    buckets = bucket_resolutions(cfg)
    assert assign_bucket((2000, 1200), cfg, buckets) in buckets  # large: a regular bucket
    assert assign_bucket((300, 400), cfg, buckets) == (256, 384)  # small: own size, rounded down to step
    assert assign_bucket((500, 450), cfg, buckets) == (448, 448)  # too small for 512x512
    # kohya: below bucket_min_side an image gets its own bucket, its size rounded down to bucket_step
    assert assign_bucket((250, 600), cfg, buckets) == (250 - 250 % 64, 600 - 600 % 64)
    assert assign_bucket((63, 600), cfg, buckets) is None  # too small to train at all
    upscale = DataConfig(path=".", resolution=512, bucket_no_upscale=False)
    assert assign_bucket((300, 400), upscale, buckets) == (448, 576)
    assert assign_bucket((300, 400), DataConfig(path=".", bucketing=False), ()) == (512, 512)


def test_plan_covers_target_and_centers_crop():
    plan = plan_crop((1000, 500), (640, 384))
    assert plan.resized == (768, 384) and (plan.left, plan.top) == (64, 0)
    square = plan_crop((300, 200), (512, 512))
    assert square.resized == (768, 512) and (square.left, square.top) == (128, 0)
    for seed in range(20):
        moved = randomize_plan(plan, random_crop=True, flip=True, rng=np.random.default_rng(seed))
        assert 0 <= moved.left <= 128 and moved.top == 0
        _top, left = moved.crop_top_left
        assert left == (128 - moved.left if moved.flip else moved.left)


def test_pixels_are_in_range_shaped_and_flipped(tmp_path):
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[:, :30] = 255  # left half white, right half black
    Image.fromarray(array).save(tmp_path / "half.png")
    plan = plan_crop((60, 40), (48, 32))
    pixels = load_pixels(tmp_path / "half.png", plan)
    assert pixels.shape == (3, 32, 48) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[:, :, 0].eq(1).all() and pixels[:, :, -1].eq(-1).all()
    flipped = load_pixels(tmp_path / "half.png", randomize_plan(plan, False, True, np.random.default_rng(1)))
    assert torch.equal(flipped, pixels.flip(-1)) or torch.equal(flipped, pixels)


def test_transparent_pixels_become_white(tmp_path):
    make_image(tmp_path / "clear.png", size=(32, 32), color=(0, 0, 0, 0), mode="RGBA")
    pixels = load_pixels(tmp_path / "clear.png", plan_crop((32, 32), (32, 32)))
    assert pixels.eq(1).all()


def test_data_package_does_not_import_model_libraries():
    package = Path(__file__).parents[1] / "loha_train" / "data"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in {"diffusers", "transformers", "accelerate"}, (source, name)


def test_a_photo_smaller_than_the_sdxl_buckets_trains_in_its_own_bucket(tmp_path):
    """kohya (bucket_no_upscale): a 500x700 photo in a 1024 px run gets a 448x640 bucket, not an error."""
    from loha_train.data import ImageDataset
    from loha_train.training.data_pipeline import _small_images

    Image.new("RGB", (500, 700), "red").save(tmp_path / "photo.png")
    Image.new("RGB", (1024, 1024), "blue").save(tmp_path / "big.png")
    cfg = DataConfig(path=str(tmp_path), resolution=1024, bucket_min_side=512, bucket_max_side=2048)
    index = check_images(scan_dataset(cfg), skip_bad=False).index
    dataset = ImageDataset(index.train, cfg, seed=0)
    assert sorted(dataset.buckets) == [(448, 640), (1024, 1024)]
    assert "1 image(s) smaller than data.bucket_min_side in their own smaller bucket" in _small_images(dataset, cfg)

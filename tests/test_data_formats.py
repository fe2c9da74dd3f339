"""Images and metadata a new user brings (issue 15): high-bit-depth images, GIF/TIFF, metadata.csv, extreme
aspect ratios. Expected values come from the formats' definitions or the `datasets` library, not from our code."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import data_cfg, keys, make_image, write

from loha_train.data import check_images, scan_dataset
from loha_train.data.buckets import open_rgb
from loha_train.data.common import DataError


def gradient16(width: int = 64, height: int = 8) -> np.ndarray:
    """A 16-bit ramp over the whole range: 0 ... 65535."""
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path: Path) -> None:
    ramp = gradient16()
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)  # a 16-bit greyscale PNG (bit depth 16, colour type 0)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I"), image.mode  # what Pillow hands us
    rgb = np.asarray(open_rgb(path))
    expected = np.rint(ramp * (255 / 65535)).astype(np.uint8)  # PNG spec: sample * (2^8-1) / (2^16-1)
    assert rgb.shape == (*ramp.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


@pytest.mark.parametrize("mode", ["I;16B", "F"])
def test_other_high_bit_depth_tiffs_are_scaled(tmp_path: Path, mode: str) -> None:
    ramp = gradient16()
    if mode == "F":  # 32-bit float samples in [0, 1]
        image = Image.fromarray((ramp / 65535).astype(np.float32))
    else:  # big-endian 16-bit samples, as many scanners write TIFFs
        image = Image.frombytes(mode, (ramp.shape[1], ramp.shape[0]), ramp.astype(">u2").tobytes())
    expected = np.rint(ramp * (255 / 65535))
    image.save(tmp_path / "deep.tif")
    rgb = np.asarray(open_rgb(tmp_path / "deep.tif"))
    np.testing.assert_allclose(rgb[..., 0], expected, atol=1)


def test_gif_and_tiff_are_found_and_train_on_their_first_frame(tmp_path: Path) -> None:
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue], duration=100)
    red.save(tmp_path / "pages.tiff", save_all=True, append_images=[blue])
    make_image(tmp_path / "still.tif", color=(0, 255, 0))
    for name in ("anim", "pages", "still"):
        write(tmp_path / f"{name}.txt", name)
    report = check_images(scan_dataset(data_cfg(tmp_path)), skip_bad=False)
    assert keys(report.index.train) == ["train/anim.gif", "train/pages.tiff", "train/still.tif"]
    first = np.asarray(open_rgb(tmp_path / "anim.gif"))[0, 0]
    assert tuple(first) == (255, 0, 0) and tuple(np.asarray(open_rgb(tmp_path / "pages.tiff"))[0, 0]) == (255, 0, 0)


def test_metadata_csv_is_read_like_the_datasets_imagefolder_builder(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "sub/c.png"):
        make_image(tmp_path / name)
    with (tmp_path / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows([["b.png", "a cat, sitting"], ["a.png", 'a "quoted" dog'], ["sub/c.png", "a bird"]])
    index = scan_dataset(data_cfg(tmp_path))
    assert index.layout == "metadata" and not index.problems
    ours = {item.path.relative_to(tmp_path).as_posix(): item.caption for item in index.train}

    datasets = pytest.importorskip("datasets")
    reference = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    theirs = {Path(row["image"].filename).relative_to(tmp_path).as_posix(): row["text"] for row in reference}
    assert ours == theirs


def test_metadata_csv_problems_name_the_file_and_line(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    write(tmp_path / "metadata.csv", "file_name,text\na.png,ok\ngone.png,missing\n")
    index = scan_dataset(data_cfg(tmp_path))
    assert [str(p) for p in index.problems] == [
        f"{tmp_path / 'metadata.csv'}:3: file 'gone.png' not found in {tmp_path}"
    ]


def test_extreme_aspect_ratio_is_refused_past_max_aspect_ratio(tmp_path: Path) -> None:
    make_image(tmp_path / "strip.png", size=(2000, 10))  # 200:1, a 20000x100 scan in small
    make_image(tmp_path / "fine.png", size=(64, 64))
    with pytest.raises(DataError) as err:
        check_images(scan_dataset(data_cfg(tmp_path, bucket_no_upscale=False)), skip_bad=False)
    assert "strip.png: 2000x10 has an aspect ratio of 200.0:1, more than data.max_aspect_ratio (8)" in str(err.value)


def test_aspect_ratio_that_no_bucket_fits_warns_with_the_kept_fraction(tmp_path: Path, caplog) -> None:
    # buckets 32..128 px with resolution 64: the widest is 128x32 (4:1); a 7:1 image keeps 4/7 of its width
    make_image(tmp_path / "wide.png", size=(448, 64))
    make_image(tmp_path / "fine.png", size=(64, 64))
    with caplog.at_level(logging.WARNING):
        check_images(scan_dataset(data_cfg(tmp_path, bucket_no_upscale=False)), skip_bad=False)
    assert "1 image(s) have an aspect ratio no bucket fits" in caplog.text
    assert f"worst: {tmp_path / 'wide.png'} keeps 57%" in caplog.text, caplog.text


def test_metadata_jsonl_still_wins_over_metadata_csv(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    write(tmp_path / "metadata.jsonl", json.dumps({"file_name": "a.png", "text": "from jsonl"}) + "\n")
    write(tmp_path / "metadata.csv", "file_name,text\na.png,from csv\n")
    assert [i.caption for i in scan_dataset(data_cfg(tmp_path)).train] == ["from jsonl"]


# --- kohya metadata for N_name folders, computed here from sd-scripts' definitions -------------------------------


def kohya_tag_frequency(captions_by_dir: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """sd-scripts `BaseDataset.set_tag_frequency`: split on ",", strip, skip empty, lower-case, count each."""
    out: dict[str, dict[str, int]] = {}
    for dir_name, captions in captions_by_dir.items():
        frequency = out.setdefault(dir_name, {})
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip()
                if tag:
                    frequency[tag.lower()] = frequency.get(tag.lower(), 0) + 1
    return out


def test_kohya_folders_give_kohya_dataset_dirs_counts_and_tag_frequency(tmp_path: Path) -> None:
    from loha_train.data import dataset_dirs, images_times_repeats, tag_frequencies

    folders = {"10_mychar": ["Red, dog, red", "blue , dog,", "dog"], "3_style": ["Ink, Ink"]}
    for folder, captions in folders.items():
        for i, caption in enumerate(captions):
            make_image(tmp_path / "train" / folder / f"{i}.png")
            write(tmp_path / "train" / folder / f"{i}.txt", caption)
    make_image(tmp_path / "reg" / "2_person" / "r.png")
    index = scan_dataset(data_cfg(tmp_path / "train", reg_path=str(tmp_path / "reg")))

    # train_network.py: dataset_dirs_info[basename(subset.image_dir)] = {"n_repeats", "img_count"}, train subsets
    # only (reg ones go to ss_reg_dataset_dirs); num_train_images += num_repeats * len(img_paths) per subset
    assert dataset_dirs(index.train) == {
        "10_mychar": {"n_repeats": 10, "img_count": 3},
        "3_style": {"n_repeats": 3, "img_count": 1},
    }
    assert dataset_dirs(index.reg) == {"2_person": {"n_repeats": 2, "img_count": 1}}
    assert images_times_repeats(index.train) == 10 * 3 + 3 * 1
    assert images_times_repeats(index.reg) == 2 * 1
    expected = kohya_tag_frequency({**folders, "2_person": ["person"]})  # no caption file: the class token
    assert tag_frequencies(index) == expected

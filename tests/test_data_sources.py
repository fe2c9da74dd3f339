"""Data sources read through 🤗 datasets (save_to_disk, parquet/arrow/jsonl/csv files and shards, hf: ids from the
local cache), column detection, and `data.subsets` with kohya's per-subset rules. Data are generated here."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loha_train import data
from loha_train.config import DataConfig, config_from_dict

pytestmark = pytest.mark.usefixtures("builtin_cache", "offline_hf")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty, private HF caches (hub and datasets) and offline mode: nothing is downloaded, ~/.cache is untouched."""
    import datasets

    hub = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return hub


@pytest.fixture(scope="module")
def shapes(builtin_cache: Path) -> Path:
    from loha_train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:shapes")


def shape_files(shapes: Path) -> list[Path]:
    return sorted(p for p in shapes.iterdir() if p.suffix == ".png")


def shape_table(shapes: Path, files: list[Path] | None = None, *, sizes: bool = False) -> Any:
    """builtin:shapes as a datasets.Dataset: an Image column holding the PNG bytes and a text column."""
    import datasets
    from PIL import Image

    files = shape_files(shapes) if files is None else files
    columns: dict[str, list[Any]] = {
        "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
        "text": [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files],
    }
    features = {"image": datasets.Image(), "text": datasets.Value("string")}
    if sizes:
        columns["width"] = [Image.open(f).size[0] for f in files]
        columns["height"] = [Image.open(f).size[1] for f in files]
        features |= {"width": datasets.Value("int32"), "height": datasets.Value("int32")}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def make_source(kind: str, shapes: Path, root: Path, hub: Path) -> str:
    """builtin:shapes written as a source of `kind`; returns the data.path."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    table = shape_table(shapes)
    files = shape_files(shapes)
    if kind == "parquet":
        table.to_parquet(str(root / "shapes.parquet"))
        return str(root / "shapes.parquet")
    if kind == "save_to_disk":
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(root / "saved"))
        return str(root / "saved")
    if kind == "arrow":  # a single arrow file, as Dataset.save_to_disk writes its shards
        table.save_to_disk(str(root / "saved"))
        return str(next((root / "saved").glob("*.arrow")))
    if kind == "jsonl":  # image paths relative to the jsonl's folder
        lines = [
            json.dumps({"file_name": f"images/{f.name}", "text": f.with_suffix(".txt").read_text()}) for f in files
        ]
        (root / "images").mkdir()
        for f in files:
            (root / "images" / f.name).write_bytes(f.read_bytes())
        (root / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(root / "rows.jsonl")
    if kind == "csv":
        (root / "img").mkdir()
        for f in files:
            (root / "img" / f.name).write_bytes(f.read_bytes())
        rows = "".join(f'img/{f.name},"{f.with_suffix(".txt").read_text().strip()}"\n' for f in files)
        (root / "rows.csv").write_text("file_name,caption\n" + rows, encoding="utf-8")
        return str(root / "rows.csv")
    if kind == "shards":  # a folder of parquet shards, read in name order
        (root / "data").mkdir()
        table.select(range(10)).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
        table.select(range(10, 16)).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
        return str(root)
    if kind == "imagefolder":
        for f in files:
            (root / f.name).write_bytes(f.read_bytes())
        meta = [json.dumps({"file_name": f.name, "text": f.with_suffix(".txt").read_text().strip()}) for f in files]
        (root / "metadata.jsonl").write_text("\n".join(meta) + "\n", encoding="utf-8")
        return str(root)
    if kind == "hub":  # what `hf download user/shapes --repo-type dataset` leaves in the hub cache
        repo = hub / "datasets--user--shapes"
        snapshot = repo / "snapshots" / COMMIT / "data"
        snapshot.mkdir(parents=True)
        table.to_parquet(str(snapshot / "train-00000-of-00001.parquet"))
        table.select([0, 1]).to_parquet(str(snapshot / "test-00000-of-00001.parquet"))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        return "hf:user/shapes"
    raise ValueError(kind)


def checked(path: str, **options: Any) -> tuple[data.DatasetIndex, data.ImageDataset]:
    cfg = DataConfig(path=path, resolution=64, bucket_min_side=32, bucket_max_side=128, bucket_step=32, **options)
    index = data.check_images(data.scan_dataset(cfg), skip_bad=False).index
    return index, data.ImageDataset(index.train + index.reg, cfg, seed=3)


def tiny(out: Path, **data_options: Any) -> dict[str, Any]:
    return {
        "model": {"path": "builtin:tiny-sd-random"},
        "network": {"preset": "attn-only", "rank": 2, "alpha": 1},
        "data": {"resolution": 64, "bucket_min_side": 32, "bucket_max_side": 128, "bucket_step": 32,
                 "cache_latents": "memory", **data_options},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-3},
        "output": {"dir": str(out)},
    }  # fmt: skip


def train(raw: dict[str, Any], resume: str | None = None, dry_run: bool = False) -> list[str]:
    from accelerate.state import AcceleratorState

    from loha_train.training.recipe import train as run

    AcceleratorState._reset_state(True)
    printed: list[str] = []
    run(config_from_dict(raw), resume=resume, echo=printed.append, dry_run=dry_run)
    return printed


def losses(out: Path) -> list[float]:
    from loha_train.training.metrics import read_metrics

    return [r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]


def assert_split_run_equals(raw: dict[str, Any], split_dir: Path) -> None:
    """`raw` (already trained to its max_steps, 4) run again into `split_dir`, stopped at step 2 and resumed with
    --resume latest: the same losses and adapter as the straight run."""
    split = copy.deepcopy(raw)
    split["output"]["dir"] = str(split_dir)
    split["train"]["max_steps"] = 2
    train(split)
    split["train"]["max_steps"] = 4
    train(split, resume="latest")
    straight = Path(raw["output"]["dir"])
    assert losses(straight) == losses(split_dir)
    assert same_adapter(straight, split_dir)


def same_adapter(a: Path, b: Path) -> bool:
    fa, fb = load_file(str(a / "loha.safetensors")), load_file(str(b / "loha.safetensors"))
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


# ------------------------------------------------------------------------------------------------- sources


KINDS = ["parquet", "save_to_disk", "arrow", "jsonl", "csv", "shards", "imagefolder", "hub"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_kind_gives_the_folders_images_captions_and_batches(
    kind: str, shapes: Path, tmp_path: Path, offline_hf: Path
) -> None:
    path = make_source(kind, shapes, tmp_path / kind, offline_hf)
    index, dataset = checked(path)
    folder_index, folder = checked(str(shapes))
    assert [i.caption for i in index.train] == [i.caption for i in folder_index.train]
    assert dataset.buckets == folder.buckets
    sampler = data.BucketBatchSampler(dataset.items, dataset.buckets, 2, seed=3)
    reference = data.BucketBatchSampler(folder.items, folder.buckets, 2, seed=3)
    assert sampler.epoch_batches(1) == reference.epoch_batches(1)
    ref = sampler.epoch_batches(1)[0][0]
    assert torch.equal(dataset[ref]["pixels"], folder[ref]["pixels"])
    assert index.sources[0].images == 16


def test_every_source_kind_trains_three_steps_as_subsets(shapes: Path, tmp_path: Path, offline_hf: Path) -> None:
    subsets = [{"path": make_source(kind, shapes, tmp_path / kind, offline_hf), "name": kind} for kind in KINDS]
    raw = tiny(tmp_path / "out", subsets=subsets)
    raw["data"].pop("path", None)
    plan = "\n".join(train(raw))
    assert len(losses(tmp_path / "out")) == 3
    kinds = ["parquet table", "save_to_disk", "arrow table", "json table", "csv table", "parquet table", "metadata"]
    for i, (name, kind) in enumerate(zip(KINDS, [*kinds, "hub parquet"], strict=True)):
        assert f"source data.subsets[{i}].path ({name}, {kind}): 16 images x 1 repeats, 0 without caption" in plan


@pytest.mark.lowest  # the datasets library at its lowest bound (3.0) reads tables and streams
def test_folder_and_parquet_train_the_same_adapter(shapes: Path, tmp_path: Path, offline_hf: Path) -> None:
    parquet = make_source("parquet", shapes, tmp_path / "p", offline_hf)
    train(tiny(tmp_path / "folder", path=str(shapes)))
    train(tiny(tmp_path / "table", path=parquet))
    assert losses(tmp_path / "folder") == losses(tmp_path / "table")
    assert same_adapter(tmp_path / "folder", tmp_path / "table")


def test_hub_split_revision_and_uncached_id(shapes: Path, tmp_path: Path, offline_hf: Path) -> None:
    make_source("hub", shapes, tmp_path / "hub", offline_hf)
    index, _ = checked("hf:user/shapes", hf_split="test")
    assert len(index.train) == 2
    index, _ = checked("hf:user/shapes", hf_revision=COMMIT)
    assert len(index.train) == 16
    start = time.monotonic()
    with pytest.raises(data.DataError) as info:
        data.scan_dataset(DataConfig(path="hf:nobody/missing"))
    assert time.monotonic() - start < 1.0
    message = str(info.value)
    assert "nobody/missing" in message and "hf download nobody/missing --repo-type dataset" in message
    assert "HF_DATASETS_OFFLINE" in message


def test_uncached_hub_id_is_a_one_paragraph_error_before_models_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from loha_train.cli import main

    raw = tiny(tmp_path / "out", path="hf:nobody/missing")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    start = time.monotonic()
    status = main([str(tmp_path / "c.yaml"), "--dry-run"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "hf download nobody/missing --repo-type dataset" in err
    assert elapsed < 5.0, elapsed  # no model load, no network wait (the lookup itself is timed above)


def test_columns_are_detected_or_the_error_lists_them(shapes: Path, tmp_path: Path) -> None:
    table = shape_table(shapes).rename_columns({"image": "picture", "text": "description"})
    table.to_parquet(str(tmp_path / "t.parquet"))
    path = str(tmp_path / "t.parquet")
    with pytest.raises(data.DataError, match=r"columns: picture, description\).*data.caption_column"):
        data.scan_dataset(DataConfig(path=path))
    index = data.scan_dataset(DataConfig(path=path, caption_column="description"))
    assert index.train[0].row is not None and index.train[0].row.column == "picture"  # the Image-typed column
    with pytest.raises(data.DataError, match=r"data.image_column 'photo' is not a column.*picture, description"):
        data.scan_dataset(DataConfig(path=path, image_column="photo", caption_column="description"))
    import datasets

    files = shape_files(shapes)
    plain = {"img": [f.read_bytes() for f in files], "tags": [f.with_suffix(".txt").read_text() for f in files]}
    datasets.Dataset.from_dict(plain).to_parquet(str(tmp_path / "u.parquet"))
    index = data.scan_dataset(DataConfig(path=str(tmp_path / "u.parquet")))  # usual names, a plain binary column
    assert index.train[0].row is not None and index.train[0].row.column == "img"
    assert index.train[0].caption == shape_table(shapes)[0]["text"]


def test_size_columns_plan_without_decoding_and_bad_rows_are_named(shapes: Path, tmp_path: Path) -> None:
    table = shape_table(shapes, sizes=True)
    broken = table.map(
        lambda row, i: {"image": {"bytes": b"not a png", "path": None}} if i == 5 else {}, with_indices=True
    )
    broken.to_parquet(str(tmp_path / "sized.parquet"))
    index, dataset = checked(str(tmp_path / "sized.parquet"))  # planned from width/height: row 5 is not decoded
    assert len(index.train) == 16 and all(i.sha256 is None for i in index.train)
    _, folder = checked(str(shapes))
    assert dataset.buckets == folder.buckets
    broken.remove_columns(["width", "height"]).to_parquet(str(tmp_path / "plain.parquet"))
    with pytest.raises(data.DataError, match=r"plain.parquet: row 5: not a readable image"):
        checked(str(tmp_path / "plain.parquet"))


def test_latent_cache_keys_follow_the_dataset_fingerprint_and_row(shapes: Path, tmp_path: Path) -> None:
    shape_table(shapes, sizes=True).to_parquet(str(tmp_path / "a.parquet"))
    _, dataset = checked(str(tmp_path / "a.parquet"))
    cache = data.LatentCache("memory", "vae")
    item, plan = dataset.cache_entries()[0]
    key = cache.key(item, plan)
    shape_table(shapes, sizes=True).map(lambda r: {"text": r["text"] + "!"}).to_parquet(str(tmp_path / "a.parquet"))
    from loha_train.data.sources import rows

    rows.open_table.cache_clear()
    changed, changed_dataset = checked(str(tmp_path / "a.parquet"))
    assert changed.train[0].row is not None and item.row is not None
    assert changed.train[0].row.fingerprint != item.row.fingerprint
    assert data.LatentCache("memory", "vae").key(*changed_dataset.cache_entries()[0]) != key


# ------------------------------------------------------------------------------------------------- subsets


def subsets_raw(shapes: Path, tmp_path: Path, offline_hf: Path, out: Path) -> dict[str, Any]:
    files = shape_files(shapes)
    folder = tmp_path / "concept" / "2_concept"  # kohya layout: the folder name says 2 repeats
    if not folder.exists():
        folder.mkdir(parents=True)
        for f in files[:6]:
            (folder / f.name).write_bytes(f.read_bytes())
            (folder / f.with_suffix(".txt").name).write_text(f.with_suffix(".txt").read_text(), encoding="utf-8")
        tagged = shape_table(shapes, files[6:12]).map(lambda r: {"text": ", ".join(r["text"].split())})  # word tags
        tagged.to_parquet(str(tmp_path / "style.parquet"))
        reg = tmp_path / "reg"
        reg.mkdir()
        for f in files[12:]:
            (reg / f.name).write_bytes(f.read_bytes())
    raw = tiny(out)
    raw["data"] |= {
        "trigger_word": "zkz",
        "subsets": [
            {"path": str(folder.parent), "caption_prefix": "photo of", "caption_suffix": "sharp"},
            {"path": str(tmp_path / "style.parquet"), "name": "style", "repeats": 3, "shuffle_captions": True,
             "keep_tokens": 1, "caption_dropout": 0.25},
            {"path": str(reg), "is_reg": True, "default_caption": "a shape", "prior_loss_weight": 0.5},
        ],
    }  # fmt: skip
    raw["data"].pop("path", None)
    return raw


def test_subsets_take_their_own_repeats_caption_rules_and_reg_role(
    shapes: Path, tmp_path: Path, offline_hf: Path
) -> None:
    raw = subsets_raw(shapes, tmp_path, offline_hf, tmp_path / "out")
    cfg = config_from_dict(raw).data
    index = data.check_images(data.scan_dataset(cfg), skip_bad=False).index
    dataset = data.ImageDataset(index.train + index.reg, cfg, seed=3)
    files = shape_files(shapes)
    texts = [f.with_suffix(".txt").read_text().strip() for f in files]
    # kohya: caption_prefix + " " + caption + " " + caption_suffix; our trigger word is the caption's first tag
    assert [i.caption for i in index.train[:6]] == [f"photo of zkz, {t} sharp" for t in texts[:6]]
    assert [i.caption for i in index.train[6:]] == [f"zkz, {', '.join(t.split())}" for t in texts[6:12]]
    assert [i.caption for i in index.reg] == ["a shape"] * 4  # reg: no trigger word; its own class tokens
    assert [i.repeats for i in index.train] == [2] * 6 + [3] * 6  # 2_concept's folder name; the subset's repeats
    sampler = data.BucketBatchSampler(dataset.items, dataset.buckets, 2, seed=3)
    assert sampler.samples_per_epoch == 2 * 6 + 3 * 6 + (2 * 6 + 3 * 6)  # kohya: as many reg samples as training
    refs = [r for batch in sampler.epoch_batches(0) for r in batch]
    counts = {"concept": 0, "style": 0, "reg": 0}
    for ref in refs:
        item = dataset.items[ref.item]
        counts["reg" if item.is_reg else "style" if item.subset == "style" else "concept"] += 1
        sample = dataset[ref]
        assert sample["loss_weight"] == (0.5 if item.is_reg else 1.0)
        if item.subset == "style":  # keep_tokens: 1 keeps the trigger word first; the other tags shuffled
            assert sample["caption"] == "" or sample["caption"].split(", ")[0] == "zkz"
            assert sorted(sample["caption"].split(", ")) in ([""], sorted(item.caption.split(", ")))
        elif not item.is_reg:
            assert sample["caption"] == item.caption  # the concept subset does not shuffle or drop
    assert counts == {"concept": 12, "style": 18, "reg": 30}
    style = [
        (dataset[r]["caption"], dataset.items[r.item].caption) for r in refs if dataset.items[r.item].subset == "style"
    ]
    assert any(c == "" for c, _ in style) and any(c not in ("", original) for c, original in style)


def test_subsets_in_the_plan_and_exact_resume(shapes: Path, tmp_path: Path, offline_hf: Path) -> None:
    raw = subsets_raw(shapes, tmp_path, offline_hf, tmp_path / "straight")
    raw["train"] |= {"max_steps": 4}
    plan = "\n".join(train(raw))
    assert "source data.subsets[0].path (concept, kohya): 6 images x 2 repeats, 0 without caption" in plan
    assert "source data.subsets[1].path (style, parquet table): 6 images x 3 repeats" in plan
    assert "source data.subsets[2].path (reg, folder, regularization): 4 images x 1 repeats, 0 without caption" in plan
    assert_split_run_equals(raw, tmp_path / "split")


# ------------------------------------------------------------------------------------------------- streaming


def stream_cfg(path: str, **options: Any) -> DataConfig:
    return DataConfig(path=path, resolution=96, bucket_min_side=32, bucket_max_side=128, bucket_step=32,
                      streaming=True, cache_latents="none", **options)  # fmt: skip


def stream_spec(path: str) -> Any:
    from loha_train.data.sources.tables import locate

    return locate(path, data.sources.detect_source(path), "train", None, None, "data.path")


def one_epoch(stream: data.StreamBatches) -> list[str]:
    """The captions of one epoch of `stream` (its next batch already belongs to epoch 1)."""
    captions: list[str] = []
    while True:
        batch = stream.next_batch()
        if stream.epoch > 0:
            return captions
        captions += batch["captions"]


@pytest.mark.parametrize("kind", ["shards", "parquet"])  # two shards: one per process; one file: every 2nd row
def test_stream_processes_see_disjoint_rows_covering_the_epoch(
    kind: str, shapes: Path, tmp_path: Path, offline_hf: Path
) -> None:
    path = make_source(kind, shapes, tmp_path / kind, offline_hf)
    cfg, spec = stream_cfg(path), stream_spec(path)
    seen = [one_epoch(data.StreamBatches(spec, cfg, 2, seed=1, rank=r, world=2)) for r in (0, 1)]
    everything = [f.with_suffix(".txt").read_text().strip() for f in shape_files(shapes)]
    assert len(seen[0]) + len(seen[1]) == 16 and seen[0] and seen[1]
    assert sorted(seen[0] + seen[1]) == sorted(everything)  # each row once within the epoch, over both processes


@pytest.mark.parametrize("world", [1, 2])
def test_stream_state_resumes_exactly_across_the_buffer_and_epochs(
    world: int, shapes: Path, tmp_path: Path, offline_hf: Path
) -> None:
    (tmp_path / "s").mkdir()
    table = shape_table(shapes).select([0, 12, 1, 13, 2, 3, 14, 4, 5, 6, 15, 7, 8, 9, 10, 11])  # buckets interleaved
    table.select(range(8)).to_parquet(str(tmp_path / "s" / "train-00000-of-00002.parquet"))
    table.select(range(8, 16)).to_parquet(str(tmp_path / "s" / "train-00001-of-00002.parquet"))
    path = str(tmp_path / "s")
    cfg, spec = stream_cfg(path, stream_buffer=3, shuffle_captions=True, caption_dropout=0.3), stream_spec(path)
    for rank in range(world):
        straight = data.StreamBatches(spec, cfg, 2, seed=5, rank=rank, world=world)
        expected = [straight.next_batch() for _ in range(14)]  # several epochs
        first = data.StreamBatches(spec, cfg, 2, seed=5, rank=rank, world=world)
        cut = 0
        while (cut < 3 or not first.buffer) and cut < 12:  # cut where rows wait in the bucket buffer
            first.next_batch()
            cut += 1
        state = json.loads(json.dumps(first.state_dict()))  # it goes through train_state.json
        resumed = data.StreamBatches(spec, cfg, 2, seed=5, rank=rank, world=world)
        resumed.load_state_dict(state)
        assert cut < 12 and resumed.buffer
        for want in expected[cut:]:
            got = resumed.next_batch()
            assert got["captions"] == want["captions"]
            assert torch.equal(got["pixels"], want["pixels"])


@pytest.mark.lowest  # the datasets library at its lowest bound (3.0) reads tables and streams
def test_streaming_run_resumed_equals_uninterrupted(shapes: Path, tmp_path: Path, offline_hf: Path) -> None:
    path = make_source("shards", shapes, tmp_path / "s", offline_hf)
    options = {"path": path, "streaming": True, "cache_latents": "none", "stream_buffer": 3, "resolution": 96}
    raw = tiny(tmp_path / "straight", **options)
    raw["train"]["max_steps"] = 4
    plan = "\n".join(train(raw))
    assert "streaming" in plan and "buffer of 3 samples" in plan
    assert_split_run_equals(raw, tmp_path / "split")

"""Benchmark the data side: planning a large parquet table, reading image headers of a large folder, and the data
wait of a streaming run against a tiny-model training step.

Usage (defaults are the figures issue 16 asks for; data are generated into a temporary folder):

    .venv/bin/python scripts/bench_data.py                      # 100k-row parquet, 100k-image folder, streaming
    .venv/bin/python scripts/bench_data.py --rows 20000 --images 10000 --stream-steps 6
    .venv/bin/python scripts/bench_data.py --skip-folder --skip-stream --json data.json

- plan: a parquet of `--rows` rows (one small PNG each, width/height columns), then what `--dry-run` does with it:
  scan (through `datasets`), check (sizes from the columns: nothing decoded) and the bucket plan. Reported: seconds
  and resident-memory growth (VmRSS after minus before; the `datasets` import is done before measuring).
- folder: `--images` small PNGs with .txt captions; the time of the scan, of reading every image's header (the
  size `--dry-run` buckets by), and of the full check (`check_images` decodes each image once), per 10k images.
- stream: a tiny-model streaming run at batch 4: the seconds per `next_batch()` (the data wait: batches are made in
  the training process, between steps) against the seconds per training step, from two runs of different length.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def png(width: int, height: int, shade: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, 128)).save(out, format="PNG")
    return out.getvalue()


SIZES = [(64, 64), (96, 64), (64, 96), (128, 96)]


def bench_plan(root: Path, rows: int) -> dict[str, Any]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loha_train import data
    from loha_train.config import DataConfig

    images = [png(w, h, i * 40) for i, (w, h) in enumerate(SIZES)]
    pick = [i % len(SIZES) for i in range(rows)]
    table = pa.table(
        {
            "image": pa.array([{"bytes": images[k], "path": None} for k in pick]),
            "text": [f"a photo, tag{i % 97}, tag{i % 13}" for i in range(rows)],
            "width": [SIZES[k][0] for k in pick],
            "height": [SIZES[k][1] for k in pick],
        }
    )
    path = root / "rows.parquet"
    pq.write_table(table, path)
    del table
    datasets.disable_progress_bars()
    cfg = DataConfig(path=str(path), resolution=96, bucket_min_side=32, bucket_max_side=128, bucket_step=32)
    before, start = rss_bytes(), time.perf_counter()
    index = data.check_images(data.scan_dataset(cfg), skip_bad=False).index
    dataset = data.ImageDataset(index.train, cfg, seed=0)
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "plan_s": round(seconds, 2),
        "rss_growth_mb": round((rss_bytes() - before) / 2**20, 1),
        "buckets": len(set(dataset.buckets)),
    }


def bench_folder(root: Path, images: int) -> dict[str, Any]:
    from loha_train import data
    from loha_train.config import DataConfig

    folder = root / "folder"
    folder.mkdir()
    encoded = [png(w, h, i * 40) for i, (w, h) in enumerate(SIZES)]
    for i in range(images):
        (folder / f"{i:06d}.png").write_bytes(encoded[i % len(SIZES)])
        (folder / f"{i:06d}.txt").write_text(f"a photo, tag{i % 97}", encoding="utf-8")
    cfg = DataConfig(path=str(folder), resolution=96, bucket_min_side=32, bucket_max_side=128, bucket_step=32)
    start = time.perf_counter()
    index = data.scan_dataset(cfg)
    scanned = time.perf_counter()
    for item in index.train:
        data.read_image_size(item.path)
    headers = time.perf_counter()
    data.check_images(index, skip_bad=False)
    checked = time.perf_counter()
    per = 10_000 / images
    return {
        "images": images,
        "scan_s_per_10k": round((scanned - start) * per, 2),
        "header_reads_s_per_10k": round((headers - scanned) * per, 2),
        "full_check_s_per_10k": round((checked - headers) * per, 2),
    }


def bench_stream(root: Path, steps: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from accelerate.state import AcceleratorState

    from loha_train import data
    from loha_train.config import DataConfig, config_from_dict
    from loha_train.data.sources.tables import locate
    from loha_train.training.recipe import train

    encoded = [png(w, h, i * 40) for i, (w, h) in enumerate(SIZES)]
    rows = 256
    shards = root / "shards"
    shards.mkdir()
    for s in range(2):
        part = range(s * rows // 2, (s + 1) * rows // 2)
        pq.write_table(
            pa.table({"image": [{"bytes": encoded[i % 4], "path": None} for i in part],
                      "text": [f"shape {i}" for i in part]}),
            shards / f"train-{s:05d}-of-00002.parquet",
        )  # fmt: skip
    options = {"path": str(shards), "streaming": True, "cache_latents": "none", "resolution": 96,
               "bucket_min_side": 32, "bucket_max_side": 128, "bucket_step": 32}  # fmt: skip
    cfg = DataConfig(**options)  # type: ignore[arg-type]
    spec = locate(str(shards), "shards", "train", None, None, "data.path")
    stream = data.StreamBatches(spec, cfg, 4, seed=0)
    stream.next_batch()  # opens the shards
    start = time.perf_counter()
    for _ in range(20):
        stream.next_batch()
    wait = (time.perf_counter() - start) / 20

    def run(n: int) -> float:
        raw = {
            "model": {"path": "builtin:tiny-sd"},
            "network": {"preset": "attn-mlp", "rank": 4, "alpha": 2},
            "data": options,
            "train": {"max_steps": n, "batch_size": 4},
            "output": {"dir": str(root / f"run{n}")},
        }
        AcceleratorState._reset_state(True)
        begin = time.perf_counter()
        train(config_from_dict(raw), echo=lambda _: None)
        return time.perf_counter() - begin

    short, long = run(steps), run(2 * steps)
    step = max((long - short) / steps, 1e-9)
    return {"batch": 4, "data_wait_s": round(wait, 4), "step_s": round(step, 4), "wait_fraction": round(wait / step, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--stream-steps", type=int, default=10)
    parser.add_argument("--skip-folder", action="store_true")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import datasets

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("HF_DATASETS_CACHE", str(Path(tmp) / "hf"))
        datasets.config.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
        results["plan"] = bench_plan(Path(tmp), args.rows)
        print("plan   ", results["plan"], flush=True)
        if not args.skip_folder:
            results["folder"] = bench_folder(Path(tmp), args.images)
            print("folder ", results["folder"], flush=True)
        if not args.skip_stream:
            results["stream"] = bench_stream(Path(tmp), args.stream_steps)
            print("stream ", results["stream"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

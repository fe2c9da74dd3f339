"""`data.streaming` under two CPU processes (gloo, `accelerate launch`): within an epoch no row is used by both
processes or twice by one, and a run stopped at step 2 and resumed ends bit-identical to an uninterrupted one.

Which rows a process consumed is read from the real outputs: the checkpoint's stream state (per rank: rows read
this epoch, which of them still wait in the bucket buffer), mapped to the table's `id` column through the same
`open_stream` split the trainer uses. Launch helpers as in tests/test_distributed.py."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loha_train.training.metrics import read_metrics


def _can_launch() -> bool:
    return (
        importlib.util.find_spec("accelerate.commands.launch") is not None
        and importlib.util.find_spec("datasets") is not None
        and torch.distributed.is_available()
        and torch.distributed.is_gloo_available()
    )


pytestmark = [
    pytest.mark.usefixtures("builtin_cache", "fresh_accelerate"),
    pytest.mark.slow,
    pytest.mark.skipif(not _can_launch(), reason="needs datasets, accelerate's launcher and torch.distributed/gloo"),
]

ROWS = 32  # builtin:shapes twice, each row with its own id: 4 steps x 2 processes x batch 2 stay in epoch 0
INTERLEAVED = [0, 12, 1, 13, 2, 3, 14, 4, 5, 6, 15, 7, 8, 9, 10, 11]  # 12-15 are not square: buckets interleave


@pytest.fixture
def table(builtin_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """builtin:shapes as one parquet file (image bytes, caption, a unique `id`); private, offline HF caches."""
    import datasets

    from loha_train.models.builtin import resolve_builtin

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    files = sorted(p for p in resolve_builtin("builtin:shapes").iterdir() if p.suffix == ".png")
    files = [files[i] for i in INTERLEAVED] * 2
    columns = {
        "image": [{"bytes": f.read_bytes(), "path": None} for f in files],
        "text": [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files],
        "id": list(range(len(files))),
    }
    features = {"image": datasets.Image(), "text": datasets.Value("string"), "id": datasets.Value("int32")}
    assert len(files) == ROWS
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return path


def raw_config(out: Path, path: Path, **train: Any) -> dict[str, Any]:
    """The tiny random model; three buckets and a buffer of 3, so rows wait in the buffer at a checkpoint."""
    return {
        "model": {"path": "builtin:tiny-sd-random"},
        "network": {"preset": "attn-only", "rank": 2, "alpha": 1},
        "data": {
            "path": str(path),
            "streaming": True,
            "stream_buffer": 3,
            "cache_latents": "none",
            "resolution": 64,
            "bucket_min_side": 32,
            "bucket_max_side": 128,
            "bucket_step": 16,
            "shuffle_captions": True,
            "caption_dropout": 0.2,
        },
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "save_every_steps": 2, "seed": 7, **train},
        "output": {"dir": str(out)},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(raw: dict[str, Any], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`accelerate launch` of two CPU processes of `python -m loha_train CONFIG *args` (as test_distributed)."""
    out = Path(raw["output"]["dir"])
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(free_port())]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HOME": str(config.parent / "hf-home"),
    }
    return subprocess.run(
        [*launcher, "-m", "loha_train", str(config), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]


def stream_states(out: Path, step: int) -> list[dict[str, Any]]:
    state = json.loads((out / "checkpoints" / f"step-{step:06d}" / "train_state.json").read_text())
    states: list[dict[str, Any]] = state["extra"]["stream"]
    return states


def ids_by_position(path: Path, rank: int, world: int) -> list[int]:
    """The `id` of each row of this process's part of the stream, in stream order (the trainer's own split)."""
    from loha_train.data.sources import detect_source
    from loha_train.data.sources.tables import locate
    from loha_train.data.streaming import open_stream

    spec = locate(str(path), detect_source(str(path)), "train", None, None, "data.path")
    return [int(row["id"]) for row in open_stream(spec, rank, world)]


def consumed(path: Path, states: list[dict[str, Any]]) -> list[list[int]]:
    """Per rank, the ids of the rows emitted in batches so far this epoch: read, and no longer in the buffer."""
    used = []
    for rank, state in enumerate(states):
        ids = ids_by_position(path, rank, len(states))
        used.append([ids[p] for p in range(state["read"]) if p not in set(state["buffered"])])
    return used


def same_tensors(a: Path, b: Path) -> bool:
    fa, fb = load_file(str(a)), load_file(str(b))
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_two_process_stream_uses_each_row_once_and_resumes_bit_identically(table: Path, tmp_path: Path) -> None:
    # the two processes' parts of the stream partition the table
    parts = [ids_by_position(table, rank, 2) for rank in (0, 1)]
    assert parts[0] and parts[1] and sorted(parts[0] + parts[1]) == list(range(ROWS))

    straight = launch(raw_config(tmp_path / "straight", table))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "streaming" in straight.stdout and "split over 2 process(es)" in straight.stdout
    assert steps_logged(tmp_path / "straight") == [1, 2, 3, 4]

    # (1) within the epoch, no row is used by both processes, nor twice by one; each process used at least a
    # row per step (batches of 1 or 2)
    for step in (2, 4):
        states = stream_states(tmp_path / "straight", step)
        assert len(states) == 2 and all(s["epoch"] == 0 for s in states)
        used = consumed(table, states)
        assert all(len(u) >= step for u in used), used
        everything = used[0] + used[1]
        assert len(everything) == len(set(everything)), f"a row was used twice at step {step}: {used}"
        assert set(used[0]) <= set(parts[0]) and set(used[1]) <= set(parts[1])
    at_2 = stream_states(tmp_path / "straight", 2)
    assert any(s["buffered"] for s in at_2), "no row waits in the buffer at step 2: the resume tests little"

    # (2) stopped at step 2 and resumed to step 4: the uninterrupted run's losses, stream and adapter, exactly
    split = raw_config(tmp_path / "split", table, max_steps=2)
    first = launch(split)
    assert first.returncode == 0, first.stderr[-3000:]
    assert stream_states(tmp_path / "split", 2) == at_2
    split["train"]["max_steps"] = 4
    second = launch(split, "--resume", "latest")
    assert second.returncode == 0, second.stderr[-3000:]
    assert steps_logged(tmp_path / "split") == [1, 2, 3, 4]
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    assert stream_states(tmp_path / "split", 4) == stream_states(tmp_path / "straight", 4)
    for name in ("checkpoints/step-000004/adapter.safetensors", "loha.safetensors"):
        assert same_tensors(tmp_path / "split" / name, tmp_path / "straight" / name), name

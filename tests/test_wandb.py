"""Weights & Biases logging: a clear exit-2 error without the package, and in offline mode the run folder holds the
same scalars as metrics.jsonl (and TensorBoard) plus the sample grids."""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from test_train import tiny_raw

from loha_train.cli import main
from loha_train.training.metrics import read_metrics

WANDB = {"project": "loha-test", "run_name": "tiny", "tags": ["ci", "offline"]}


def test_missing_wandb_is_a_user_error_naming_the_key_and_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**tiny_raw(tmp_path / "out"), "logging": {"wandb": WANDB}}))
    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "logging.wandb" in err and 'pip install "loha-train[wandb]"' in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything loaded or was written


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", 0xBEE1, version), then LevelDB's log format (32 KiB
    blocks of chunks with a 7-byte header: CRC-32C, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += block - pos % block
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield parts
            parts = b""


def offline_history(logs: Path) -> list[dict[str, Any]]:
    """The history rows of the offline run under logs/wandb, read from its .wandb record log."""
    from wandb.proto import wandb_internal_pb2

    (path,) = logs.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


@pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")
def test_offline_run_logs_the_tensorboard_scalars_and_sample_grids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from accelerate.state import AcceleratorState

    from loha_train.config import config_from_dict
    from loha_train.training.recipe import train

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = tiny_raw(tmp_path / "out", train__max_steps=2)
    raw["logging"] = {"wandb": WANDB}
    raw["sample"] = {"prompts": [{"prompt": "a red circle", "width": 32, "height": 32, "steps": 1}]}
    AcceleratorState._reset_state(True)
    train(config_from_dict(raw), echo=lambda _: None)
    logs = tmp_path / "out" / "logs"
    rows = offline_history(logs)
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    for metric in read_metrics(logs / "metrics.jsonl"):
        step = metric.pop("step")
        assert {k: by_step[step][k] for k in metric} == pytest.approx(metric, rel=1e-6), step
    assert [s for s in sorted(by_step) if "loss" in by_step[s]] == [1, 2]
    grids = [s for s in sorted(by_step) if by_step[s].get("samples/_type") == "image-file"]
    assert grids == [0, 2]  # before training and at the end, as TensorBoard gets them
    (run_dir,) = logs.glob("wandb/offline-run-*")
    assert (logs / "wandb" / "run_id").read_text().strip() in run_dir.name
    logged = Image.open(run_dir / "files" / by_step[2]["samples/path"])
    grid = Image.open(tmp_path / "out" / "samples" / "step-000002-grid.png")
    assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(grid.convert("RGB")))

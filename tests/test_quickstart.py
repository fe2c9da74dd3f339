"""The quickstart through the real CLI: the output folder contract, samples that changed, a falling overfit loss."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loha_train.training.metrics import read_metrics

QUICKSTART = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
CLI = [sys.executable, "-m", "loha_train"]
SHORT = [
    "train.max_steps=60",
    "train.warmup_steps=5",
    "train.save_every_steps=30",
    "train.validation_every_steps=60",
    "sample.every_n_steps=null",
    "output.save_adapter_every_steps=30",
]


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.mark.slow
def test_quickstart_runs_and_honours_the_output_contract(tmp_path: Path, builtin_cache: Path) -> None:
    out = tmp_path / "quickstart"
    args = [*CLI, str(QUICKSTART), *_sets(*SHORT, f"output.dir={out}")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "training" in done.stderr and "60/60" in done.stderr  # the progress bar

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    events = {f for f in files if f.startswith("logs/events.out.tfevents")}
    assert len(events) == 1
    checkpoint = {"adapter.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "train_state.json"}
    samples = {f"samples/step-{s:06d}-{i}.png" for s in (0, 60) for i in ("00", "01", "02", "03", "grid")}
    assert files - events == {
        "quickstart.safetensors",
        "quickstart-step-000030.safetensors",
        "config.yaml",
        "loss.png",
        "logs/metrics.jsonl",
        *(f"checkpoints/step-{s:06d}/{name}" for s in (30, 60) for name in checkpoint),
        *samples,
    }

    before = np.asarray(Image.open(out / "samples/step-000000-grid.png"), dtype=np.int16)
    after = np.asarray(Image.open(out / "samples/step-000060-grid.png"), dtype=np.int16)
    assert before.shape == after.shape and np.abs(before - after).mean() > 1.0, "the adapter did not change samples"
    val = [r["val_loss"] for r in read_metrics(out / "logs/metrics.jsonl") if "val_loss" in r]
    assert val[-1] < 0.6 * val[0], f"overfit loss {val[0]:.3f} -> {val[-1]:.3f}"

    shown = subprocess.run([*CLI, "inspect", str(out / "quickstart.safetensors")], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in shown.stdout

    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert "Traceback" not in again.stderr

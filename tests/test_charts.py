"""loss.png shows what a person needs: training and validation loss, ticked axes, a legend off the curves, and
the learning rate in its own panel."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loha_train.training.charts import LR, SMOOTH, VALIDATION, loss_curve_png, nice_ticks


def write_metrics(path: Path) -> Path:
    rows = []
    for step in range(1, 201):
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / 200))  # cosine schedule
        rows.append({"step": step, "loss": 1.0 / math.sqrt(step) + 0.05 * ((step * 7919) % 13) / 13, "lr": lr})
        if step % 50 == 0:
            rows.append({"step": step, "val_loss": 1.2 / math.sqrt(step)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def colour_rows(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.nonzero(np.all(image == colour, axis=-1))[0]


def test_loss_png_has_validation_loss_and_a_separate_learning_rate_panel(tmp_path: Path) -> None:
    out = loss_curve_png(write_metrics(tmp_path / "metrics.jsonl"), tmp_path / "loss.png")
    image = np.asarray(Image.open(out).convert("RGB"))
    h = image.shape[0]
    val_rows, lr_rows, loss_rows = (colour_rows(image, c) for c in (VALIDATION, LR, SMOOTH))
    assert len(val_rows) > 20, "the validation loss is drawn"
    assert len(loss_rows) > 100 and len(lr_rows) > 100
    # the learning rate lives in a panel below every loss pixel (legend swatches aside, which sit above panels)
    assert np.median(lr_rows) > np.max(loss_rows[loss_rows > 40]) and np.median(lr_rows) > 0.6 * h


def test_legend_sits_above_the_plot_not_on_the_curves(tmp_path: Path) -> None:
    out = loss_curve_png(write_metrics(tmp_path / "metrics.jsonl"), tmp_path / "loss.png")
    image = np.asarray(Image.open(out).convert("RGB"))
    # the legend swatches are the only VALIDATION pixels above the plot frame (y < 28)
    assert colour_rows(image[:28], VALIDATION).size > 0
    # the curve's first points (step 1, high loss) are near the frame's top-left, where a legend would usually go
    frame = image[28:60, 70:200]
    assert colour_rows(frame, (0, 0, 0)).size < 400, "no legend text inside the plot's top-left corner"


def test_axes_have_round_ticks_not_just_min_and_max() -> None:
    ticks = nice_ticks(0.0213, 1.31)
    assert np.allclose(ticks, [0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    assert np.allclose(nice_ticks(0, 300, 6), [0, 50, 100, 150, 200, 250, 300])
    assert nice_ticks(2.0, 2.0) == [2.0]


@pytest.mark.slow
def test_sampling_pipeline_does_not_print_the_torchvision_notes(builtin_cache: Path, tmp_path: Path) -> None:
    """transformers warns once per process that CLIP/SigLIP image processors need torchvision; we use neither."""
    import os
    import subprocess
    import sys

    if __import__("importlib").util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has nothing to warn about")
    script = (
        "import sys\n"
        "from loha_train.config import ModelConfig\n"
        "from loha_train.models.loading import load_models\n"
        "from loha_train.training import sampling\n"
        "b = load_models(ModelConfig(path='builtin:tiny-sd-random'))\n"
        "m = sampling.SampleModels(b.unet, b.vae, b.text_encoders, b.tokenizers, b.scheduler_config)\n"
        "getattr(sampling, sys.argv[1])(m, 'euler')\n"
    )
    env = {**os.environ, "LOHA_TRAIN_CACHE": str(builtin_cache)}

    def stderr(function: str) -> str:
        done = subprocess.run([sys.executable, "-c", script, function], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "requires torchvision" in stderr("_make_pipeline"), "the notes this test guards against appear"
    assert "requires torchvision" not in stderr("make_pipeline")

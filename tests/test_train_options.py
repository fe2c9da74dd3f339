"""End to end on the tiny model: masked loss, flip with cached latents and caption wildcards together keep the
exact-resume contract, the plan counts masked images, and the file's metadata says the loss was masked."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from test_train import assert_same_run, losses, run, tiny_config

pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")


def masked_shapes(folder: Path) -> Path:
    """The shapes set with alpha channels (the left part opaque, a different width per image; every fourth image
    without alpha) and captions with wildcards."""
    from loha_train.models.builtin import resolve_builtin

    folder.mkdir()
    for n, image in enumerate(sorted(resolve_builtin("builtin:shapes").glob("*.png"))):
        caption = image.with_suffix(".txt").read_text().replace("a ", "{a|one} ", 1)
        (folder / f"{image.stem}.txt").write_text(caption + ", {plain|simple}")
        if n % 4 == 3:
            shutil.copy(image, folder / image.name)
            continue
        rgba = np.asarray(Image.open(image).convert("RGBA")).copy()
        rgba[:, (n + 2) * rgba.shape[1] // 20 :, 3] = 0
        Image.fromarray(rgba, "RGBA").save(folder / image.name)
    return folder


def masked_flipped_wildcards(folder: Path, cache: str) -> dict[str, Any]:
    """Settings of a 4-step run on `masked_shapes` with alpha masks, flips from `cache`d latents and wildcards."""
    return {
        "data__path": str(masked_shapes(folder)),
        "data__alpha_mask": True,
        "data__flip": True,
        "data__cache_latents": cache,
        "data__caption_wildcards": True,
        "train__max_steps": 4,
    }


def test_masked_flipped_wildcard_training_resumes_exactly(tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState

    from loha_train.training.recipe import train

    sets = masked_flipped_wildcards(tmp_path / "data", cache="disk")
    lines: list[str] = []
    AcceleratorState._reset_state(True)
    train(tiny_config(tmp_path / "straight", **sets), echo=lines.append)
    assert "masked loss (alpha channel): 12 image(s) with a mask, 4 without" in "\n".join(lines)
    run(tmp_path / "split", **{**sets, "train__max_steps": 2})
    run(tmp_path / "split", resume="latest", **sets)
    assert_same_run(tmp_path / "straight", tmp_path / "split", 4)
    assert [s for s, _ in losses(tmp_path / "split")] == list(range(1, 5))
    with safe_open(str(tmp_path / "straight" / "loha.safetensors"), framework="pt") as f:
        assert (f.metadata() or {})["ss_masked_loss"] == "True"


def test_every_new_training_option_at_once_resumes_exactly(tmp_path: Path) -> None:
    """Issue 17's acceptance: the options of all three parts together (kohya's loss, noise and timestep options,
    lr groups, max-norm, DoRA, EMA exported, masks, flip with cached latents, wildcards, caption prefix) keep a
    stopped-and-resumed run bit-identical to an uninterrupted one, and the file says what it holds."""
    sets: dict[str, Any] = {
        **masked_flipped_wildcards(tmp_path / "data", cache="memory"),
        "data__caption_prefix": "photo of",
        "train__loss": "huber",
        "train__huber_schedule": "snr",
        "train__debiased_estimation": True,
        "train__noise_offset": 0.05,
        "train__noise_offset_random_strength": True,
        "train__adaptive_noise_scale": 0.01,
        "train__multires_noise_iterations": 3,
        "train__ip_noise_gamma": 0.1,
        "train__ip_noise_gamma_random_strength": True,
        "train__min_timestep": 100,
        "train__max_timestep": 900,
        "train__lr_pattern": {".*up_blocks.*": 5e-4},
        "train__ema": {"decay": 0.9},
        "output__export_ema": True,
        "network__weight_decompose": True,
        "network__scale_weight_norms": 0.5,
        "network__rank_dropout": 0.1,
        "train__save_every_steps": 2,
    }
    run(tmp_path / "straight", **sets)
    shutil.copytree(tmp_path / "straight", tmp_path / "split")  # resume the straight run's step-2 checkpoint
    run(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoints" / "step-000002"), **sets)
    assert_same_run(tmp_path / "straight", tmp_path / "split", 4)
    with safe_open(str(tmp_path / "split" / "loha.safetensors"), framework="pt") as f:
        meta = f.metadata() or {}
        assert any(key.endswith(".dora_scale") for key in f.keys())  # noqa: SIM118
    assert meta["ss_loss_type"] == "huber"
    assert meta["ss_masked_loss"] == "True"
    assert meta["loha_train.weights"] == "ema"
    assert [step for step, _ in losses(tmp_path / "split")] == [1, 2, 3, 4]

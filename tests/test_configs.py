"""Every shipped config loads, validates, and plans a run with its model and data paths pointed at tiny ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loha_train.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
# Shrink a real-size config to the tiny builtin model and data without touching its other settings.
TINY_DATA = [
    "data.path=builtin:shapes",
    "data.resolution=64",
    "data.bucket_min_side=32",
    "data.bucket_max_side=128",
    "data.bucket_step=32",
    "train.mixed_precision=no",
    "model.dtype=fp32",
    "model.tokenizer_path=null",
    "data.validation_path=null",
    "train.validation_every_steps=null",
]


def tiny_model_for(path: Path) -> str:
    name = path.stem
    if "sdxl" in name:
        return "builtin:tiny-sdxl"
    if re.search(r"sd2|-v$", name):
        return "builtin:tiny-sd-v"
    return "builtin:tiny-sd"


def test_configs_exist() -> None:
    assert {"quickstart.yaml", "sd15.yaml", "sd21-v.yaml", "sdxl.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_with_real_paths_replaced(path: Path, builtin_cache: Path) -> None:
    cfg = load_config(path, [f"model.path={tiny_model_for(path)}", "data.path=builtin:shapes"])
    assert cfg.output.dir
    text = path.read_text()
    if "builtin:" not in text:  # a real-model config: its placeholders are named, and missing paths are errors
        with pytest.raises(ConfigError, match=r"model\.path"):
            load_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_plans_a_run_on_a_tiny_model(
    path: Path, builtin_cache: Path, tmp_path: Path, fresh_accelerate: None
) -> None:
    from loha_train.training.recipe import train

    cfg = load_config(path, [f"model.path={tiny_model_for(path)}", *TINY_DATA, f"output.dir={tmp_path}"])
    lines: list[str] = []
    assert train(cfg, dry_run=True, echo=lines.append) is None
    plan = "\n".join(lines)
    assert "trainable parameters" in plan and "steps" in plan
    assert not any(tmp_path.iterdir()), "--dry-run must not write into the output folder"

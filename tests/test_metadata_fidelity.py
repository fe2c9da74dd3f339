"""Metadata records the recipe that was used: rank_dropout_scale and the lr Prodigy actually got."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loha_train.config import config_from_dict, config_to_dict
from loha_train.fileformat.metadata import build_metadata


def metadata(tmp_path: Path, network: dict, train: dict) -> dict[str, str]:
    raw = {
        "model": {"path": "builtin:tiny-sd-random"},
        "network": network,
        "data": {"path": "builtin:shapes"},
        "train": {"max_steps": 1, **train},
        "output": {"dir": str(tmp_path)},
    }
    cfg = config_from_dict(raw)
    return build_metadata(config=config_to_dict(cfg), network={}, family="sd1", prediction_type="epsilon")


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_scale_is_recorded(tmp_path: Path, scale: bool) -> None:
    meta = metadata(tmp_path, {"rank_dropout": 0.1, "rank_dropout_scale": scale}, {})
    assert json.loads(meta["ss_network_args"])["rank_dropout_scale"] == str(scale)


def test_the_lr_recorded_is_the_one_used(tmp_path: Path) -> None:
    prodigy = metadata(tmp_path, {}, {"optimizer": "prodigy", "optimizer_args": {"d_coef": 2.0}})
    assert float(prodigy["ss_learning_rate"]) == 1.0 and float(prodigy["ss_unet_lr"]) == 1.0
    assert "d_coef=2.0" in prodigy["ss_optimizer"]
    assert float(metadata(tmp_path, {}, {})["ss_learning_rate"]) == 1e-4


@pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")
def test_init_from_uses_the_files_alpha_says_so_and_records_it(tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState
    from safetensors import safe_open
    from test_train import run, tiny_config

    from loha_train.training.recipe import train

    first = run(tmp_path / "first", network__alpha=2.0, train__max_steps=1)
    sets = {"network__alpha": 4.0, "network__init_from": str(first), "train__max_steps": 1}
    lines: list[str] = []
    AcceleratorState._reset_state(True)
    train(tiny_config(tmp_path / "plan", **sets), dry_run=True, echo=lines.append)
    assert "the file wins over network.alpha 4" in lines[0] and "most adapters use alpha 2" in lines[0]
    second = run(tmp_path / "second", **sets)
    with safe_open(str(second), framework="pt") as f:
        meta = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}  # noqa: SIM118
    assert alphas == {2.0}  # the file's alpha is what the adapters use ...
    assert float(meta["ss_network_alpha"]) == 2.0  # ... and what the metadata says

"""Training end to end on a tiny model: output contract, exact resume (incl. resume of a resume), overfitting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loha_train.config import Config, config_from_dict
from loha_train.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")


def tiny_raw(out: Path, **sets: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model": {"path": "builtin:tiny-sd-random"},
        "network": {"preset": "full", "rank": 4, "alpha": 2},
        "data": {
            "path": "builtin:shapes",
            "resolution": 96,
            "bucket_min_side": 32,
            "bucket_max_side": 128,
            "bucket_step": 32,
            "cache_latents": "memory",
        },
        "train": {"max_steps": 8, "batch_size": 2, "lr": 1e-3},
        "output": {"dir": str(out)},
    }
    for key, value in sets.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


def tiny_config(out: Path, **sets: Any) -> Config:
    return config_from_dict(tiny_raw(out, **sets))


def run(out: Path, resume: str | None = None, **sets: Any) -> Path | None:
    from accelerate.state import AcceleratorState

    from loha_train.training.recipe import train

    AcceleratorState._reset_state(True)
    return train(tiny_config(out, **sets), resume=resume, echo=lambda _: None)


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]


def final_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "adapter.safetensors"))


def assert_same_run(a: Path, b: Path, step: int) -> None:
    assert losses(a) == losses(b)
    sa, sb = final_state(a, step), final_state(b, step)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    fa, fb = load_file(str(a / "loha.safetensors")), load_file(str(b / "loha.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


# Gradient accumulation, two buckets (the shapes set has square and 4:3 images), caption shuffling with
# tag/caption dropout (so text embeddings are not cached) and both dropouts on: everything that draws randomness.
HARD = {
    "train__gradient_accumulation": 2,
    "data__shuffle_captions": True,
    "data__caption_dropout": 0.2,
    "network__rank_dropout": 0.2,
    "network__module_dropout": 0.1,
}


def test_resume_mid_epoch_equals_straight_run(tmp_path: Path) -> None:
    run(tmp_path / "straight", **HARD)
    run(tmp_path / "split", **HARD, train__max_steps=3)
    run(tmp_path / "split", resume="latest", **HARD)
    state = json.loads((tmp_path / "split/checkpoints/step-000003/train_state.json").read_text())
    assert state["batch_in_epoch"] > 0, "the split should fall inside an epoch"
    assert_same_run(tmp_path / "straight", tmp_path / "split", 8)
    assert [s for s, _ in losses(tmp_path / "split")] == list(range(1, 9))


# Every loss, noise, timestep, lr-group and max-norm option (issue 17, part A) at once, with Prodigy and a schedule,
# on a v-prediction model (scale_v_pred_loss_like_noise_pred needs one).
KOHYA_OPTIONS = {
    "model__path": "builtin:tiny-sd-v",
    "train__loss": "huber",
    "train__huber_schedule": "snr",
    "train__debiased_estimation": True,
    "train__scale_v_pred_loss_like_noise_pred": True,
    "train__min_snr_gamma": 5.0,
    "train__noise_offset": 0.1,
    "train__noise_offset_random_strength": True,
    "train__adaptive_noise_scale": 0.05,
    "train__multires_noise_iterations": 4,
    "train__multires_noise_discount": 0.3,
    "train__ip_noise_gamma": 0.1,
    "train__ip_noise_gamma_random_strength": True,
    "train__min_timestep": 100,
    "train__max_timestep": 900,
    "train__optimizer": "prodigy",
    "train__lr": 1.0,
    "train__scheduler": "constant_with_warmup",  # a schedule that does not depend on max_steps (split runs)
    "train__warmup_steps": 2,
    "train__lr_pattern": {"down_blocks": 0.0},  # prodigy: one lr for all groups, or 0 (a frozen block)
    "network__scale_weight_norms": 2e-5,  # low enough for these few steps to reach
}


def test_resume_with_every_kohya_loss_and_noise_option_equals_straight_run(tmp_path: Path) -> None:
    pytest.importorskip("prodigyopt")
    run(tmp_path / "straight", **KOHYA_OPTIONS, train__max_steps=5)
    run(tmp_path / "split", **KOHYA_OPTIONS, train__max_steps=3)
    run(tmp_path / "split", resume="latest", **KOHYA_OPTIONS, train__max_steps=5)
    assert_same_run(tmp_path / "straight", tmp_path / "split", 5)
    rows = [r for r in read_metrics(tmp_path / "split" / "logs" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["max_norm/keys_scaled"] > 0 and rows[-1]["max_norm/max_key_norm"] <= 2e-5 * (1 + 1e-5), rows
    assert all(r["lr/lr_pattern down_blocks"] == 0 and r["lr/unet"] > 0 for r in rows)
    meta = json.loads(json.dumps(safe_open_metadata(tmp_path / "split" / "loha.safetensors")))
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_debiased_estimation"]) == ("huber", "snr", "True")
    assert (meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"], meta["ss_scale_weight_norms"]) == (
        "4", "0.1", "2e-05")  # fmt: skip


def safe_open_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_resume_of_a_resume_continues_counters(tmp_path: Path) -> None:
    extra = {**HARD, "network__train_text_encoder": True, "train__text_encoder_lr": 5e-4, "train__save_every_steps": 2}
    run(tmp_path / "straight", **extra)
    out = tmp_path / "resumed"
    run(out, **extra, train__max_steps=2)
    run(out, resume="latest", **extra, train__max_steps=5)
    run(out, resume=str(out / "checkpoints" / "step-000005"), **extra)
    assert_same_run(tmp_path / "straight", out, 8)
    steps = [s for s, _ in losses(out)]
    assert steps == list(range(1, 9)), "step numbers must continue, not restart or repeat"
    # checkpoints are named by the global step, and rotation kept the newest three
    # saved at 2, 4, 5 (end of the second run), 6, 8; rotation keeps the newest three
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000006", "step-000008"]
    state = json.loads((out / "checkpoints/step-000008/train_state.json").read_text())
    assert state["step"] == 8 and state["epoch"] == 2
    # TensorBoard holds each step once: the resumed runs purged nothing and duplicated nothing
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))


def test_resume_refuses_changed_settings_and_names_them(tmp_path: Path) -> None:
    from loha_train.training.checkpoint import CheckpointError

    run(tmp_path, train__max_steps=2)
    with pytest.raises(CheckpointError, match=r"network\.rank: checkpoint has 4, config has 8"):
        run(tmp_path, resume="latest", network__rank=8)
    with pytest.raises(CheckpointError, match=r"data\.resolution"):
        run(tmp_path, resume="latest", data__resolution=64)


def test_checkpoint_from_before_a_setting_existed_resumes_at_its_default_only(tmp_path: Path) -> None:
    """A checkpoint written by an older loha-train lacks the settings added since: it resumes while they stay at
    their defaults (the older run behaved so) and is refused, naming them, when one is turned on."""
    import json

    from loha_train.training.checkpoint import STATE_FILE, CheckpointError, list_checkpoints

    run(tmp_path, train__max_steps=2)
    (_, path), *_ = list_checkpoints(tmp_path)[-1:]
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    for key in ("network.weight_decompose", "data.subsets", "train.lr_pattern", "data.alpha_mask"):
        del state["settings"][key]
    (path / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"network\.weight_decompose: checkpoint has no such setting"):
        run(tmp_path, resume="latest", train__max_steps=3, network__weight_decompose=True)
    run(tmp_path, resume="latest", train__max_steps=3)
    assert (tmp_path / "loha.safetensors").is_file()


def test_finished_output_folder_is_not_overwritten(tmp_path: Path) -> None:
    from loha_train.training.guards import TrainingError

    run(tmp_path, train__max_steps=1)
    before = (tmp_path / "loha.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds a finished run"):
        run(tmp_path, train__max_steps=1)
    assert (tmp_path / "loha.safetensors").read_bytes() == before


def test_overfitting_one_image_drives_the_fixed_validation_loss_down(tmp_path: Path) -> None:
    from loha_train.models.builtin import resolve_builtin

    images = tmp_path / "one"
    images.mkdir()
    src = resolve_builtin("builtin:shapes")
    first = sorted(src.glob("*.png"))[0]
    shutil.copy(first, images / first.name)
    shutil.copy(first.with_suffix(".txt"), images / first.with_suffix(".txt").name)
    run(
        tmp_path / "out",
        data__path=str(images),
        data__validation_path=str(images),
        train__validation_every_steps=60,
        train__max_steps=60,
        train__batch_size=1,
        train__lr=1e-2,
        network__rank=8,
        network__alpha=8,
    )
    val = [r["val_loss"] for r in read_metrics(tmp_path / "out/logs/metrics.jsonl") if "val_loss" in r]
    assert len(val) == 2 and all(torch.isfinite(torch.tensor(val)))
    assert val[-1] < 0.5 * val[0], f"validation loss {val[0]:.4f} -> {val[-1]:.4f}"

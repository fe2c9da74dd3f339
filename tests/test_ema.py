"""EMA of the adapter (train.ema): diffusers' EMAModel schedule and update, checkpoints, exact resume, export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_unet
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import assert_same_run, final_state, losses, run, tiny_raw

from loha_train.config import ConfigError, EMAConfig, NetworkConfig, config_from_dict
from loha_train.fileformat.keys import sd_components
from loha_train.loha.inject import inject_loha
from loha_train.training.ema import AdapterEMA, ema_decay

CONFIGS = [
    EMAConfig(),
    EMAConfig(decay=0.9, update_after_step=3),
    EMAConfig(decay=0.999, use_warmup=True, inv_gamma=2.0, power=0.75, min_decay=0.1),
]


def _diffusers_decay(n: int, decay: float, after: int, warmup: bool, inv_gamma: float, power: float, low: float):
    """diffusers EMAModel.get_decay, written out from its documented formula."""
    step = max(0, n - after - 1)
    if step <= 0:
        return 0.0
    value = 1 - (1 + step / inv_gamma) ** -power if warmup else (1 + step) / (10 + step)
    return max(min(value, decay), low)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_decay_follows_diffusers_schedule(cfg):
    from diffusers.training_utils import EMAModel

    reference = EMAModel(
        [torch.nn.Parameter(torch.zeros(1))], decay=cfg.decay, min_decay=cfg.min_decay,
        update_after_step=cfg.update_after_step, use_ema_warmup=cfg.use_warmup, inv_gamma=cfg.inv_gamma,
        power=cfg.power,
    )  # fmt: skip
    for n in range(1, 60):
        expected = _diffusers_decay(
            n, cfg.decay, cfg.update_after_step, cfg.use_warmup, cfg.inv_gamma, cfg.power, cfg.min_decay
        )
        assert ema_decay(cfg, n) == pytest.approx(expected, abs=1e-12)
        assert ema_decay(cfg, n) == pytest.approx(reference.get_decay(n), abs=1e-12)


def test_update_equals_diffusers_emamodel_on_the_same_parameters():
    from diffusers.training_utils import EMAModel

    cfg = EMAConfig(decay=0.95, update_after_step=2, use_warmup=True, power=0.75)
    network = inject_loha(sd_components(make_tiny_unet(), []), NetworkConfig(rank=2, alpha=1.0), seed=0)
    params = list(network.parameters())
    ours = AdapterEMA(cfg, network)
    theirs = EMAModel(
        params, decay=cfg.decay, min_decay=cfg.min_decay, update_after_step=cfg.update_after_step,
        use_ema_warmup=True, inv_gamma=cfg.inv_gamma, power=cfg.power,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ours.update(network)
        theirs.step(params)
    for s, t in zip(ours.shadow, theirs.shadow_params, strict=True):
        assert torch.allclose(s, t, rtol=1e-6, atol=1e-7)
    assert ours.shadow and not torch.allclose(ours.shadow[0], params[0])  # it is an average, not a copy
    trained = [p.detach().clone() for p in params]
    with ours.swapped(network):
        assert all(torch.equal(p, s) for p, s in zip(params, ours.shadow, strict=True))
    assert all(torch.equal(p, t) for p, t in zip(params, trained, strict=True))


EMA = {
    "train__ema": {"decay": 0.8, "update_after_step": 1},
    "output__export_ema": True,
    "network__weight_decompose": True,
    "network__rank_dropout": 0.2,
    "train__max_steps": 4,
    "train__save_every_steps": 2,
    "output__save_adapter_every_steps": 1,  # mid-run exports swap the EMA in and must give the trained weights back
    "sample__use_ema": True,
}


def test_resume_with_ema_and_dora_equals_straight_run(tmp_path):
    run(tmp_path / "straight", **EMA)
    # the split run is the straight one's copy resumed from its step-2 checkpoint (one run fewer than a fresh split)
    shutil.copytree(tmp_path / "straight", tmp_path / "split")
    run(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoints" / "step-000002"), **EMA)
    assert_same_run(tmp_path / "straight", tmp_path / "split", 4)  # losses, checkpoint adapter, exported file
    exported = load_file(str(tmp_path / "split" / "loha.safetensors"))
    trained = final_state(tmp_path / "split", 4)
    assert any(k.endswith(".dora_scale") for k in exported)
    # the file holds the average, not the last trained weights, and says so
    assert not all(torch.allclose(exported[k], trained[k].half()) for k in exported if k.endswith("hada_w1_a"))
    with safe_open(str(tmp_path / "split" / "loha.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["loha_train.weights"] == "ema"
    assert json.loads(meta["loha_train.ema"])["updates"] == 4
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    assert len(losses(tmp_path / "split")) == 4
    from loha_train.fileformat.inspection import format_report, inspect_adapter

    text = format_report(inspect_adapter(tmp_path / "split" / "loha.safetensors"))
    assert (
        "EMA: the file holds the EMA weights (decay 0.8, 4 updates)" in text and "DoRA (weight decomposition)" in text
    )


def test_ema_options_are_checked(tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_raw(tmp_path, sample__use_ema=True, output__export_ema=True), check_paths=False)
    assert "sample.use_ema" in str(e.value) and "output.export_ema" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_raw(tmp_path, train__ema={"decay": 1.5, "min_decay": 2}), check_paths=False)
    assert "train.ema.decay" in str(e.value) and "train.ema.min_decay" in str(e.value)
    assert config_from_dict(tiny_raw(tmp_path, train__ema={}), check_paths=False).train.ema == EMAConfig()

"""Learning-rate groups (train.lr_pattern, SDXL's two text-encoder lrs) with the schedulers and Prodigy, the plan's
group lines, and max-norm regularisation (network.scale_weight_norms) against kohya's definition."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from loha_train.config import ConfigError, config_from_dict
from loha_train.loha.inject import LoHaNetwork
from loha_train.loha.layers import LoHaConv2d, LoHaLinear
from loha_train.models.loading import load_models
from loha_train.training.max_norm import apply_max_norm
from loha_train.training.optim import build_optimizer, param_groups
from loha_train.training.setup import build_network
from tests.test_train import tiny_config, tiny_raw

pytestmark = pytest.mark.usefixtures("builtin_cache")


def network_for(cfg: Any) -> tuple[LoHaNetwork, str]:
    bundle = load_models(cfg.model)
    return build_network(cfg, bundle, torch.device("cpu")), bundle.family


def test_lr_pattern_takes_the_modules_it_matches_first_by_rank_pattern_names(tmp_path: Path) -> None:
    patterns = {r"unet\.down_blocks": 3e-3, "lora_unet_up_blocks_1": 2e-3, "up_blocks": 1e-3}  # by qualname, by key
    cfg = tiny_config(tmp_path, train__lr_pattern=patterns, train__unet_lr=5e-4, network__train_text_encoder=True,
                      train__text_encoder_lr=[7e-5])  # fmt: skip
    network, family = network_for(cfg)
    groups = {g.name: g for g in param_groups(cfg, network, family)}
    assert list(groups) == ["unet", "text_encoder", *(f"lr_pattern {p}" for p in patterns)]
    assert [g.lr for g in groups.values()] == [5e-4, 7e-5, 3e-3, 2e-3, 1e-3]

    def params_of(select: Any) -> set[int]:
        return {
            id(p)
            for k, m in network.modules.items()
            if select(k, network.qualnames[k])
            for p in m.parameters(recurse=False)
        }

    down = params_of(lambda k, q: q.startswith("unet.down_blocks."))
    up1 = params_of(lambda k, q: q.startswith("unet.up_blocks.1."))
    other_up = params_of(lambda k, q: q.startswith("unet.up_blocks.") and not q.startswith("unet.up_blocks.1."))
    assert down and up1 and other_up
    assert {id(p) for p in groups[r"lr_pattern unet\.down_blocks"].params} == down
    assert {id(p) for p in groups["lr_pattern lora_unet_up_blocks_1"].params} == up1  # first match wins
    assert {id(p) for p in groups["lr_pattern up_blocks"].params} == other_up
    unet_rest = params_of(lambda k, q: q.startswith("unet.")) - down - up1 - other_up
    assert {id(p) for p in groups["unet"].params} == unet_rest
    assert sum(len(g.params) for g in groups.values()) == len(list(network.parameters()))


def test_lr_mistakes_name_the_key(tmp_path: Path) -> None:
    network, family = network_for(tiny_config(tmp_path))
    with pytest.raises(ConfigError, match=r"train\.lr_pattern\['nowhere'\]: matches no module with an adapter"):
        param_groups(tiny_config(tmp_path, train__lr_pattern={"nowhere": 1e-3}), network, family)
    cfg = tiny_config(tmp_path, train__text_encoder_lr=[1e-4, 2e-5])
    with pytest.raises(ConfigError, match=r"train\.text_encoder_lr: two values are for SDXL's two encoders"):
        param_groups(cfg, network, family)


def test_sdxl_text_encoders_take_one_lr_each(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, model__path="builtin:tiny-sdxl", network__train_text_encoder=True,
                      train__text_encoder_lr=[1e-4, 2e-5])  # fmt: skip
    network, family = network_for(cfg)
    lrs = {g.name: g.lr for g in param_groups(cfg, network, family)}
    assert lrs == {"unet": 1e-3, "text_encoder": 1e-4, "text_encoder_2": 2e-5}
    one = tiny_config(tmp_path, model__path="builtin:tiny-sdxl", network__train_text_encoder=True,
                      train__text_encoder_lr=3e-5)  # fmt: skip
    assert {g.name: g.lr for g in param_groups(one, network, family)}["text_encoder_2"] == 3e-5  # one value: both


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_groups_keep_their_ratio_through_the_schedule(tmp_path: Path, optimizer: str) -> None:
    if optimizer == "prodigy":
        pytest.importorskip("prodigyopt")
    # Prodigy estimates one step size for all groups: it takes one lr, or 0 (a frozen group)
    lr, pattern_lr = (1e-3, 2.5e-4) if optimizer == "adamw" else (1.0, 0.0)
    cfg = tiny_config(tmp_path, train__optimizer=optimizer, train__lr=lr, train__scheduler="cosine",
                      train__warmup_steps=2, train__lr_pattern={"down_blocks": pattern_lr})  # fmt: skip
    network, family = network_for(cfg)
    optimizer_, scheduler = build_optimizer(cfg, network, 10, family)
    for p in network.parameters():
        p.grad = torch.ones_like(p)
    for n in range(1, 7):
        optimizer_.step()
        scheduler.step()
        # diffusers' cosine with warm-up (its published formula), applied to each group's own lr
        factor = n / 2 if n < 2 else 0.5 * (1 + math.cos(math.pi * (n - 2) / 8))
        assert scheduler.get_last_lr() == pytest.approx([lr * factor, pattern_lr * factor])
    assert [g["name"] for g in optimizer_.param_groups] == ["unet", "lr_pattern down_blocks"]
    if optimizer == "prodigy":
        with pytest.raises(ConfigError, match=r"train\.lr_pattern\['down_blocks'\]: prodigy takes one lr"):
            bad = {"down_blocks": 0.5}
            param_groups(tiny_config(tmp_path, train__optimizer="prodigy", train__lr=1.0, train__lr_pattern=bad),
                         network, family)  # fmt: skip


def test_the_plan_lists_the_groups_with_lr_and_size(tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState

    from loha_train.training.recipe import train

    AcceleratorState._reset_state(True)
    cfg = config_from_dict(tiny_raw(tmp_path, train__lr_pattern={"mid_block": 5e-4}))
    lines: list[str] = []
    train(cfg, dry_run=True, echo=lines.append)
    network, family = network_for(cfg)
    sizes = {g.name: sum(p.numel() for p in g.params) for g in param_groups(cfg, network, family)}
    text = "\n".join(lines)
    assert f"lr group    unet: lr 0.001, {sizes['unet']:,} parameters" in text, text
    assert f"lr group    lr_pattern mid_block: lr 0.0005, {sizes['lr_pattern mid_block']:,} parameters" in text, text


# ------------------------------------------------------------------------------------------------ max-norm
def _loha_delta(module: Any) -> torch.Tensor:
    """The LoHa delta from its factors by the published formula: (w1a w1b) * (w2a w2b) * alpha / rank; with CP
    factors each term is t contracted with w_a (out) and w_b (in)."""
    s = float(module.alpha) / module.rank
    if hasattr(module, "hada_t1"):

        def term(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.einsum("ijkl,jr,ip->prkl", t, b, a)

        return term(module.hada_t1, module.hada_w1_a, module.hada_w1_b) * term(
            module.hada_t2, module.hada_w2_a, module.hada_w2_b) * s  # fmt: skip
    return (module.hada_w1_a @ module.hada_w1_b) * (module.hada_w2_a @ module.hada_w2_b) * s


def test_max_norm_scales_modules_over_the_limit_onto_it_as_kohya() -> None:
    torch.manual_seed(0)
    modules = {
        "big": LoHaLinear(nn.Linear(16, 12), rank=4, alpha=4.0),
        "cp": LoHaConv2d(nn.Conv2d(6, 8, 3), rank=3, alpha=3.0, use_cp=True),
        "mid": LoHaLinear(nn.Linear(16, 12), rank=4, alpha=4.0),  # between max/2 and max: kept
        "small": LoHaLinear(nn.Linear(16, 12), rank=4, alpha=4.0),  # below max/2: kept
    }
    with torch.no_grad():
        for name, scale in (("big", 1.0), ("cp", 1.0), ("mid", 0.0), ("small", 0.0)):
            for p in modules[name].parameters(recurse=False):
                p.normal_(0, scale or 0.3)
        for name, target in (("mid", 0.8), ("small", 0.1)):
            modules[name].hada_w1_a.mul_(target / float(_loha_delta(modules[name]).norm()))
    network = LoHaNetwork(modules=modules, qualnames={k: k for k in modules}, components={k: "unet" for k in modules})
    before = {k: _loha_delta(m).norm().item() for k, m in modules.items()}
    assert before["big"] > 1 and before["cp"] > 1
    scaled, mean, largest = apply_max_norm(network, 1.0)
    after = {k: _loha_delta(m).norm().item() for k, m in modules.items()}
    assert scaled == 2
    assert after["big"] == pytest.approx(1.0, rel=1e-5) and after["cp"] == pytest.approx(1.0, rel=1e-5)
    assert after["mid"] == pytest.approx(before["mid"], rel=1e-6) and after["small"] == pytest.approx(0.1, rel=1e-6)
    # kohya's figures: the mean and max of every module's norm after scaling
    assert mean == pytest.approx(sum(after.values()) / 4, rel=1e-5) and largest == pytest.approx(1.0, rel=1e-5)
    assert apply_max_norm(network, 1.0)[0] == 0  # on the limit now: nothing more to scale


def test_config_takes_one_or_two_text_encoder_lrs_and_names_mistakes(tmp_path: Path) -> None:
    assert tiny_config(tmp_path, train__text_encoder_lr=2e-5).train.text_encoder_lrs == (2e-5, 2e-5)
    assert tiny_config(tmp_path, train__text_encoder_lr=[2e-5, 1e-5]).train.text_encoder_lrs == (2e-5, 1e-5)
    assert tiny_config(tmp_path).train.text_encoder_lrs == (1e-3, 1e-3)
    with pytest.raises(ConfigError, match=r"train\.text_encoder_lr: must be a number or a list of numbers or null"):
        tiny_config(tmp_path, train__text_encoder_lr="fast")

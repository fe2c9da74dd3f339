"""Injection: presets, patterns, per-module rank/alpha, kohya names, zero-init outputs, clear errors."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_tiny_text_encoder, make_tiny_unet
from torch import nn

from loha_train.config import NetworkConfig
from loha_train.fileformat.keys import sd_components
from loha_train.loha.inject import InjectError, inject_loha, remove_loha
from loha_train.loha.layers import LoHaModule

TE_SUFFIXES = (
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
    "mlp_fc1",
    "mlp_fc2",
)


def _unet_out(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    return unet(x, torch.tensor([3, 700]), encoder_hidden_states=ctx).sample


def _te_out(te):
    ids = torch.tensor([[0, 5, 9, 33, 2] + [1] * 72])
    return te(ids).last_hidden_state


def _inject(cfg: NetworkConfig, te: bool = True):
    unet, text_encoder = make_tiny_unet(), make_tiny_text_encoder()
    comps = sd_components(unet, [text_encoder] if te else [])
    return unet, text_encoder, inject_loha(comps, cfg, seed=0)


@pytest.mark.parametrize("preset", ["attn-only", "attn-mlp", "full-lin", "full"])
def test_zero_init_outputs_are_bit_identical(preset):
    ref_unet, ref_te = _unet_out(make_tiny_unet()), _te_out(make_tiny_text_encoder())
    unet, te, network = _inject(NetworkConfig(preset=preset, rank=4, alpha=3, conv_rank=2))
    assert network.modules
    assert torch.equal(_unet_out(unet), ref_unet)
    assert torch.equal(_te_out(te), ref_te)


def _paths(network, component="unet"):
    return {q.split(".", 1)[1] for k, q in network.qualnames.items() if network.components[k] == component}


def test_presets_choose_the_documented_modules():
    _, _, attn = _inject(NetworkConfig(preset="attn-only"))
    assert _paths(attn) and all(re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", p) for p in _paths(attn))
    assert all(re.search(r"self_attn\.(q|k|v|out)_proj$", p) for p in _paths(attn, "text_encoder"))

    _, _, mlp = _inject(NetworkConfig(preset="attn-mlp"))
    mlp_re = r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$"
    assert all(re.search(mlp_re, p) for p in _paths(mlp))
    for suffix in ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "attn2.to_v"):
        assert any(p.endswith(suffix) for p in _paths(mlp)), suffix
    assert {p.rsplit(".", 1)[-1] for p in _paths(mlp, "text_encoder")} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    }

    _, _, full = _inject(NetworkConfig(preset="full"))
    unet = make_tiny_unet()
    every = {n for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    assert _paths(full) == every  # SD 1.x has nothing unmappable: full is everything
    _, _, lin = _inject(NetworkConfig(preset="full-lin"))
    convs = {n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)}
    assert _paths(lin) == every - convs


def test_rank_alpha_conv_and_pattern_overrides():
    cfg = NetworkConfig(
        preset="full",
        rank=4,
        alpha=2.0,
        conv_rank=2,
        conv_alpha=1.0,
        rank_pattern={r"attn2\.to_k": 6, r"mid_block": 3},
        alpha_pattern={r"attn2\.to_k": 5.0},
        exclude=(r"conv_out",),
    )
    _, _, net = _inject(cfg, te=False)
    by_path = {q.split(".", 1)[1]: net.modules[k] for k, q in net.qualnames.items()}
    assert "conv_out" not in by_path
    q = by_path["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert (q.rank, float(q.alpha)) == (6, 5.0)
    assert (
        by_path["down_blocks.0.resnets.0.conv1"].rank,
        float(by_path["down_blocks.0.resnets.0.conv1"].alpha),
    ) == (2, 1.0)
    assert by_path["down_blocks.0.attentions.0.proj_in"].rank == 4  # 1x1 convs take `rank`
    assert by_path["mid_block.resnets.0.conv1"].rank == 3  # first matching pattern beats conv_rank
    assert by_path["down_blocks.0.resnets.0.conv1"].use_cp


def test_targets_add_modules_and_patterns_match_kohya_names_too():
    _, _, net = _inject(NetworkConfig(preset="none", targets=(r"attn1\.to_q$", r"lora_unet_conv_in")), te=False)
    assert _paths(net) == {
        "conv_in",
        *(p for p, _ in make_tiny_unet().named_modules() if p.endswith("attn1.to_q")),
    }


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        (NetworkConfig(targets=("to_qq",)), "network.targets"),
        (NetworkConfig(exclude=("nothing_here",)), "network.exclude"),
        (NetworkConfig(rank_pattern={"resnets": 2}), "network.rank_pattern"),  # attn-mlp has no resnets
        (NetworkConfig(alpha_pattern={"zzz": 2.0}), "network.alpha_pattern"),
        (NetworkConfig(preset="none"), "network.preset"),
    ],
)
def test_patterns_that_match_nothing_are_errors(cfg, key):
    with pytest.raises(InjectError, match=re.escape(key)):
        _inject(cfg)


def test_injecting_twice_is_refused():
    unet, te, _ = _inject(NetworkConfig())
    with pytest.raises(InjectError, match="already"):
        inject_loha(sd_components(unet, [te]), NetworkConfig())


def _consumer_key_map(unet: nn.Module, te: nn.Module) -> dict[str, nn.Module]:
    """The names WebUI/ComfyUI accept for SD 1.x, derived from a fresh module tree and the consumers' rules.

    UNet: `lora_unet_` + the diffusers module path with dots as underscores. Text encoder: only
    `lora_te_text_model_encoder_layers_N_<six suffixes>`, whatever transformers calls the modules today.
    """
    keys = {
        "lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
    }
    layers = te.get_submodule("encoder.layers") if not hasattr(te, "text_model") else te.text_model.encoder.layers
    for i, layer in enumerate(layers):
        for suffix in TE_SUFFIXES:
            attr_path = suffix.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            keys[f"lora_te_text_model_encoder_layers_{i}_{suffix}"] = layer.get_submodule(attr_path)
    return keys


def test_every_kohya_name_resolves_to_the_module_it_wraps_in_a_fresh_model():
    _, _, net = _inject(NetworkConfig(preset="full", train_text_encoder=True))
    fresh = _consumer_key_map(make_tiny_unet(), make_tiny_text_encoder())
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in net.modules)
    for key, module in net.modules.items():
        assert key in fresh, f"{key} is not a name WebUI/ComfyUI map"
        assert fresh[key].weight.shape == module.base.weight.shape
        assert type(fresh[key]) is type(module.base)


def test_report_and_state_dict_layout():
    _, _, net = _inject(NetworkConfig(preset="attn-only", rank=2, train_text_encoder=True))
    report = net.report()
    assert set(report) == {"unet", "text_encoder"}
    assert sum(r["params"] for r in report.values()) == sum(p.numel() for p in net.parameters())
    assert report["text_encoder"]["modules"] == 2 * 4
    state = net.state_dict()
    assert all(k.split(".")[0] in net.modules for k in state)
    assert {k.rsplit(".", 1)[1] for k in state} == {
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "alpha",
    }


def test_load_state_dict_lists_mismatches_and_remove_restores_modules():
    unet, te, net = _inject(NetworkConfig(preset="attn-only"))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    bad = dict(state)
    dropped = next(iter(bad))
    del bad[dropped]
    bad["lora_unet_nonexistent.hada_w1_a"] = torch.zeros(1)
    with pytest.raises(InjectError, match="1 missing") as err:
        net.load_state_dict(bad)
    assert dropped in str(err.value) and "lora_unet_nonexistent" in str(err.value)
    with torch.no_grad():
        state = {k: v + 1 for k, v in state.items()}
    net.load_state_dict(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    remove_loha(sd_components(unet, [te]))
    assert not any(isinstance(m, LoHaModule) for m in unet.modules())


def test_inject_explicit_wraps_exactly_the_named_modules():
    from loha_train.loha.inject import ExplicitTarget, inject_explicit

    unet, te = make_tiny_unet(), make_tiny_text_encoder()
    targets = [
        ExplicitTarget("lora_unet_down_blocks_0_resnets_0_conv1", rank=3, alpha=1.5, use_cp=True),
        ExplicitTarget("lora_unet_up_blocks_1_resnets_0_conv2", rank=2, alpha=4.0, use_cp=False),
        ExplicitTarget("lora_te_text_model_encoder_layers_1_mlp_fc2", rank=5, alpha=2.0),
    ]
    net = inject_explicit(sd_components(unet, [te]), targets, seed=0)
    assert list(net.modules) == [t.key for t in targets]
    for t in targets:
        m = net.modules[t.key]
        assert (m.rank, float(m.alpha), m.use_cp) == (t.rank, t.alpha, t.use_cp)
    assert net.components["lora_te_text_model_encoder_layers_1_mlp_fc2"] == "text_encoder"
    assert sum(isinstance(m, LoHaModule) for m in unet.modules()) == 2
    assert not any(p.requires_grad for p in unet.parameters() if not any(p is q for q in net.parameters()))

    with pytest.raises(InjectError, match="lora_unet_nope"):
        inject_explicit(sd_components(make_tiny_unet(), []), [ExplicitTarget("lora_unet_nope", 2, 1.0)])
    with pytest.raises(InjectError, match="more than once"):
        inject_explicit(sd_components(make_tiny_unet(), []), [targets[0], targets[0]])

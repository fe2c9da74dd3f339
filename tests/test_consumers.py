"""WebUI's and ComfyUI's key rules (re-implemented from their sources) against real SD layouts and our files."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TE_SUFFIXES, expected_sdxl_keys, make_tiny_text_encoder
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loha_train.config import NetworkConfig
from loha_train.fileformat.adapter_io import load_adapter, save_adapter
from loha_train.fileformat.consumers import (
    ConsumerModel,
    check_comfyui,
    check_webui,
    comfy_unet_config,
    comfy_unet_to_diffusers,
    disagreements,
    webui_compvis_name,
)
from loha_train.fileformat.keys import sd_components
from loha_train.fileformat.spec import network_config_from_file
from loha_train.loha.inject import inject_loha
from loha_train.models import layout
from loha_train.models.builtin import TINY_SD_UNET
from loha_train.models.reference_configs import REFERENCE

# A small UNet with SD 1.x's exact block layout (4 levels, 2 ResNets per level, attention in the first three),
# the layout WebUI's name conversion hard-codes; builds in well under a second.
SD1_LAYOUT_UNET = {
    **TINY_SD_UNET,
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}


def _ldm(family: str, unet: nn.Module, encoders: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The single-file state dict both consumers read, by our converter (independent of the key rules)."""
    out = {layout.UNET_PREFIX + k: v for k, v in layout.unet_to_ldm(unet.state_dict(), unet.config).items()}
    for prefix, encoder in zip(layout.TEXT_PREFIXES[family], encoders, strict=True):
        if prefix.endswith(".model."):
            converted = layout.open_clip_to_ldm(encoder.state_dict())
        else:
            converted = layout.clip_to_ldm(encoder.state_dict(), encoder.config.max_position_embeddings)
        out |= {prefix + k: v for k, v in converted.items()}
    return out


def _meta_sd(family: str) -> tuple[nn.Module, list[nn.Module], ConsumerModel]:
    """A real-size SD 1.5 / 2.1 / XL UNet and text encoders on the meta device: real names and shapes, no memory."""
    ref = REFERENCE[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ref["unet"])
        encoders = [CLIPTextModel(CLIPTextConfig(**ref["text_encoder"]))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**ref["text_encoder_2"])))
    weights = {k: tuple(v.shape) for k, v in _ldm(family, unet, encoders).items()}
    return unet, encoders, ConsumerModel(family, weights, dict(unet.config))


def _deltas(network) -> dict[str, tuple[int, ...]]:
    """Each module's delta shape as the file states it: (out, in * kh * kw) unless CP."""
    out = {}
    for key, m in network.modules.items():
        shape = tuple(m.base.weight.shape)
        out[key] = shape if m.use_cp or len(shape) == 2 else (shape[0], shape[1] * shape[2] * shape[3])
    return out


def _expected_keys(unet: nn.Module, encoder: nn.Module) -> set[str]:
    """The kohya names of every adaptable module, from the module tree and the consumers' fixed TE names."""
    keys = {"lora_unet_" + n.replace(".", "_") for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    layers = encoder.config.num_hidden_layers
    return keys | {f"lora_te_text_model_encoder_layers_{i}_{s}" for i in range(layers) for s in TE_SUFFIXES}


# ------------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize(
    ("diffusers", "compvis"),
    [  # SD 1.5 module names as WebUI files them (checked against the LDM layout of v1-5-pruned)
        ("lora_unet_conv_in", "diffusion_model_input_blocks_0_0"),
        ("lora_unet_time_embedding_linear_2", "diffusion_model_time_embed_2"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "diffusion_model_input_blocks_1_1_proj_in"),
        ("lora_unet_down_blocks_1_resnets_1_conv2", "diffusion_model_input_blocks_5_0_out_layers_3"),
        ("lora_unet_down_blocks_2_downsamplers_0_conv", "diffusion_model_input_blocks_9_0_op"),
        ("lora_unet_mid_block_resnets_1_time_emb_proj", "diffusion_model_middle_block_2_emb_layers_1"),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", "diffusion_model_output_blocks_2_1_conv"),
        ("lora_unet_up_blocks_3_resnets_2_conv_shortcut", "diffusion_model_output_blocks_11_0_skip_connection"),
        ("lora_te_text_model_encoder_layers_11_mlp_fc2", "transformer_text_model_encoder_layers_11_mlp_fc2"),
    ],
)
def test_webui_name_conversion(diffusers, compvis):
    assert webui_compvis_name(diffusers, is_sd2=False) == compvis


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_comfyui_table_and_our_single_file_converter_agree_on_real_layouts(family):
    unet, _, _ = _meta_sd(family)
    state = unet.state_dict()
    reverse = {id(v): k for k, v in layout.unet_to_ldm(state, unet.config).items()}
    table = comfy_unet_to_diffusers(comfy_unet_config(unet.config))
    checked = 0
    for name, tensor in state.items():
        if name in table:
            assert table[name] == reverse[id(tensor)], name
            checked += 1
    every = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and "add_embedding" not in n]
    assert checked >= len(every)  # every adaptable module's weight is in ComfyUI's table


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_every_key_of_a_full_network_loads_in_webui_and_comfyui(family):
    unet, encoders, model = _meta_sd(family)
    expected = _expected_keys(unet, encoders[0])  # from the module tree, before anything is wrapped
    network = inject_loha(sd_components(unet, encoders), NetworkConfig(preset="full", rank=2, conv_rank=2))
    assert set(network.modules) == expected
    deltas = _deltas(network)
    webui, comfy = check_webui(deltas, model), check_comfyui(deltas, model)
    assert webui.not_applicable is None
    assert webui.unmatched == {} and comfy.unmatched == {}
    assert len(webui.targets) == len(comfy.targets) == len(deltas)
    assert disagreements(webui, comfy) == {}


def test_sdxl_keys_are_original_layout_names_that_both_consumers_load():
    unet, encoders, model = _meta_sd("sdxl")
    expected = expected_sdxl_keys(unet, encoders)
    network = inject_loha(sd_components(unet, encoders), NetworkConfig(preset="full", rank=2, conv_rank=2))
    assert set(network.modules) == expected
    deltas = _deltas(network)
    webui, comfy = check_webui(deltas, model), check_comfyui(deltas, model)
    assert webui.not_applicable is None
    assert webui.unmatched == {} and comfy.unmatched == {}
    assert len(webui.targets) == len(comfy.targets) == len(deltas)
    assert disagreements(webui, comfy) == {}
    upsampler = "lora_unet_output_blocks_2_2_conv"  # diffusers up_blocks.0.upsamplers.0.conv
    assert webui.targets[upsampler][0] == "model.diffusion_model.output_blocks.2.2.conv.weight"
    # Why not diffusers names: WebUI files that upsampler (up_blocks.0 has attention) under output_blocks_2_1_conv
    diffusers_name = {"lora_unet_up_blocks_0_upsamplers_0_conv": deltas[upsampler]}
    assert set(check_webui(diffusers_name, model).unmatched) == set(diffusers_name)
    assert check_comfyui(diffusers_name, model).unmatched == {}


def test_webui_patches_a_fused_openclip_attention_only_with_all_four_projections():
    for exclude, broken in (((), set()), ((r"out_proj",), {"q_proj", "k_proj", "v_proj", "out_proj"})):
        _, encoders, model = _meta_sd("sd2")
        network = inject_loha(sd_components(None, encoders), NetworkConfig(preset="attn-only", exclude=exclude))
        deltas = _deltas(network)
        webui, comfy = check_webui(deltas, model), check_comfyui(deltas, model)
        assert comfy.unmatched == {}
        assert {k.rsplit("_", 2)[-2] + "_proj" for k in webui.unmatched} == broken - {"out_proj"}
        if broken:
            assert all("q/k/v/out_proj" in why for why in webui.unmatched.values())


def test_text_encoder_names_without_text_model_load_nowhere():
    _, _, model = _meta_sd("sd1")
    bad = {"lora_te_encoder_layers_0_self_attn_q_proj": (768, 768)}  # named from a transformers 5 module tree
    assert set(check_webui(bad, model).unmatched) == set(check_comfyui(bad, model).unmatched) == set(bad)


# ----------------------------------------------------------------------------------- our files, real tensors
def test_an_exported_file_patches_exactly_the_weights_it_was_trained_on(tmp_path):
    torch.manual_seed(0)
    unet, te = UNet2DConditionModel(**SD1_LAYOUT_UNET).eval(), make_tiny_text_encoder()
    ldm = _ldm("sd1", unet, [te])  # taken before injection: the base model as the consumers load it
    cfg = NetworkConfig(preset="full", rank=4, alpha=3.0, conv_rank=2, conv_alpha=5.0)
    network = inject_loha(sd_components(unet, [te]), cfg, seed=0)
    path = save_adapter(network, tmp_path / "a.safetensors")
    state, metadata = load_adapter(path)
    spec = network_config_from_file(state, metadata)
    assert set(spec.modules) == _expected_keys(UNet2DConditionModel(**SD1_LAYOUT_UNET), te)
    model = ConsumerModel("sd1", {k: tuple(v.shape) for k, v in ldm.items()}, dict(unet.config))
    deltas = {key: m.delta_shape for key, m in spec.modules.items()}
    checks = check_webui(deltas, model), check_comfyui(deltas, model)
    assert disagreements(*checks) == {}
    for check in checks:
        assert check.not_applicable is None and check.unmatched == {}, check.consumer
        for key, (ldm_key, part) in check.targets.items():
            weight = ldm[ldm_key] if part is None else ldm[ldm_key].chunk(3)[part]
            assert torch.equal(weight, network.modules[key].base.weight), (check.consumer, key)
    assert any(re.search(r"_conv[12]$", k) and m.use_cp for k, m in spec.modules.items())

"""The original (LDM/SGM) single-file layout: key maps from diffusers names to it, and its prefixes."""

# diffusers reads single files but ships no writer, so `*_to_ldm` are ours: they follow the module structure given
# by the config (any block count, layers per block and transformer depth), so SD 1.x, SD 2.x and SDXL share one
# code path. Reading back (`*_from_ldm`) deliberately uses diffusers' own converters, the ones `from_single_file`
# uses, so our writer is always checked against an independent reader rather than against its own inverse.
# Every tensor must map: an unknown key is an error, never silently dropped.

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Text-encoder prefixes per family, in text_encoders order; "model." prefixes hold the OpenCLIP layout.
TEXT_PREFIXES: dict[str, tuple[str, ...]] = {
    "sd1": ("cond_stage_model.transformer.",),
    "sd2": ("cond_stage_model.model.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}
METADATA_CONFIGS = "loha_train.configs"  # JSON of the component configs, so our own files reload exactly
METADATA_FAMILY = "loha_train.family"
METADATA_PREDICTION = "loha_train.prediction_type"

Tensors = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A state dict that does not fit the layout being converted."""


_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK_RE = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_RE = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _resnet(rest: str) -> str:
    module, _, param = rest.partition(".")
    if module not in _RESNET:
        raise ConversionError(f"unexpected ResNet parameter {rest!r}")
    return f"{_RESNET[module]}.{param}"


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    """Diffusers UNet2DConditionModel state dict -> LDM `model.diffusion_model.*` keys (prefix not included)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ConversionError(f"layers_per_block must be one int for the LDM layout, got {per_block!r}")
    up_has_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out: Tensors = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            out[f"{_UNET_TOP[module]}.{param}"] = tensor
        elif m := _BLOCK_RE.fullmatch(key):
            kind, block, part, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if kind == "down_blocks":
                first = 1 + block * (per_block + 1)
                if part == "resnets":
                    out[f"input_blocks.{first + index}.0.{_resnet(rest)}"] = tensor
                elif part == "attentions":
                    out[f"input_blocks.{first + index}.1.{rest}"] = tensor
                else:  # downsamplers.0.conv.*
                    out[f"input_blocks.{first + per_block}.0.op.{rest.removeprefix('conv.')}"] = tensor
            else:
                first = block * (per_block + 1)
                if part == "resnets":
                    out[f"output_blocks.{first + index}.0.{_resnet(rest)}"] = tensor
                elif part == "attentions":
                    out[f"output_blocks.{first + index}.1.{rest}"] = tensor
                else:  # upsamplers.0.conv.*: after the last layer's resnet (and attention, if any)
                    slot = 2 if up_has_attn[block] else 1
                    out[f"output_blocks.{first + per_block}.{slot}.{rest}"] = tensor
        elif m := _MID_RE.fullmatch(key):
            if m[1] == "resnets":
                out[f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"] = tensor
            else:
                out[f"middle_block.{2 * int(m[2]) + 1}.{m[3]}"] = tensor
        else:
            raise ConversionError(f"UNet key {key!r} has no place in the LDM layout")
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RE = re.compile(
    r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_VAE_MID_RE = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    """Diffusers AutoencoderKL state dict -> LDM `first_stage_model.*` keys (prefix not included).

    The mid-block attention's linear weights (C, C) become the original 1x1 convs (C, C, 1, 1).
    """
    n_up = len(config["up_block_types"])
    out: Tensors = {}
    for key, tensor in state_dict.items():
        if m := _VAE_RE.fullmatch(key):
            coder, kind, block, part, index, rest = m[1], m[2], int(m[3]), m[4], m[5], m[6]
            level = block if kind == "down_blocks" else n_up - 1 - block
            base = f"{coder}.{'down' if kind == 'down_blocks' else 'up'}.{level}"
            if part == "resnets":
                out[f"{base}.block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"] = tensor
            else:
                out[f"{base}.{'downsample' if part == 'downsamplers' else 'upsample'}.{rest}"] = tensor
        elif m := _VAE_MID_RE.fullmatch(key):
            coder, part, index, rest = m[1], m[2], int(m[3]), m[4]
            if part == "resnets":
                out[f"{coder}.mid.block_{index + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"] = tensor
                continue
            module, _, param = rest.rpartition(".")
            if module not in _VAE_ATTN:
                raise ConversionError(f"VAE key {key!r} has no place in the LDM layout")
            if module != "group_norm" and param == "weight":
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            out[f"{coder}.mid.attn_1.{_VAE_ATTN[module]}.{param}"] = tensor
        elif key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            out[key.replace("conv_norm_out", "norm_out")] = tensor
        else:
            raise ConversionError(f"VAE key {key!r} has no place in the LDM layout")
    return out


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], max_positions: int) -> Tensors:
    """transformers CLIPTextModel state dict -> the `transformer.text_model.*` layout (prefix not included).

    transformers 5 dropped the `text_model.` level from CLIPTextModel; the files keep it. position_ids is
    written because the public SD 1.x files carry it and some readers look for it.
    """
    out: Tensors = {}
    for key, tensor in state_dict.items():
        if key.startswith("text_projection."):
            raise ConversionError("the SD 1.x / SDXL first text encoder has no projection in the LDM layout")
        out["text_model." + key.removeprefix("text_model.")] = tensor
    out["text_model.embeddings.position_ids"] = torch.arange(max_positions, dtype=torch.int64)[None]
    return out


_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """transformers CLIP text state dict -> OpenCLIP `model.*` layout (prefix not included).

    q/k/v projections are stacked into `attn.in_proj_*`; `text_projection` is stored transposed (x @ P).
    """
    out: Tensors = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for full_key, tensor in state_dict.items():
        key = full_key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = tensor
        elif m := _LAYER_RE.fullmatch(key):
            layer, module, param = m[1], m[2], m[3]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, param), {})[module[-6]] = tensor
            elif module in _OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
            else:
                raise ConversionError(f"text-encoder key {full_key!r} has no place in the OpenCLIP layout")
        else:
            raise ConversionError(f"text-encoder key {full_key!r} has no place in the OpenCLIP layout")
    for (layer, param), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ConversionError(f"layer {layer} lacks one of q/k/v_proj.{param}")
        stacked = torch.cat([parts["q"], parts["k"], parts["v"]])
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = stacked
    return out

"""How AUTOMATIC1111 WebUI and ComfyUI map adapter keys onto a base model, re-implemented to verify our files.

Both read the base model in its single-file (LDM/SGM) layout. A key resolves to a `Target`: the single-file weight
it patches, plus which third of a fused q/k/v `in_proj_weight` (OpenCLIP text encoders) when it patches a slice.
The rules follow, independently of each other and of our export code:
- WebUI: `extensions-builtin/Lora/networks.py` (`convert_diffusers_name_to_compvis`, `load_network`,
  `assign_network_names_to_compvis_modules`, `network_apply_weights`), `network.py`, `network_hada.py`.
- ComfyUI: `comfy/lora.py` (`model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`), `comfy/utils.py`
  (`unet_to_diffusers`, `transformers_convert`), `comfy/supported_models.py` (text-encoder prefixes).
Keys neither resolves are dropped silently by WebUI and with a log line by ComfyUI, so we count them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Target = tuple[str, int | None]  # (single-file weight key, 0/1/2 for the q/k/v third of an in_proj_weight)
UNET = "model.diffusion_model."
_TE_PREFIXES = {  # single-file text-encoder prefix -> (WebUI module-name prefix, ComfyUI clip name, OpenCLIP layout)
    "sd1": {"cond_stage_model.transformer.": ("transformer_", "clip_l", False)},
    "sd2": {"cond_stage_model.model.": ("model_", "clip_h", True)},
    "sdxl": {
        "conditioner.embedders.0.transformer.": ("0_transformer_", "clip_l", False),
        "conditioner.embedders.1.model.": ("1_model_", "clip_g", True),
    },
}


@dataclass(frozen=True)
class ConsumerModel:
    """A base model as both consumers see it: single-file weight key -> shape, plus its diffusers UNet config."""

    family: str  # sd1, sd2, sdxl
    weights: Mapping[str, tuple[int, ...]]
    unet_config: Mapping[str, Any]

    def weight_shape(self, target: Target) -> tuple[int, ...]:
        shape = tuple(self.weights[target[0]])
        return shape if target[1] is None else (shape[0] // 3, *shape[1:])


def delta_fits(delta_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """Both consumers reshape the LoHa product to the weight: equal shapes, or a conv's (out, in * kh * kw)."""
    return tuple(delta_shape) == tuple(weight_shape) or (
        len(delta_shape) == 2 and tuple(delta_shape) == (weight_shape[0], math.prod(weight_shape[1:]))
    )


# ----------------------------------------------------------------------------------------------------- WebUI
_WEBUI_SUFFIXES = {
    "attentions": {},
    "resnets": {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    },
}
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _groups(pattern: str, key: str) -> list[Any] | None:
    m = re.match(pattern, key)  # re.match, as WebUI: anchored at the start only
    return None if m is None else [int(g) if re.fullmatch(r"\d+", g) else g for g in m.groups()]


def _open_clip_name(layer: int, rest: str) -> str:
    if "mlp_fc1" in rest:
        return f"{layer}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
    if "mlp_fc2" in rest:
        return f"{layer}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
    return f"{layer}_{rest.replace('self_attn', 'attn')}"


def webui_compvis_name(key: str, is_sd2: bool) -> str:
    """WebUI's `convert_diffusers_name_to_compvis`: a kohya key stem -> its module name (unchanged if no rule)."""
    if g := _groups(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{g[0]}"
    if g := _groups(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{g[0]}"
    if g := _groups(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{g[0] * 2 - 2}{g[1]}"
    if g := _groups(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _WEBUI_SUFFIXES.get(g[1], {}).get(g[3], g[3])
        return f"diffusion_model_input_blocks_{1 + g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if g := _groups(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _WEBUI_SUFFIXES.get(g[0], {}).get(g[2], g[2])
        return f"diffusion_model_middle_block_{1 if g[0] == 'attentions' else g[1] * 2}_{suffix}"
    if g := _groups(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        suffix = _WEBUI_SUFFIXES.get(g[1], {}).get(g[3], g[3])
        return f"diffusion_model_output_blocks_{g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if g := _groups(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + g[0] * 3}_0_op"
    if g := _groups(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"
    if g := _groups(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            return f"model_transformer_resblocks_{_open_clip_name(g[0], g[1])}"
        return f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}"
    if g := _groups(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"1_model_transformer_resblocks_{_open_clip_name(g[0], g[1])}"
    return key


def webui_layer_names(model: ConsumerModel) -> dict[str, Target]:
    """WebUI's `network_layer_mapping` for modules with weights: module name (dots as `_`) -> weight target.

    UNet names come from `sd_model.model` (diffusion_model...), text encoders from each embedder's `wrapped`
    module (SD 1.x `transformer...`, SD 2.x `model...`, SDXL `0_transformer...` / `1_model...`). An OpenCLIP
    attention is one nn.MultiheadAttention whose name stands for its fused in_proj_weight.
    """
    names: dict[str, Target] = {}
    owners = [(UNET, "diffusion_model_")] + [(p, v[0]) for p, v in _TE_PREFIXES[model.family].items()]
    for key in model.weights:
        for prefix, owner in owners:
            if key.startswith(prefix):
                module, _, param = key[len(prefix) :].rpartition(".")
                if param in ("weight", "in_proj_weight"):
                    names[owner + module.replace(".", "_")] = (key, None)
    return names


def webui_resolve(stem: str, names: Mapping[str, Target], is_sd2: bool) -> tuple[str, Target | None]:
    """The lookup chain of WebUI's `load_network`: (the name it files the module under, target or None)."""
    key = webui_compvis_name(stem, is_sd2)
    target = names.get(key)
    if target is None and (m := _X_PROJ.match(key)):  # a q/k/v part of a fused MultiheadAttention
        fused = names.get(m.group(1))
        if fused is not None and fused[0].endswith(".in_proj_weight"):
            target = (fused[0], "qkv".index(m.group(2)[0]))
    if target is None and "lora_unet" in stem:  # SGM-layout keys (SDXL): lora_unet_ + the module path
        key = stem.replace("lora_unet", "diffusion_model")
        target = names.get(key)
    elif target is None and "lora_te1_text_model" in stem:
        key = stem.replace("lora_te1_text_model", "0_transformer_text_model")
        target = names.get(key)
        if target is None:
            key = stem.replace("lora_te1_text_model", "transformer_text_model")
            target = names.get(key)
    return key, target


def webui_not_applicable(model: ConsumerModel) -> str | None:
    """Why WebUI cannot load this base model at all, or None.

    Its name conversion hard-codes SD's layout: input block `1 + 3 * block + layer` (two ResNets and a
    downsampler per level) and a single-file loader built on the SD 1.x/2.x/SDXL configs.
    """
    layers = model.unet_config.get("layers_per_block")
    if layers != 2:
        return f"WebUI loads only SD-layout UNets (2 ResNet blocks per level); this model has {layers}"
    return None


# --------------------------------------------------------------------------------------------------- ComfyUI
_COMFY_CLIP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
_OPEN_CLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_UNET_MAP_ATTENTIONS = ("proj_in.weight", "proj_out.weight")
_TRANSFORMER_BLOCKS = (
    *(f"{attn}.{p}.weight" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff.net.0.proj.weight",
    "ff.net.2.weight",
)
_UNET_MAP_RESNET = {
    "in_layers.2.weight": "conv1.weight",
    "emb_layers.1.weight": "time_emb_proj.weight",
    "out_layers.3.weight": "conv2.weight",
    "skip_connection.weight": "conv_shortcut.weight",
}
_UNET_MAP_BASIC = {
    "label_emb.0.0.weight": ("class_embedding.linear_1.weight", "add_embedding.linear_1.weight"),
    "label_emb.0.2.weight": ("class_embedding.linear_2.weight", "add_embedding.linear_2.weight"),
    "input_blocks.0.0.weight": ("conv_in.weight",),
    "out.2.weight": ("conv_out.weight",),
    "time_embed.0.weight": ("time_embedding.linear_1.weight",),
    "time_embed.2.weight": ("time_embedding.linear_2.weight",),
}


def comfy_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ComfyUI's detected `unet_config` that `unet_to_diffusers` reads, from a diffusers config.

    `transformer_depth_output` is stored in the order ComfyUI pops it from (the end first for up_blocks.0).
    """
    levels = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    res_blocks = list(per_block) if isinstance(per_block, list | tuple) else [per_block] * levels
    depth = config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, list | tuple) else [depth] * levels
    up_depth = config.get("reverse_transformer_layers_per_block") or depth[::-1]
    down = [depth[x] if "CrossAttn" in config["down_block_types"][x] else 0 for x in range(levels)]
    up = [up_depth[x] if "CrossAttn" in config["up_block_types"][x] else 0 for x in range(levels)]
    mid_type = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    popped_order = [up[x] for x in range(levels) for _ in range(res_blocks[::-1][x] + 1)]
    return {
        "num_res_blocks": res_blocks,
        "channel_mult": [1] * levels,  # only its length matters here
        "transformer_depth": [down[x] for x in range(levels) for _ in range(res_blocks[x])],
        "transformer_depth_output": popped_order[::-1],
        "transformer_depth_middle": depth[-1] if "CrossAttn" in mid_type else -1,
    }


def comfy_unet_to_diffusers(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """ComfyUI's `unet_to_diffusers` for weights: diffusers UNet weight name -> LDM name (no prefix)."""
    res_blocks = list(unet_config["num_res_blocks"])
    depth = list(unet_config["transformer_depth"])
    depth_out = list(unet_config["transformer_depth_output"])
    levels = len(unet_config["channel_mult"])
    table: dict[str, str] = {}
    for x in range(levels):
        n = 1 + (res_blocks[x] + 1) * x
        for i in range(res_blocks[x]):
            for ldm, diff in _UNET_MAP_RESNET.items():
                table[f"down_blocks.{x}.resnets.{i}.{diff}"] = f"input_blocks.{n}.0.{ldm}"
            transformers = depth.pop(0)
            if transformers > 0:
                for b in _UNET_MAP_ATTENTIONS:
                    table[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(transformers):
                    for b in _TRANSFORMER_BLOCKS:
                        table[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
                        )
            n += 1
        table[f"down_blocks.{x}.downsamplers.0.conv.weight"] = f"input_blocks.{n}.0.op.weight"
    for b in _UNET_MAP_ATTENTIONS:
        table[f"mid_block.attentions.0.{b}"] = f"middle_block.1.{b}"
    for t in range(unet_config["transformer_depth_middle"]):
        for b in _TRANSFORMER_BLOCKS:
            table[f"mid_block.attentions.0.transformer_blocks.{t}.{b}"] = f"middle_block.1.transformer_blocks.{t}.{b}"
    for i, n in enumerate((0, 2)):
        for ldm, diff in _UNET_MAP_RESNET.items():
            table[f"mid_block.resnets.{i}.{diff}"] = f"middle_block.{n}.{ldm}"
    res_blocks = res_blocks[::-1]
    for x in range(levels):
        n = (res_blocks[x] + 1) * x
        count = res_blocks[x] + 1
        for i in range(count):
            slot = 1
            for ldm, diff in _UNET_MAP_RESNET.items():
                table[f"up_blocks.{x}.resnets.{i}.{diff}"] = f"output_blocks.{n}.0.{ldm}"
            transformers = depth_out.pop()
            if transformers > 0:
                slot += 1
                for b in _UNET_MAP_ATTENTIONS:
                    table[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(transformers):
                    for b in _TRANSFORMER_BLOCKS:
                        table[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = (
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
                        )
            if i == count - 1:
                table[f"up_blocks.{x}.upsamplers.0.conv.weight"] = f"output_blocks.{n}.{slot}.conv.weight"
            n += 1
    for ldm, diffusers_names in _UNET_MAP_BASIC.items():
        for diff in diffusers_names:
            table[diff] = ldm
    return table


def comfy_weights(model: ConsumerModel) -> dict[str, Target]:
    """ComfyUI's model state-dict keys (weights) -> single-file target, after its text-encoder conversions.

    UNet: `diffusion_model.*`. Text encoders: `clip_l.transformer.text_model.*`; OpenCLIP ones (`clip_h`, `clip_g`)
    are converted to the transformers layout, splitting each fused in_proj_weight into q/k/v.
    """
    out: dict[str, Target] = {}
    te_prefixes = _TE_PREFIXES[model.family]
    for key in model.weights:
        if key.startswith(UNET):
            out[key.removeprefix("model.")] = (key, None)
            continue
        for prefix, (_, clip, open_clip) in te_prefixes.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if not open_clip:
                out[f"{clip}.transformer.{rest}"] = (key, None)
            elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.weight", rest):
                layer = f"{clip}.transformer.text_model.encoder.layers.{m[1]}"
                if m[2] in _OPEN_CLIP_LAYER:
                    out[f"{layer}.{_OPEN_CLIP_LAYER[m[2]]}.weight"] = (key, None)
            elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", rest):
                for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{clip}.transformer.text_model.encoder.layers.{m[1]}.self_attn.{proj}.weight"] = (key, part)
    return out


def comfy_key_map(model: ConsumerModel, weights: Mapping[str, Target]) -> dict[str, str]:
    """`model_lora_keys_unet` + `model_lora_keys_clip`: kohya key stem -> ComfyUI weight key (lora_* keys only)."""
    key_map: dict[str, str] = {}
    for key in weights:
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            key_map["lora_unet_" + key[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = key
    for diff, ldm in comfy_unet_to_diffusers(comfy_unet_config(model.unet_config)).items():
        key_map["lora_unet_" + diff.removesuffix(".weight").replace(".", "_")] = f"diffusion_model.{ldm}"
    clip_l_present = False
    for b in range(32):
        for module, lora_name in _COMFY_CLIP.items():
            for clip in ("clip_h", "clip_l", "clip_g"):
                k = f"{clip}.transformer.text_model.encoder.layers.{b}.{module}.weight"
                if k not in weights:
                    continue
                if clip in ("clip_h", "clip_l"):
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_name}"] = k
                    key_map[f"lora_te1_text_model_encoder_layers_{b}_{lora_name}"] = k
                    clip_l_present = clip_l_present or clip == "clip_l"
                elif clip_l_present:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{lora_name}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_name}"] = k
    return key_map


# ---------------------------------------------------------------------------------------------- the check
@dataclass
class ConsumerCheck:
    """How one consumer maps a file's keys onto one base model."""

    consumer: str
    targets: dict[str, Target] = field(default_factory=dict)  # key stem -> the weight it patches
    unmatched: dict[str, str] = field(default_factory=dict)  # key stem -> why it is not loaded
    not_applicable: str | None = None  # why this consumer cannot load the base model at all

    @property
    def ok(self) -> bool:
        return self.not_applicable is not None or not self.unmatched


def _fit(check: ConsumerCheck, model: ConsumerModel, stem: str, target: Target | None, delta: tuple[int, ...]) -> None:
    if target is None:
        check.unmatched[stem] = "no module of the model has this name"
    elif not delta_fits(delta, model.weight_shape(target)):
        check.unmatched[stem] = f"delta {tuple(delta)} does not fit {target[0]} {model.weight_shape(target)}"
    else:
        check.targets[stem] = target


def check_webui(deltas: Mapping[str, tuple[int, ...]], model: ConsumerModel) -> ConsumerCheck:
    """WebUI's view of each key stem (-> delta shape): what it patches, or why not."""
    check = ConsumerCheck("WebUI", not_applicable=webui_not_applicable(model))
    names = webui_layer_names(model)
    filed: dict[str, str] = {}
    for stem, delta in deltas.items():
        name, target = webui_resolve(stem, names, model.family == "sd2")
        filed[stem] = name
        _fit(check, model, stem, target, delta)
    # network_apply_weights patches a fused attention only when its q, k, v and out_proj modules all exist
    present = set(filed.values())
    for stem, target in list(check.targets.items()):
        if target[1] is not None:
            base = _X_PROJ.match(filed[stem]).group(1)  # type: ignore[union-attr]
            missing = [
                f"{base}_{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") if f"{base}_{p}" not in present
            ]
            if missing:
                del check.targets[stem]
                check.unmatched[stem] = f"fused attention patched only with all of q/k/v/out_proj; missing {missing[0]}"
    return check


def check_comfyui(deltas: Mapping[str, tuple[int, ...]], model: ConsumerModel) -> ConsumerCheck:
    """ComfyUI's view of each key stem (-> delta shape): what it patches, or why not."""
    check = ConsumerCheck("ComfyUI")
    weights = comfy_weights(model)
    key_map = comfy_key_map(model, weights)
    for stem, delta in deltas.items():
        comfy_key = key_map.get(stem)
        _fit(check, model, stem, weights.get(comfy_key) if comfy_key else None, delta)
    return check


def disagreements(*checks: ConsumerCheck) -> dict[str, list[Target]]:
    """Key stems that the applicable consumers resolve to different weights (each would patch another tensor)."""
    used = [c for c in checks if c.not_applicable is None]
    stems = set().union(*(c.targets for c in used)) if used else set()
    out = {}
    for stem in sorted(stems):
        targets = [c.targets[stem] for c in used if stem in c.targets]
        if len(set(targets)) > 1:
            out[stem] = targets
    return out

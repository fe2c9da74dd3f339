"""The adapter file's key names: kohya's `lora_unet_`/`lora_te_` stems for SD 1.x/2.x and SDXL's original layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from loha_train.loha.inject import TEXT_ENCODER, TEXT_ENCODER_2, UNET, Component, InjectError, KeyFn
from loha_train.models import layout


def kohya_unet_name(path: str, prefix: str = "lora_unet") -> str:
    """diffusers UNet module path -> kohya key stem, e.g. lora_unet_down_blocks_0_attentions_0_proj_in."""
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_te_name(path: str, prefix: str = "lora_te") -> str:
    """transformers CLIP text-encoder path -> kohya key stem, always with the text_model level.

    transformers 5 dropped `text_model.` from CLIPTextModel's module names, but WebUI and ComfyUI only match
    `lora_te_text_model_encoder_layers_N_...`, so the level is written here whatever the live tree says.
    """
    path = path.removeprefix("text_model.")
    return f"{prefix}_text_model_{path.replace('.', '_')}"


def sgm_unet_namer(config: Mapping[str, Any]) -> KeyFn:
    """The SDXL UNet's key function: diffusers module path -> prefix + the original (SGM) module path.

    kohya writes SDXL UNet keys in the original layout (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`),
    which WebUI and ComfyUI both map, while WebUI's diffusers-name conversion files SDXL's first upsampler under a
    module that does not exist. The mapping is `layout.unet_to_ldm`'s (the single-file writer's), applied to the
    module's weight key, so adapter keys and single-file weights always agree. `config` is the UNet's config.
    """

    def sgm_name(path: str, prefix: str = "lora_unet") -> str:
        try:
            (ldm_key,) = layout.unet_to_ldm({f"{path}.weight": _NAME_ONLY}, config)
        except layout.ConversionError as e:
            raise InjectError(f"unet.{path}: no original-layout (SGM) name for this module ({e})") from None
        return f"{prefix}_{ldm_key.removesuffix('.weight').replace('.', '_')}"

    return sgm_name


_NAME_ONLY = torch.empty(0)  # unet_to_ldm maps keys; the value is carried along untouched


def sd_components(
    unet: nn.Module | None, text_encoders: Sequence[nn.Module] = (), *, family: str | None = None
) -> list[Component]:
    """Components named as kohya names them: SD 1.x/2.x `lora_unet_` + the diffusers path and `lora_te_`;
    SDXL `lora_unet_` + the original (SGM) path (the diffusers path stays readable) and `lora_te1_`/`lora_te2_`.

    `family` is the base model's (sd1, sd2, sdxl); None infers SDXL from the UNet's text_time added condition or
    from two text encoders, so a caller that forgets it still writes the names the consumers map.
    """
    sdxl = family == "sdxl" if family is not None else _looks_sdxl(unet, text_encoders)
    if text_encoders and len(text_encoders) != (2 if sdxl else 1):
        what = "an SDXL" if sdxl else "an SD 1.x/2.x"
        raise InjectError(f"{len(text_encoders)} text encoder(s) given for {what} model")
    comps = []
    if unet is not None and sdxl:
        comps.append(Component(UNET, unet, "lora_unet", sgm_unet_namer(unet.config), alias_fn=kohya_unet_name))
    elif unet is not None:
        comps.append(Component(UNET, unet, "lora_unet", kohya_unet_name))
    if len(text_encoders) == 1:
        comps.append(Component(TEXT_ENCODER, text_encoders[0], "lora_te", kohya_te_name))
    else:
        names = (TEXT_ENCODER, TEXT_ENCODER_2)
        for i, te in enumerate(text_encoders):
            comps.append(Component(names[i], te, f"lora_te{i + 1}", kohya_te_name))
    return comps


def _looks_sdxl(unet: nn.Module | None, text_encoders: Sequence[nn.Module]) -> bool:
    config = getattr(unet, "config", None) or {}
    return len(text_encoders) == 2 or config.get("addition_embed_type") == "text_time"

"""Single-file checkpoints: write a bundle in the LDM/SGM layout, and build models from such a file."""

# Reading back (`*_from_ldm`) deliberately uses diffusers' own converters, the ones `from_single_file` uses, so our
# writer (layout.py's maps) is always checked against an independent reader rather than against its own inverse.

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from loha_train.models.layout import (
    METADATA_CONFIGS,
    METADATA_FAMILY,
    METADATA_PREDICTION,
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    ConversionError,
    Tensors,
    clip_to_ldm,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

if TYPE_CHECKING:
    from loha_train.models.bundle import ModelBundle


def ldm_state_dict(bundle: ModelBundle) -> Tensors:
    """The whole single-file state dict (UNet, VAE, text encoders) of a bundle, with the LDM/SGM prefixes."""
    if bundle.family not in TEXT_PREFIXES:
        raise ConversionError(f"no single-file layout for family {bundle.family!r}")
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(bundle.unet.state_dict(), bundle.unet.config).items()}
    out |= {VAE_PREFIX + k: v for k, v in vae_to_ldm(bundle.vae.state_dict(), bundle.vae.config).items()}
    prefixes = TEXT_PREFIXES[bundle.family]
    if len(bundle.text_encoders) != len(prefixes):
        raise ConversionError(f"{bundle.family} needs {len(prefixes)} text encoder(s)")
    for prefix, encoder in zip(prefixes, bundle.text_encoders, strict=True):
        if prefix.endswith(".model."):
            converted = open_clip_to_ldm(encoder.state_dict())
        else:
            converted = clip_to_ldm(encoder.state_dict(), encoder.config.max_position_embeddings)
        out |= {prefix + k: v for k, v in converted.items()}
    return out


def _public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def save_single_file(bundle: ModelBundle, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write `bundle` as one LDM-layout .safetensors (what WebUI, ComfyUI and `from_single_file` read).

    Floating tensors are cast to `dtype` when given. The component configs, family and prediction type go into
    the safetensors metadata so that `load_models` reloads our own files exactly (other readers ignore it).
    The file is written to a temporary name and renamed into place.
    """
    path = Path(path)
    tensors = {}
    for key, tensor in ldm_state_dict(bundle).items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.detach().to("cpu").contiguous()
    if bundle.family == "sdxl" and bundle.prediction_type == "v_prediction":
        tensors["v_pred"] = torch.zeros(0)  # ComfyUI's marker for v-prediction SDXL files
    configs = {
        "unet": _public_config(bundle.unet.config),
        "vae": _public_config(bundle.vae.config),
        "scheduler": _public_config(bundle.scheduler_config),
    }
    for i, encoder in enumerate(bundle.text_encoders):
        configs["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder.config.to_diff_dict()
    metadata = {
        "format": "pt",
        METADATA_FAMILY: bundle.family,
        METADATA_PREDICTION: bundle.prediction_type,
        METADATA_CONFIGS: json.dumps(configs, sort_keys=True),
    }
    return save_file_atomic(tensors, path, metadata)


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> Path:
    """safetensors' save_file to a temporary name beside `path`, renamed into place (no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------- reading (diffusers)
def unet_from_ldm(checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    """LDM checkpoint (with prefixes) -> diffusers UNet state dict, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(dict(checkpoint), dict(config))


def vae_from_ldm(checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Tensors:
    """LDM checkpoint, or a standalone LDM VAE file -> diffusers AutoencoderKL state dict."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(dict(checkpoint), dict(config))


def text_from_ldm(checkpoint: Mapping[str, torch.Tensor], prefix: str, model: torch.nn.Module) -> Tensors:
    """The text encoder under `prefix` -> state dict for `model` (CLIPTextModel[WithProjection])."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if prefix.endswith(".model."):
        converted = convert_open_clip_checkpoint(model, dict(checkpoint), prefix=prefix)
    else:
        own = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
        converted = convert_ldm_clip_checkpoint(own, remove_prefix=prefix)
    wrapped = hasattr(model, "text_model")  # CLIPTextModelWithProjection keeps the level, CLIPTextModel not
    out: Tensors = {}
    for key, tensor in converted.items():
        bare = key.removeprefix("text_model.")
        if bare.endswith("position_ids"):
            continue  # a buffer the model builds itself
        out[f"text_model.{bare}" if wrapped and not bare.startswith("text_projection") else bare] = tensor
    return out


def _assign(model: torch.nn.Module, state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """Load `state` into a meta-initialised `model` exactly: every tensor present, in its shape, nothing left over."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} is {tuple(state[k].shape)}, not {tuple(t.shape)}"
        for k, t in expected.items()
        if k in state and state[k].shape != t.shape
    ]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ConversionError(f"the {what} weights do not fit the architecture: {'; '.join(problems[:3])}{more}")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)


def components_from_ldm(
    checkpoint: Mapping[str, torch.Tensor], configs: Mapping[str, Any], family: str, dtype: torch.dtype
) -> tuple[Any, Any | None, list[Any]]:
    """Build (UNet, VAE or None when the file has none, text encoders) of `family` from a single-file state dict.

    `configs` holds the diffusers/transformers config of each component ("unet", "vae", "text_encoder",
    "text_encoder_2"). Models are created on the meta device and take the file's tensors without copies.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
    _assign(unet, unet_from_ldm(checkpoint, unet.config), dtype, "UNet")
    vae = None
    if any(k.startswith(VAE_PREFIX) for k in checkpoint):
        vae = vae_from_file(checkpoint, configs["vae"], dtype)
    encoders = []
    for i, prefix in enumerate(TEXT_PREFIXES[family]):
        if not any(k.startswith(prefix) for k in checkpoint):
            raise ConversionError(f"no {prefix}* keys (text encoder {i + 1} of {family})")
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        with init_empty_weights():
            encoder = cls(CLIPTextConfig.from_dict(configs["text_encoder" if i == 0 else "text_encoder_2"]))
        _assign(encoder, text_from_ldm(checkpoint, prefix, encoder), dtype, f"text encoder {i + 1}")
        encoders.append(encoder)
    return unet, vae, encoders


def vae_from_file(checkpoint: Mapping[str, torch.Tensor], config: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """An AutoencoderKL from a full checkpoint or a standalone VAE file, in LDM or diffusers key layout."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    if any(".down_blocks." in k for k in checkpoint):  # already in the diffusers layout
        state = {k.removeprefix(VAE_PREFIX): v for k, v in checkpoint.items()}
    else:
        state = vae_from_ldm(checkpoint, config)
    if not state:
        raise ConversionError("no VAE weights (encoder.*/decoder.* keys)")
    with init_empty_weights():
        vae = AutoencoderKL.from_config(dict(config))
    _assign(vae, state, dtype, "VAE")
    return vae

"""Detect a base model's kind, family and prediction type from its configs or file header, and hash its weights."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loha_train.models import builtin, hashing, layout
from loha_train.models.bundle import ModelError, ModelInfo

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def resolve_model_path(path: str | Path) -> Path:
    if isinstance(path, str) and builtin.is_builtin(path):
        try:
            return builtin.resolve_builtin(path)
        except builtin.BuiltinError as e:
            raise ModelError(str(e)) from e
    return Path(path).expanduser()


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelError(f"{path.parent}: missing {path.name}; expected {what}") from e
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable JSON ({e}); expected {what}") from e


def _detect_folder(root: Path) -> ModelInfo:
    expected = (
        "a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
    )
    if not (root / "model_index.json").is_file():
        raise ModelError(f"{root}: not a diffusers model folder: no model_index.json; expected {expected}")
    index = read_json(root / "model_index.json", expected)
    unet_entry = index.get("unet")
    if not (isinstance(unet_entry, list) and unet_entry[-1:] == ["UNet2DConditionModel"]):
        found = {k: v for k, v in index.items() if isinstance(v, list) and v[0] is not None}
        raise ModelError(
            f"{root}: unsupported architecture {index.get('_class_name')!r} (components {found}); "
            "loha-train trains SD 1.x, SD 2.x and SDXL models, which have a UNet2DConditionModel unet"
        )
    unet = read_json(root / "unet" / "config.json", "the UNet's config.json")
    if unet.get("in_channels", 4) != 4:
        raise ModelError(
            f"{root}: UNet with {unet['in_channels']} input channels (inpainting or edit model); "
            "expected a text-to-image model with 4 latent input channels"
        )
    if (index.get("text_encoder") or [None])[0] is None:
        raise ModelError(f"{root}: no text_encoder (an SDXL refiner?); expected {expected}")
    if "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        family, why = "sdxl", "model_index.json: text_encoder_2 / unet addition_embed_type=text_time"
    elif unet.get("cross_attention_dim") == 768:
        family, why = "sd1", "unet/config.json: cross_attention_dim=768"
    elif unet.get("cross_attention_dim") == 1024:
        family, why = "sd2", "unet/config.json: cross_attention_dim=1024"
    elif unet.get("use_linear_projection"):  # non-standard sizes: SD 2.x and SDXL use linear proj_in/proj_out
        family, why = "sd2", "unet/config.json: use_linear_projection=true"
    else:
        family, why = "sd1", "unet/config.json: use_linear_projection=false"
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched = read_json(sched_path, "the scheduler's config") if sched_path.is_file() else {}
    prediction, stated = _USUAL_PREDICTION[family], None
    if "prediction_type" in sched:
        prediction = sched["prediction_type"]
        stated = f"scheduler/scheduler_config.json: prediction_type={prediction}"
    zero_snr = bool(sched.get("rescale_betas_zero_snr"))
    evidence = [why] + [stated] * bool(stated) + ["scheduler: rescale_betas_zero_snr=true"] * zero_snr
    return ModelInfo(root, "diffusers", family, prediction, tuple(evidence), {}, stated, zero_snr)


# What a file that does not state its prediction type most likely is: SD 2.x has both 512-base (epsilon) and
# 768-v models, so there it must be set.
_USUAL_PREDICTION: dict[str, str | None] = {"sd1": "epsilon", "sd2": None, "sdxl": "epsilon"}


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape and metadata of a single file, without reading tensor data (for .ckpt: mmap if possible)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
                return shapes, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{path}: not a readable .safetensors file ({e}); it may be truncated or corrupt") from e
    return {k: tuple(v.shape) for k, v in load_ckpt(path).items() if isinstance(v, torch.Tensor)}, {}


def load_ckpt(path: Path) -> dict[str, Any]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be mmapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"{path}: this .ckpt pickles Python objects besides tensors, and loha-train never unpickles those "
            "(that can run arbitrary code); convert it to .safetensors with a tool you trust"
        ) from e
    except Exception as e:  # zip and storage errors of all kinds mean the same to the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"{path}: not a readable .ckpt ({type(e).__name__}: {first_line}); it may be corrupt") from e
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a dict of tensors (optionally under 'state_dict')")
    return state


def _detect_file(path: Path) -> ModelInfo:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelError(f"{path}: expected a diffusers folder, a .safetensors or .ckpt file, or builtin:NAME")
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    shapes, meta = _read_header(path)
    expected = "an SD 1.x/2.x/SDXL checkpoint in the original (LDM) single-file layout"
    stem = layout.UNET_PREFIX + "input_blocks.0.0.weight"
    if stem not in shapes:
        raise ModelError(f"{path}: no {stem} key; expected {expected} (is it a LoRA, or a diffusers UNet file?)")
    if shapes[stem][1] != 4:
        raise ModelError(f"{path}: UNet with {shapes[stem][1]} input channels (inpainting or edit model); expected 4")
    context = [s[-1] for k, s in shapes.items() if k.startswith(layout.UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    keys = list(shapes)

    def has(prefix: str) -> str | None:
        return next((k for k in keys if k.startswith(prefix)), None)

    if key := has("conditioner.embedders.1.model.") or has(layout.UNET_PREFIX + "label_emb."):
        family, why = "sdxl", key
    elif has("conditioner.embedders.0.model."):
        raise ModelError(f"{path}: an SDXL refiner (one OpenCLIP encoder, no CLIP-L); expected {expected}")
    elif key := has("cond_stage_model.model."):
        family, why = "sd2", key
    elif key := has("cond_stage_model.transformer."):
        family, why = "sd1", key
    elif context and context[0] in (768, 1024, 2048):
        family = {768: "sd1", 1024: "sd2", 2048: "sdxl"}[context[0]]
        why = f"cross-attention context dim {context[0]} (no text-encoder keys)"
    else:
        raise ModelError(f"{path}: cannot tell the model family (no text-encoder keys); expected {expected}")
    evidence = [why]
    prediction = _USUAL_PREDICTION[family]
    stated = _stated_prediction(shapes, meta)
    if stated:
        prediction, source = stated
        evidence.append(source)
    zero_snr = "ztsnr" in shapes  # ComfyUI's marker, next to v_pred
    evidence += ["ztsnr key"] * zero_snr
    return ModelInfo(
        path, "single_file", family, prediction, tuple(evidence), meta,  # type: ignore[arg-type]
        stated[1] if stated else None, zero_snr,
    )  # fmt: skip


_MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}


def _stated_prediction(shapes: dict[str, tuple[int, ...]], meta: dict[str, str]) -> tuple[str, str] | None:
    """(prediction type, where the file says it): our metadata, ComfyUI's v_pred key, or modelspec metadata."""
    if meta.get(layout.METADATA_PREDICTION) in ("epsilon", "v_prediction"):
        value = meta[layout.METADATA_PREDICTION]
        return value, f"metadata {layout.METADATA_PREDICTION}={value}"
    if "v_pred" in shapes:
        return "v_prediction", "v_pred key"
    spec = meta.get("modelspec.prediction_type")
    if spec in _MODELSPEC_PREDICTION:
        return _MODELSPEC_PREDICTION[spec], f"metadata modelspec.prediction_type={spec}"
    return None


def detect_model(path: str | Path) -> ModelInfo:
    """Family, prediction type and kind of a base model, from configs or the file header only (cheap).

    Accepts a diffusers folder, an LDM-layout .safetensors/.ckpt, or builtin:NAME. Raises ModelError naming
    the file and what was expected for anything else (unsupported architecture, corrupt or truncated file).
    """
    resolved = resolve_model_path(path)
    if resolved.is_dir():
        return _detect_folder(resolved)
    return _detect_file(resolved)


def model_hash(path: str | Path) -> str:
    """Stable sha256 (hex) of a base model's weights, computed once per (path, size, mtime) and cached.

    A single file hashes its tensor data (after the safetensors header; a .ckpt whole). A folder hashes the
    list of its weight files' relative paths and their hashes, so config or README edits do not change it.
    """
    resolved = resolve_model_path(path)
    cache_file = builtin.cache_dir() / "hashes.json"
    try:
        if resolved.is_dir():
            return hashing.folder_sha256(resolved, cache_file)
        return hashing.file_sha256(resolved, cache_file)
    except (OSError, struct.error) as e:
        raise ModelError(f"{resolved}: cannot hash the base model ({e}); expected a model file or folder") from e

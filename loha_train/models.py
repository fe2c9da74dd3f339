"""Load the frozen UNet, VAE, text encoders, tokenizers and noise schedule from local files; detect; hash."""

from __future__ import annotations

import contextlib
import json
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from loha_train import builtin, convert, hashing
from loha_train.config import ModelConfig
from loha_train.convert import save_single_file
from loha_train.hashing import WEIGHT_SUFFIXES
from loha_train.reference_configs import REFERENCE

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    TextEncoder = CLIPTextModel | CLIPTextModelWithProjection

__all__ = [
    "ModelBundle",
    "ModelError",
    "ModelInfo",
    "detect_model",
    "load_models",
    "model_hash",
    "save_single_file",
]

Family = Literal["sd1", "sd2", "sdxl"]
PredictionType = Literal["epsilon", "v_prediction"]
Kind = Literal["diffusers", "single_file"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelError(Exception):
    """A base model (or VAE, or tokenizer) that cannot be used, with the file and what was expected."""


@dataclass(frozen=True)
class ModelInfo:
    """What `detect_model` learned from configs or a file header, without loading weights."""

    path: Path
    kind: Kind
    family: Family
    prediction_type: PredictionType | None  # None: the files do not say (SD 2.x single files)
    evidence: tuple[str, ...] = ()  # the config entries or keys that decided family and prediction type
    metadata: dict[str, str] = field(default_factory=dict, repr=False)  # safetensors header metadata
    prediction_from: str | None = None  # the entry that states the prediction type; None: family default/unknown
    zero_terminal_snr: bool = False  # the files say the schedule is rescaled to zero terminal SNR


@dataclass
class ModelBundle:
    """The frozen base model, ready to train adapters against."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[TextEncoder]  # CLIPTextModel; SDXL's second is a CLIPTextModelWithProjection
    tokenizers: list[CLIPTokenizer]  # one per text encoder
    noise_scheduler: DDPMScheduler  # the model's training noise schedule
    scheduler_config: dict[str, Any]  # the model's own scheduler config, for building samplers
    family: Family
    prediction_type: PredictionType
    source: Path
    kind: Kind
    zero_terminal_snr: bool = False  # the noise schedule (training and samplers) is rescaled to zero terminal SNR
    evidence: tuple[str, ...] = ()  # where family, prediction type and zero terminal SNR came from

    def describe(self) -> list[str]:
        """For the run plan: the model and its kind, then where family and prediction type came from."""
        return [f"{self.source} ({self.family}, {self.prediction_type}, {self.kind.replace('_', ' ')})", *self.evidence]


# --------------------------------------------------------------------------------------------- detection
def _resolve(path: str | Path) -> Path:
    if isinstance(path, str) and builtin.is_builtin(path):
        try:
            return builtin.resolve_builtin(path)
        except builtin.BuiltinError as e:
            raise ModelError(str(e)) from e
    return Path(path).expanduser()


def _read_json(path: Path, what: str) -> dict[str, Any]:
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
    index = _read_json(root / "model_index.json", expected)
    unet_entry = index.get("unet")
    if not (isinstance(unet_entry, list) and unet_entry[-1:] == ["UNet2DConditionModel"]):
        found = {k: v for k, v in index.items() if isinstance(v, list) and v[0] is not None}
        raise ModelError(
            f"{root}: unsupported architecture {index.get('_class_name')!r} (components {found}); "
            "loha-train trains SD 1.x, SD 2.x and SDXL models, which have a UNet2DConditionModel unet"
        )
    unet = _read_json(root / "unet" / "config.json", "the UNet's config.json")
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
    sched = _read_json(sched_path, "the scheduler's config") if sched_path.is_file() else {}
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
    return {k: tuple(v.shape) for k, v in _load_ckpt(path).items() if isinstance(v, torch.Tensor)}, {}


def _load_ckpt(path: Path) -> dict[str, Any]:
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
    stem = convert.UNET_PREFIX + "input_blocks.0.0.weight"
    if stem not in shapes:
        raise ModelError(f"{path}: no {stem} key; expected {expected} (is it a LoRA, or a diffusers UNet file?)")
    if shapes[stem][1] != 4:
        raise ModelError(f"{path}: UNet with {shapes[stem][1]} input channels (inpainting or edit model); expected 4")
    context = [
        s[-1] for k, s in shapes.items() if k.startswith(convert.UNET_PREFIX) and k.endswith("attn2.to_k.weight")
    ]
    keys = list(shapes)

    def has(prefix: str) -> str | None:
        return next((k for k in keys if k.startswith(prefix)), None)

    if key := has("conditioner.embedders.1.model.") or has(convert.UNET_PREFIX + "label_emb."):
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
    if meta.get(convert.METADATA_PREDICTION) in ("epsilon", "v_prediction"):
        value = meta[convert.METADATA_PREDICTION]
        return value, f"metadata {convert.METADATA_PREDICTION}={value}"
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
    resolved = _resolve(path)
    if resolved.is_dir():
        return _detect_folder(resolved)
    return _detect_file(resolved)


# ----------------------------------------------------------------------------------------------- hashing
def model_hash(path: str | Path) -> str:
    """Stable sha256 (hex) of a base model's weights, computed once per (path, size, mtime) and cached.

    A single file hashes its tensor data (after the safetensors header; a .ckpt whole). A folder hashes the
    list of its weight files' relative paths and their hashes, so config or README edits do not change it.
    """
    resolved = _resolve(path)
    cache_file = builtin.cache_dir() / "hashes.json"
    try:
        if resolved.is_dir():
            return hashing.folder_sha256(resolved, cache_file)
        return hashing.file_sha256(resolved, cache_file)
    except (OSError, struct.error) as e:
        raise ModelError(f"{resolved}: cannot hash the base model ({e}); expected a model file or folder") from e


# ----------------------------------------------------------------------------------------------- loading
def load_models(cfg: ModelConfig, *, dtype: torch.dtype | None = None, with_tokenizers: bool = True) -> ModelBundle:
    """Load the base model named by `cfg` (diffusers folder, LDM single file, or builtin:NAME), frozen, in eval().

    `dtype` overrides `cfg.dtype`. `cfg.vae_path` replaces the VAE. A single file holds no tokenizer: it comes
    from `cfg.tokenizer_path` (which, when set, also replaces a diffusers folder's tokenizers). Callers that
    never tokenize (merge, inspect) pass `with_tokenizers=False` and get `tokenizers == []`.
    """
    info = detect_model(cfg.path)
    if cfg.family != "auto" and cfg.family != info.family:
        raise ModelError(
            f"{info.path}: model.family is {cfg.family!r} but the files are {info.family} ({'; '.join(info.evidence)})"
        )
    prediction, prediction_why = _prediction_type(info, cfg.prediction_type)
    zero_snr = cfg.zero_terminal_snr or info.zero_terminal_snr
    if zero_snr and prediction == "epsilon":
        source = "model.zero_terminal_snr" if cfg.zero_terminal_snr else "the files"
        raise ModelError(
            f"{info.path}: zero terminal SNR ({source}) needs a v-prediction model, but the prediction type is "
            f"epsilon ({prediction_why}); with epsilon the last timestep, pure noise, predicts nothing"
        )
    dtype = dtype or DTYPES[cfg.dtype]
    tokenizer_path = cfg.tokenizer_path
    if info.kind == "diffusers":
        unet, vae, encoders, scheduler_config = _load_folder(info.path, info.family, dtype)
        tokenizer_root = _resolve(tokenizer_path) if tokenizer_path else info.path
    else:
        unet, vae, encoders, scheduler_config = _load_single_file(info, dtype, need_vae=cfg.vae_path is None)
        if not tokenizer_path and with_tokenizers:
            raise ModelError(
                f"{info.path}: a single-file checkpoint holds no tokenizer; set model.tokenizer_path to a "
                f"tokenizer folder (vocab.json + merges.txt) or to a diffusers {info.family} model folder"
                + (" with tokenizer/ and tokenizer_2/" if info.family == "sdxl" else "")
            )
        tokenizer_root = _resolve(tokenizer_path) if tokenizer_path else info.path
    if cfg.vae_path:
        vae = _load_vae(cfg.vae_path, dict(vae.config) if vae is not None else REFERENCE[info.family]["vae"], dtype)
    tokenizers = _load_tokenizers(tokenizer_root, info.family) if with_tokenizers else []
    for tokenizer, encoder in zip(tokenizers, encoders, strict=False):
        if len(tokenizer) > encoder.config.vocab_size:
            raise ModelError(
                f"{tokenizer_root}: tokenizer has {len(tokenizer)} tokens but the text encoder of {info.path} "
                f"embeds {encoder.config.vocab_size}; expected the tokenizer of this model"
            )
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
        module.eval()
    scheduler_config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler_config["prediction_type"] = prediction
    if zero_snr:  # what samplers need for a zero-terminal-SNR model: the rescaled betas, and starting at t = T
        scheduler_config |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    evidence = [f"family {info.family}: {info.evidence[0]}", f"prediction {prediction}: {prediction_why}"]
    if zero_snr:
        why = "model.zero_terminal_snr" if cfg.zero_terminal_snr else "the model's files"
        evidence.append(f"zero terminal SNR ({why}): rescaled noise schedule; samplers use trailing timesteps")
    return ModelBundle(
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=make_noise_scheduler(scheduler_config, zero_terminal_snr=zero_snr),
        scheduler_config=scheduler_config,
        family=info.family,
        prediction_type=prediction,  # type: ignore[arg-type]
        source=info.path,
        kind=info.kind,
        zero_terminal_snr=zero_snr,
        evidence=tuple(evidence),
    )


def _prediction_type(info: ModelInfo, wanted: str) -> tuple[str, str]:
    """The prediction type to train with and why: the files' own, or model.prediction_type where they say nothing.

    A model.prediction_type that contradicts what the files state is an error naming both.
    """
    if info.prediction_from is not None:
        if wanted not in ("auto", info.prediction_type):
            raise ModelError(
                f"{info.path}: model.prediction_type is {wanted!r} but the files say {info.prediction_type} "
                f"({info.prediction_from}); remove model.prediction_type (auto reads it from the files), or correct "
                "the files if they are wrong"
            )
        return info.prediction_type, info.prediction_from  # type: ignore[return-value]
    if wanted != "auto":
        return wanted, "model.prediction_type (the files do not say)"
    if info.prediction_type is None:
        raise ModelError(
            f"{info.path}: this SD 2.x model's files do not say whether it predicts v (768-v models) or noise "
            "(512-base models); set model.prediction_type to v_prediction or epsilon"
        )
    return info.prediction_type, f"the usual for {info.family} (the files do not say; set model.prediction_type if not)"


def make_noise_scheduler(scheduler_config: dict[str, Any], *, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The training DDPMScheduler for a model's scheduler config (PNDM/DDIM/Euler configs share the schedule)."""
    from diffusers import DDPMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    kwargs = {k: scheduler_config[k] for k in keep if k in scheduler_config}
    zero_snr = zero_terminal_snr or bool(scheduler_config.get("rescale_betas_zero_snr"))
    return DDPMScheduler(**kwargs, clip_sample=False, rescale_betas_zero_snr=zero_snr)


def _from_pretrained(cls: Any, root: Path, subfolder: str | None, **kwargs: Any) -> Any:
    folder = root / subfolder if subfolder else root
    weights = [p.name for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES]
    variant = None
    if weights and all(".fp16." in name for name in weights):
        variant = "fp16"  # a folder that ships only the fp16 variant files
    try:
        return cls.from_pretrained(root, subfolder=subfolder, local_files_only=True, variant=variant, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"{folder}: cannot load {cls.__name__} ({e}); expected its config.json and weights") from e


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" progress bar on stderr from transformers (a library must not draw on the terminal)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_folder(
    root: Path, family: Family, dtype: torch.dtype
) -> tuple[UNet2DConditionModel, AutoencoderKL, list[TextEncoder], dict[str, Any]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _from_pretrained(UNet2DConditionModel, root, "unet", torch_dtype=dtype)
    vae = _from_pretrained(AutoencoderKL, root, "vae", torch_dtype=dtype)
    with _quiet_transformers():
        encoders = [_from_pretrained(CLIPTextModel, root, "text_encoder", dtype=dtype)]
        if family == "sdxl":
            encoders.append(_from_pretrained(CLIPTextModelWithProjection, root, "text_encoder_2", dtype=dtype))
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json", "the scheduler's config")
    return unet, vae, encoders, scheduler


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        return _load_ckpt(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable .safetensors file ({e}); it may be truncated or corrupt") from e


def _single_file_configs(info: ModelInfo) -> tuple[dict[str, Any], str]:
    raw = info.metadata.get(convert.METADATA_CONFIGS)
    if raw:
        try:
            return json.loads(raw), "the configs in its metadata"
        except ValueError as e:
            raise ModelError(f"{info.path}: unreadable {convert.METADATA_CONFIGS} metadata ({e})") from e
    return REFERENCE[info.family], f"the reference {info.family} architecture"


def _load_single_file(
    info: ModelInfo, dtype: torch.dtype, *, need_vae: bool
) -> tuple[UNet2DConditionModel, AutoencoderKL | None, list[TextEncoder], dict[str, Any]]:
    checkpoint = _read_state_dict(info.path)
    configs, source = _single_file_configs(info)
    try:
        unet, vae, encoders = convert.components_from_ldm(checkpoint, configs, info.family, dtype)
    except convert.ConversionError as e:
        raise ModelError(f"{info.path}: {e}; expected {source}") from e
    if vae is None and need_vae:
        raise ModelError(f"{info.path}: no {convert.VAE_PREFIX}* (VAE) keys; set model.vae_path to a VAE")
    return unet, vae, encoders, dict(configs["scheduler"])


def _load_vae(spec: str, base_config: dict[str, Any], dtype: torch.dtype) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    path = _resolve(spec)
    if path.is_dir():
        if (path / "vae" / "config.json").is_file():
            return _from_pretrained(AutoencoderKL, path, "vae", torch_dtype=dtype)
        if (path / "config.json").is_file():
            return _from_pretrained(AutoencoderKL, path, None, torch_dtype=dtype)
        raise ModelError(f"{path}: expected a diffusers VAE folder (config.json + weights) or a model with vae/")
    if path.suffix not in SINGLE_FILE_SUFFIXES or not path.is_file():
        raise ModelError(f"{path}: expected a VAE .safetensors/.ckpt file or a diffusers VAE folder")
    try:
        return convert.vae_from_file(_read_state_dict(path), base_config, dtype)
    except convert.ConversionError as e:
        raise ModelError(f"{path}: {e}; expected a VAE of the base model's architecture") from e


def _load_tokenizers(root: Path, family: Family) -> list[CLIPTokenizer]:
    from transformers import CLIPTokenizer

    names = ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",)
    if (root / "tokenizer").is_dir():
        folders = [root / name for name in names]
    elif family != "sdxl":
        folders = [root]
    else:
        raise ModelError(f"{root}: expected tokenizer/ and tokenizer_2/ folders for an SDXL model")
    tokenizers = []
    for folder in folders:
        # from_pretrained on a folder without these files silently builds a 3-token vocabulary
        if (
            not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
            and not (folder / "tokenizer.json").is_file()
        ):
            raise ModelError(f"{folder}: expected a CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json)")
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, local_files_only=True))
        except (OSError, ValueError) as e:
            raise ModelError(f"{folder}: cannot load the CLIP tokenizer ({e})") from e
    return tokenizers

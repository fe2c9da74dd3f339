"""Load the frozen UNet, VAE, text encoders, tokenizers and noise schedule from local files."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from loha_train.config import ModelConfig
from loha_train.models import layout, single_file
from loha_train.models.bundle import DTYPES, Family, ModelBundle, ModelError, ModelInfo
from loha_train.models.detect import SINGLE_FILE_SUFFIXES, detect_model, load_ckpt, read_json, resolve_model_path
from loha_train.models.hashing import WEIGHT_SUFFIXES
from loha_train.models.reference_configs import REFERENCE

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from loha_train.models.bundle import TextEncoder


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
        tokenizer_root = resolve_model_path(tokenizer_path) if tokenizer_path else info.path
    else:
        unet, vae, encoders, scheduler_config = _load_single_file(info, dtype, need_vae=cfg.vae_path is None)
        if not tokenizer_path and with_tokenizers:
            raise ModelError(
                f"{info.path}: a single-file checkpoint holds no tokenizer; set model.tokenizer_path to a "
                f"tokenizer folder (vocab.json + merges.txt) or to a diffusers {info.family} model folder"
                + (" with tokenizer/ and tokenizer_2/" if info.family == "sdxl" else "")
            )
        tokenizer_root = resolve_model_path(tokenizer_path) if tokenizer_path else info.path
    if cfg.vae_path:
        vae = _load_vae(cfg.vae_path, dict(vae.config) if vae is not None else REFERENCE[info.family]["vae"], dtype)
    if vae is not None and vae.dtype != (wanted := vae_dtype(cfg, vae.config, dtype)):
        vae.to(wanted)
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


def vae_dtype(cfg: ModelConfig, vae_config: Any, dtype: torch.dtype) -> torch.dtype:
    """model.vae_dtype, or for auto: float32 when the VAE's config sets force_upcast (diffusers' default, and SDXL's
    VAE, known to overflow to NaN in fp16), else the frozen weights' dtype (e.g. the fp16-fix VAEs)."""
    if cfg.vae_dtype != "auto":
        return DTYPES[cfg.vae_dtype]
    return torch.float32 if getattr(vae_config, "force_upcast", True) else dtype


def _transformers_dtype_keyword() -> str:
    """transformers >= 4.56 takes `dtype` (5.x warns on the old name); older releases only `torch_dtype`."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _load_folder(
    root: Path, family: Family, dtype: torch.dtype
) -> tuple[UNet2DConditionModel, AutoencoderKL, list[TextEncoder], dict[str, Any]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _from_pretrained(UNet2DConditionModel, root, "unet", torch_dtype=dtype)
    vae = _from_pretrained(AutoencoderKL, root, "vae", torch_dtype=dtype)
    te_dtype = {_transformers_dtype_keyword(): dtype}
    with _quiet_transformers():
        encoders = [_from_pretrained(CLIPTextModel, root, "text_encoder", **te_dtype)]
        if family == "sdxl":
            encoders.append(_from_pretrained(CLIPTextModelWithProjection, root, "text_encoder_2", **te_dtype))
    scheduler = read_json(root / "scheduler" / "scheduler_config.json", "the scheduler's config")
    return unet, vae, encoders, scheduler


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        return load_ckpt(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable .safetensors file ({e}); it may be truncated or corrupt") from e


def _single_file_configs(info: ModelInfo) -> tuple[dict[str, Any], str]:
    raw = info.metadata.get(layout.METADATA_CONFIGS)
    if raw:
        try:
            return json.loads(raw), "the configs in its metadata"
        except ValueError as e:
            raise ModelError(f"{info.path}: unreadable {layout.METADATA_CONFIGS} metadata ({e})") from e
    return REFERENCE[info.family], f"the reference {info.family} architecture"


def _load_single_file(
    info: ModelInfo, dtype: torch.dtype, *, need_vae: bool
) -> tuple[UNet2DConditionModel, AutoencoderKL | None, list[TextEncoder], dict[str, Any]]:
    checkpoint = _read_state_dict(info.path)
    configs, source = _single_file_configs(info)
    try:
        unet, vae, encoders = single_file.components_from_ldm(checkpoint, configs, info.family, dtype)
    except layout.ConversionError as e:
        raise ModelError(f"{info.path}: {e}; expected {source}") from e
    if vae is None and need_vae:
        raise ModelError(f"{info.path}: no {layout.VAE_PREFIX}* (VAE) keys; set model.vae_path to a VAE")
    return unet, vae, encoders, dict(configs["scheduler"])


def _load_vae(spec: str, base_config: dict[str, Any], dtype: torch.dtype) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    path = resolve_model_path(spec)
    if path.is_dir():
        if (path / "vae" / "config.json").is_file():
            return _from_pretrained(AutoencoderKL, path, "vae", torch_dtype=dtype)
        if (path / "config.json").is_file():
            return _from_pretrained(AutoencoderKL, path, None, torch_dtype=dtype)
        raise ModelError(f"{path}: expected a diffusers VAE folder (config.json + weights) or a model with vae/")
    if path.suffix not in SINGLE_FILE_SUFFIXES or not path.is_file():
        raise ModelError(f"{path}: expected a VAE .safetensors/.ckpt file or a diffusers VAE folder")
    try:
        return single_file.vae_from_file(_read_state_dict(path), base_config, dtype)
    except layout.ConversionError as e:
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

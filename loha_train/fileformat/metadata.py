"""Adapter file metadata: kohya `ss_*` keys (WebUI reads them), Stability `modelspec.*` keys, our provenance."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from loha_train import __version__
from loha_train.config import default_lr
from loha_train.loha.inject import LoHaNetwork

SAI_MODEL_SPEC = "1.0.0"
NETWORK_MODULE = "lycoris.kohya"  # what LyCORIS's kohya entry point writes; WebUI shows it as "Kohya module"
_OPTIMIZERS = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "prodigy": "prodigyopt.Prodigy",
}


# ------------------------------------------------------------------------------------ base-model identifiers
def base_model_version(family: str, prediction_type: str | None) -> str:
    """kohya's ss_base_model_version: sd_v1, sd_v2, sd_v2_v (v-prediction), sdxl_base_v1-0.

    sd-scripts builds it in `model_util.get_model_version_str_for_sd1_sd2` ("sd" + "_v1"/"_v2" + "_v" for
    v-parameterization) and `sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0`. WebUI only checks the `sdxl_`
    prefix (and `ss_v2`), so SD 2.x 768-v files read as "sd_v2_v", not "sd_v2_768_v".
    """
    if family == "sdxl":
        return "sdxl_base_v1-0"
    return ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if prediction_type == "v_prediction" else "")


def modelspec_architecture(family: str, prediction_type: str | None) -> str:
    """modelspec.architecture as sd-scripts' `sai_model_spec.determine_architecture` writes it for a LoRA-type file."""
    if family == "sdxl":
        arch = "stable-diffusion-xl-v1-base"
    elif family == "sd2":
        arch = "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    return f"{arch}/lora"


def modelspec_implementation(family: str) -> str:
    """sd-scripts: SDXL adapters name the Stability generative-models code, SD 1.x/2.x adapters `diffusers`."""
    return "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers"


# ----------------------------------------------------------------------------------------- expanded preset
def network_summary(network: LoHaNetwork, network_config: Mapping[str, Any]) -> dict[str, Any]:
    """What the preset and patterns expanded to: targeted modules per component, and every module whose
    (rank, alpha) is not the default for its kind (rank/alpha, or conv_rank/conv_alpha for k x k convs)."""
    rank, alpha = int(network_config["rank"]), float(network_config["alpha"])
    conv_rank = int(network_config.get("conv_rank") or rank)
    conv_alpha = float(network_config["conv_alpha"] if network_config.get("conv_alpha") is not None else alpha)
    targets: dict[str, list[str]] = {}
    overrides: dict[str, dict[str, Any]] = {}
    for key, module in network.modules.items():
        qualname = network.qualnames[key]
        targets.setdefault(network.components[key], []).append(qualname.split(".", 1)[1])
        kxk = isinstance(module.base, nn.Conv2d) and tuple(module.base.kernel_size) != (1, 1)
        default = (conv_rank, conv_alpha) if kxk else (rank, alpha)
        if (module.rank, float(module.alpha)) != default:
            overrides[key] = {"rank": module.rank, "alpha": float(module.alpha), "cp": module.use_cp}
    return {
        "modules": {component: len(names) for component, names in targets.items()},
        "targets": targets,
        "rank_alpha_overrides": overrides,
    }


# ------------------------------------------------------------------------------------------------ metadata
def _s(value: Any) -> str:
    """A metadata value as kohya writes it: str() of scalars (True, None, 0.0001), JSON for containers."""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _trigger_words(config: Mapping[str, Any]) -> list[str]:
    words = [config["data"].get("trigger_word"), *config["output"].get("trigger_words", ())]
    return list(dict.fromkeys(w.strip() for w in words if w and w.strip()))


def _optimizer(train: Mapping[str, Any]) -> str:
    betas = f"({train['adam_beta1']}, {train['adam_beta2']})"
    args = f"weight_decay={train['weight_decay']},betas={betas},eps={train['adam_eps']}"
    args += "".join(f",{k}={v}" for k, v in (train.get("optimizer_args") or {}).items())
    return f"{_OPTIMIZERS.get(train['optimizer'], train['optimizer'])}({args})"


def _dataset_dirs(dataset: Mapping[str, Any], repeats: int) -> dict[str, dict[str, int]] | None:
    """kohya's ss_dataset_dirs, {folder: {"n_repeats": r, "img_count": n}} (WebUI sums img_count)."""
    if "dataset_dirs" in dataset:
        return dict(dataset["dataset_dirs"])
    if "dirs" in dataset:  # {folder: image count}
        return {Path(d).name or str(d): {"n_repeats": repeats, "img_count": int(n)} for d, n in dataset["dirs"].items()}
    return None


def _kohya(
    config: Mapping[str, Any],
    family: str,
    prediction: str | None,
    name: str,
    dataset: Mapping[str, Any],
    plan: Mapping[str, Any],
    stats: Mapping[str, Any],
    started: float,
    finished: float,
) -> dict[str, Any]:
    net, train, data, model_cfg = (config[k] for k in ("network", "train", "data", "model"))
    conv_rank = net["conv_rank"] if net.get("conv_rank") is not None else net["rank"]
    conv_alpha = net["conv_alpha"] if net.get("conv_alpha") is not None else net["alpha"]
    network_args = {
        "algo": "loha",
        "preset": net["preset"],
        "conv_dim": str(conv_rank),
        "conv_alpha": str(float(conv_alpha)),
        "use_tucker": str(bool(net["use_cp"])),
        "use_cp": str(bool(net["use_cp"])),
        "dropout": "0.0",
        "rank_dropout": str(float(net["rank_dropout"])),
        "module_dropout": str(float(net["module_dropout"])),
        "rank_dropout_scale": str(bool(net.get("rank_dropout_scale", False))),
    }
    if net.get("weight_decompose"):  # LyCORIS's kohya network_args for DoRA
        network_args |= {"dora_wd": "True", "wd_on_output": str(bool(net.get("wd_on_output", False)))}
    side = int(data["resolution"])
    lr = train["lr"] if train.get("lr") is not None else default_lr(train["optimizer"])
    out: dict[str, Any] = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": net["rank"],
        "ss_network_alpha": float(net["alpha"]),
        "ss_network_args": network_args,
        "ss_base_model_version": base_model_version(family, prediction),
        "ss_v2": family == "sd2",
        "ss_v_parameterization": prediction == "v_prediction",
        "ss_sd_model_name": name,
        "ss_resolution": f"({side}, {side})",
        "ss_clip_skip": model_cfg.get("clip_skip", 1),
        "ss_output_name": config["output"]["name"],
        "ss_training_started_at": started,  # Unix time: WebUI shows float(value) as the training date
        "ss_training_finished_at": finished,
        "ss_steps": stats.get("steps", 0),
        "ss_epoch": stats.get("epoch", 0),
        "ss_max_train_steps": plan.get("total_steps", train.get("max_steps")),
        "ss_num_epochs": train.get("epochs"),
        "ss_learning_rate": lr,
        "ss_unet_lr": train["unet_lr"] if train.get("unet_lr") is not None else lr,
        "ss_text_encoder_lr": train["text_encoder_lr"] if train.get("text_encoder_lr") is not None else lr,
        "ss_optimizer": _optimizer(train),
        "ss_lr_scheduler": train["scheduler"],
        "ss_lr_warmup_steps": train["warmup_steps"],
        "ss_max_grad_norm": train["max_grad_norm"],
        "ss_batch_size_per_device": train["batch_size"],
        "ss_total_batch_size": plan.get("effective_batch", train["batch_size"] * train["gradient_accumulation"]),
        "ss_gradient_accumulation_steps": train["gradient_accumulation"],
        "ss_gradient_checkpointing": train["gradient_checkpointing"],
        "ss_mixed_precision": train["mixed_precision"],
        "ss_seed": train["seed"],
        "ss_noise_offset": train["noise_offset"],
        "ss_min_snr_gamma": train["min_snr_gamma"],
        **_kohya_loss_and_noise(train, net),
        "ss_zero_terminal_snr": model_cfg.get("zero_terminal_snr", False),
        "ss_prior_loss_weight": data["prior_loss_weight"],
        "ss_caption_dropout_rate": data["caption_dropout"],
        "ss_caption_tag_dropout_rate": data["tag_dropout"],
        "ss_shuffle_caption": data["shuffle_captions"],
        "ss_keep_tokens": data["keep_tokens"],
        "ss_enable_bucket": data["bucketing"],
        "ss_min_bucket_reso": data["bucket_min_side"],
        "ss_max_bucket_reso": data["bucket_max_side"],
        "ss_bucket_no_upscale": data["bucket_no_upscale"],
        "ss_flip_aug": data["flip"],
        "ss_random_crop": data["random_crop"],
        "ss_cache_latents": data["cache_latents"] != "none",
        # kohya's --masked_loss: the loss was weighted by per-image masks (alpha channel or mask images)
        "ss_masked_loss": bool(data.get("alpha_mask") or data.get("mask_path")),
    }
    if "steps_per_epoch" in plan:
        out["ss_num_batches_per_epoch"] = int(plan["steps_per_epoch"]) * int(train["gradient_accumulation"])
    for key in ("tag_frequency", "bucket_info", "num_train_images", "num_reg_images", "reg_dataset_dirs"):
        if key in dataset:
            out[f"ss_{key}"] = dataset[key]
    dirs = _dataset_dirs(dataset, int(data["repeats"]))
    if dirs is not None:
        out["ss_dataset_dirs"] = dirs
    return out


def _kohya_loss_and_noise(train: Mapping[str, Any], net: Mapping[str, Any]) -> dict[str, Any]:
    """kohya's ss_* keys for the loss, noise and max-norm options (None where kohya's option would be unset)."""
    return {
        "ss_noise_offset_random_strength": bool(train.get("noise_offset_random_strength", False)),
        "ss_adaptive_noise_scale": train.get("adaptive_noise_scale"),
        "ss_multires_noise_iterations": train.get("multires_noise_iterations") or None,
        "ss_multires_noise_discount": train.get("multires_noise_discount", 0.3),
        "ss_ip_noise_gamma": train.get("ip_noise_gamma") or None,
        "ss_ip_noise_gamma_random_strength": bool(train.get("ip_noise_gamma_random_strength", False)),
        "ss_loss_type": train.get("loss", "l2"),
        "ss_huber_schedule": train.get("huber_schedule", "snr"),
        "ss_huber_c": train.get("huber_c", 0.1),
        "ss_huber_scale": train.get("huber_scale", 1.0),
        "ss_debiased_estimation": bool(train.get("debiased_estimation", False)),
        "ss_scale_weight_norms": net.get("scale_weight_norms"),
    }


def _modelspec(config: Mapping[str, Any], family: str, prediction: str | None, finished: float) -> dict[str, str]:
    output, side = config["output"], int(config["data"]["resolution"])
    out = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": modelspec_architecture(family, prediction),
        "modelspec.implementation": modelspec_implementation(family),
        "modelspec.title": output.get("title") or output["name"],
        "modelspec.description": "LoHa adapter trained with loha-train",
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished), datetime.timezone.utc).isoformat(),
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
    }
    triggers = _trigger_words(config)
    if triggers:
        out["modelspec.trigger_phrase"] = ", ".join(triggers)
    return out


def build_metadata(
    *,
    config: Mapping[str, Any],
    network: LoHaNetwork | Mapping[str, Any],
    family: str,
    prediction_type: str | None,
    base_model_hash: str = "",
    base_model_name: str | None = None,
    dataset: Mapping[str, Any] | None = None,
    plan: Mapping[str, Any] | None = None,
    stats: Mapping[str, Any] | None = None,
    started_at: float | None = None,
    version: str = __version__,
) -> dict[str, str]:
    """Every metadata entry of an exported adapter, all strings; each value starting with `{` is valid JSON.

    config: the resolved config as plain data (`config_to_dict(cfg)`), every section and default.
    network: the injected LoHaNetwork (or `network_summary` of it): the expanded preset is recorded.
    family, prediction_type, base_model_hash (`models.model_hash`), base_model_name: the base model.
    dataset: {"fingerprint": `data.dataset_fingerprint(index)`, "tag_frequency": {subset: {tag: n}},
        "bucket_info": {"buckets": {i: {"resolution": [w, h], "count": n}}, ...}, "dataset_dirs":
        {folder: {"n_repeats": r, "img_count": n}} or "dirs": {folder: image count}, "num_train_images",
        "num_reg_images"} (both images x repeats, as kohya counts them); every entry optional.
    plan: {"total_steps", "effective_batch", "steps_per_epoch", ...}; stats: {"steps", "epoch", "finished_at",
        ...}; started_at / finished_at are Unix times.
    """
    dataset, plan, stats = dataset or {}, plan or {}, stats or {}
    finished = float(stats.get("finished_at", time.time()))
    started = float(started_at if started_at is not None else finished)
    name = base_model_name or config["model"]["path"]
    summary = network_summary(network, config["network"]) if isinstance(network, LoHaNetwork) else dict(network)
    provenance: dict[str, Any] = {
        "loha_train.version": version,
        "loha_train.config": config,
        "loha_train.targets": summary,
        "loha_train.base_model": {"name": name, "family": family, "prediction_type": prediction_type},
        "loha_train.base_model_hash": base_model_hash,
        "loha_train.seed": config["train"]["seed"],
        "loha_train.trigger_words": _trigger_words(config),
        "loha_train.run": {"plan": dict(plan), "stats": dict(stats)},
    }
    if "fingerprint" in dataset:
        provenance["loha_train.dataset_fingerprint"] = dataset["fingerprint"]
    if config["train"].get("ema") is not None:  # which weights the file holds: the EMA or the last trained ones
        provenance["loha_train.weights"] = "ema" if config["output"].get("export_ema") else "trained"
        provenance["loha_train.ema"] = {**config["train"]["ema"], "updates": stats.get("ema_updates", 0)}
    entries = {
        **_kohya(config, family, prediction_type, name, dataset, plan, stats, started, finished),
        **_modelspec(config, family, prediction_type, finished),
        **provenance,
    }
    return {k: _s(v) for k, v in entries.items()}


def json_entries(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The entries WebUI would parse as JSON (values starting with `{`), parsed; raises ValueError on bad JSON."""
    return {k: json.loads(v) for k, v in metadata.items() if v.startswith("{")}


def provenance_keys(metadata: Mapping[str, str]) -> Sequence[str]:
    """Our own `loha_train.*` keys present in `metadata`, in a stable order."""
    return sorted(k for k in metadata if k.startswith("loha_train."))

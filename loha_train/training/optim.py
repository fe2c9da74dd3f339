"""The optimizer over the adapter parameters (one group per component) and its learning-rate schedule."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from loha_train.config import Config
from loha_train.loha.inject import LoHaNetwork


class OptimizerUnavailable(Exception):
    """An optimizer whose package is not installed."""


def build_optimizer(cfg: Config, network: LoHaNetwork, total_steps: int) -> tuple[Any, Any]:
    """The optimizer over the adapter parameters (one group per component) and its LR schedule."""
    from diffusers.optimization import get_scheduler

    t = cfg.train
    lrs = {
        "unet": t.unet_lr or t.lr,
        "text_encoder": t.text_encoder_lr or t.lr,
        "text_encoder_2": t.text_encoder_lr or t.lr,
    }
    groups = [
        {"params": params, "lr": lr} for component, lr in lrs.items() if (params := list(network.parameters(component)))
    ]
    optimizer = make_optimizer(t.optimizer, groups, cfg)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def make_optimizer(name: str, groups: list[dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    if name == "adamw":
        # fused: one kernel over all adapter tensors (3x faster than the per-tensor loop on CPU, same results)
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(
            groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay, fused=fused
        )
    if name == "adamw8bit":
        bnb = _optional_import("bitsandbytes", "train.optimizer: adamw8bit", "bitsandbytes")
        return bnb.optim.AdamW8bit(
            groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
        )
    prodigy = _optional_import("prodigyopt", "train.optimizer: prodigy", "prodigyopt")
    return prodigy.Prodigy(groups, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)


def check_optimizer_available(name: str) -> None:
    """Fail before any model loads when the chosen optimizer's package is missing."""
    packages = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}
    if name in packages:
        _optional_import(packages[name], f"train.optimizer: {name}", packages[name])


def _optional_import(module: str, key: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OptimizerUnavailable(
            f"{key} needs the {package} package, which is not installed ({err}). Install it with "
            f"`pip install {package}` or use train.optimizer: adamw."
        ) from None

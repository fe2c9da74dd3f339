"""Set a run up: the frozen model on the device, the adapters injected, and the trained models prepared (DDP)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from loha_train.config import Config
from loha_train.fileformat.adapter_io import apply_adapter, load_adapter
from loha_train.fileformat.keys import sd_components
from loha_train.loha.inject import LoHaNetwork, inject_loha
from loha_train.models.bundle import ModelBundle
from loha_train.training import checkpoint
from loha_train.training.guards import TrainingError
from loha_train.training.optim import build_optimizer


def to_device(bundle: ModelBundle, device: torch.device) -> None:
    """Move the frozen UNet, VAE and text encoders to the training device."""
    bundle.unet.to(device)
    bundle.vae.to(device)
    for te in bundle.text_encoders:
        te.to(device)


def build_network(cfg: Config, bundle: ModelBundle, device: torch.device) -> LoHaNetwork:
    """Inject LoHa where `network` says (kohya key names), on `device`, from `network.init_from` when given."""
    components = sd_components(
        bundle.unet if cfg.network.train_unet else None,
        bundle.text_encoders if cfg.network.train_text_encoder else [],
        family=bundle.family,
    )
    network = inject_loha(components, cfg.network, seed=cfg.train.seed)
    for module in network.modules.values():
        module.to(device)
    if cfg.network.init_from:
        state, _ = load_adapter(cfg.network.init_from)
        apply_adapter(network, state, source=cfg.network.init_from)
    return network


def used_alpha(network: LoHaNetwork) -> float:
    """The alpha most adapters use (network.init_from loads each module's alpha from the file)."""
    alphas = [round(float(m.alpha), 6) for m in network.modules.values()]
    return max(set(alphas), key=alphas.count) if alphas else 0.0


def init_from_notes(cfg: Config, network: LoHaNetwork) -> list[str]:
    """The plan's word on network.init_from: the file's alphas win over network.alpha/conv_alpha."""
    if not cfg.network.init_from:
        return []
    return [
        f"network.init_from: alphas come from {cfg.network.init_from} (the file wins over network.alpha "
        f"{cfg.network.alpha:g}); most adapters use alpha {used_alpha(network):g}, and the metadata records it"
    ]


def may_leave_adapters_unused(cfg: Config, family: str) -> bool:
    """Whether a step can leave some adapter parameters without a gradient, which DDP must be told about:
    module dropout skips whole adapters, and a trained text encoder's last layer is unused with clip_skip > 1
    (and SDXL's first encoder always stops at its penultimate layer)."""
    skips_text_layers = cfg.network.train_text_encoder and (cfg.model.clip_skip > 1 or family == "sdxl")
    return cfg.network.module_dropout > 0 or skips_text_layers


def prepare_for_training(
    cfg: Config, accelerator: Any, bundle: ModelBundle, network: LoHaNetwork, total_steps: int
) -> tuple[ModelBundle, list[Any], Any, Any]:
    """Gradient checkpointing, the optimizer and schedule, accelerate's prepare and the checkpoint hooks.

    Returns the bundle whose trained models are their prepared (DDP) wrappers, those wrappers, the optimizer and
    the LR scheduler.
    """
    trained = [m for m in (bundle.unet, *bundle.text_encoders) if any(p.requires_grad for p in m.parameters())]
    if cfg.train.gradient_checkpointing:
        _enable_gradient_checkpointing(bundle, cfg)
    if cfg.train.compile:
        refuse_cpu_inductor(next(bundle.unet.parameters()).device)
        compile_model(bundle.unet)
    optimizer, lr_scheduler = build_optimizer(cfg, network, total_steps, bundle.family)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    models, optimizer, lr_scheduler = list(prepared[: len(trained)]), prepared[-2], prepared[-1]
    checkpoint.register_adapter_hooks(accelerator, network)
    return _through_wrappers(bundle, trained, models), models, optimizer, lr_scheduler


def compile_model(module: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile `module` in place (its state_dict keys, hooks and checkpoints stay as they are).

    Under compilation the LoHa layers take their plain-autograd path, which the compiler traces and fuses (it
    does not trace our fused autograd nodes). Random ops inside the graph (rank dropout) draw from the global RNG
    as in eager mode (inductor's fallback_random), so a compiled run draws the same masks and resumes exactly.
    Module dropout decides per call in Python, which splits the graph at each adapter.
    """
    import torch._inductor.config as inductor

    inductor.fallback_random = True
    module.compile(backend=backend)


def refuse_cpu_inductor(device: torch.device) -> None:
    """train.compile on the CPU: inductor's CPU code computes wrong UNet gradients in this stack, so refuse it."""
    if device.type == "cpu":
        raise TrainingError(
            "train.compile is not supported on the CPU: torch.compile's inductor backend computes wrong gradients "
            "for diffusers' UNet there (measured with torch 2.13: the forward matches eager mode, the input "
            "gradient of a UNet without any adapter is 52% off). Set train.compile: false, or train on a GPU (run "
            "scripts/gpu_check.sh there first: it compares compiled and eager steps)."
        )


def _enable_gradient_checkpointing(bundle: ModelBundle, cfg: Config) -> None:
    bundle.unet.enable_gradient_checkpointing()
    if cfg.network.train_text_encoder:
        for te in bundle.text_encoders:
            enable_text_encoder_checkpointing(te)


def enable_text_encoder_checkpointing(te: Any) -> None:
    """Non-reentrant checkpointing: transformers 4.x defaults to reentrant checkpointing, which gives the adapters
    inside a frozen encoder no gradient (its inputs, token ids, never require grad); non-reentrant does."""
    kwargs = {"use_reentrant": False}
    if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it (the old name warns)
        te.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _through_wrappers(bundle: ModelBundle, raw: list[Any], prepared: list[Any]) -> ModelBundle:
    """The bundle with each trained model replaced by its prepared (DDP) wrapper. DDP synchronises gradients
    only for a backward that follows its own forward, so the loss must call the wrapper, not the module."""
    wrapper = {id(module): wrapped for module, wrapped in zip(raw, prepared, strict=True)}
    return dataclasses.replace(
        bundle,
        unet=wrapper.get(id(bundle.unet), bundle.unet),
        text_encoders=[wrapper.get(id(te), te) for te in bundle.text_encoders],
    )

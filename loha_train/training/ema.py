"""An exponential moving average of the adapter's trained tensors, on diffusers' EMAModel schedule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from loha_train.config import EMAConfig
from loha_train.loha.inject import LoHaNetwork


def ema_decay(cfg: EMAConfig, optimization_step: int) -> float:
    """The decay of update number `optimization_step` (1-based), as diffusers' `EMAModel.get_decay`.

    step = max(0, n - update_after_step - 1); 0 while step <= 0 (the average copies the weights); then
    1 - (1 + step / inv_gamma) ** -power with warm-up, else (1 + step) / (10 + step); clamped to [min_decay, decay].
    """
    step = max(0, optimization_step - cfg.update_after_step - 1)
    if step <= 0:
        return 0.0
    value = 1 - (1 + step / cfg.inv_gamma) ** -cfg.power if cfg.use_warmup else (1 + step) / (10 + step)
    return max(min(value, cfg.decay), cfg.min_decay)


class AdapterEMA:
    """Shadow copies (float32) of every trainable adapter tensor, updated after each optimizer step.

    `state_dict`/`load_state_dict` make it a checkpointable object for accelerate (`register_for_checkpointing`),
    so a resumed run continues the same average. `swapped()` puts the averages into the live network for
    sampling, validation or export and restores the trained tensors afterwards.
    """

    def __init__(self, cfg: EMAConfig, network: LoHaNetwork) -> None:
        self.cfg = cfg
        self.names = [n for n, p in _trained(network)]
        self.shadow = [p.detach().float().clone() for _, p in _trained(network)]
        self.optimization_step = 0
        self.decay = 0.0  # the decay of the last update

    @torch.no_grad()
    def update(self, network: LoHaNetwork) -> None:
        """One EMA step: shadow -= (1 - decay) * (shadow - param), as EMAModel.step does."""
        self.optimization_step += 1
        self.decay = ema_decay(self.cfg, self.optimization_step)
        for s, (_, p) in zip(self.shadow, _trained(network), strict=True):
            s.sub_((1 - self.decay) * (s - p.detach().float()))

    @contextlib.contextmanager
    def swapped(self, network: LoHaNetwork) -> Iterator[None]:
        """Within the block the network's trained tensors hold the averages; the trained values come back after."""
        params = [p for _, p in _trained(network)]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow, strict=True):
                p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimization_step": self.optimization_step,
            "decay": self.decay,
            "shadow": {n: s.cpu() for n, s in zip(self.names, self.shadow, strict=True)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if sorted(shadow) != sorted(self.names):
            raise ValueError("the checkpoint's EMA tensors do not match this run's adapter")
        self.optimization_step = int(state["optimization_step"])
        self.decay = float(state["decay"])
        self.shadow = [
            shadow[n].to(s.device, torch.float32).clone() for n, s in zip(self.names, self.shadow, strict=True)
        ]


def _trained(network: LoHaNetwork) -> Iterator[tuple[str, Tensor]]:
    """(key.suffix, parameter) of every trainable adapter tensor, in a fixed order."""
    for key, module in network.modules.items():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                yield f"{key}.{name}", p

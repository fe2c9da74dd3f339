"""The run plan: steps, epochs, batch arithmetic and output paths, computed before training and printed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config

FINAL_CONFIG = "config.yaml"


@dataclass(frozen=True)
class OutputPaths:
    """The output folder contract (drawn in the README)."""

    root: Path
    name: str

    @property
    def adapter(self) -> Path:
        return self.root / f"{self.name}.safetensors"

    def periodic_adapter(self, step: int) -> Path:
        return self.root / f"{self.name}-step-{step:06d}.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def config(self) -> Path:
        return self.root / FINAL_CONFIG

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss.png"


@dataclass(frozen=True)
class RunPlan:
    """Batch and step arithmetic for one run."""

    batches_per_epoch: int  # micro-batches per process per epoch
    batch_size: int
    gradient_accumulation: int
    world_size: int
    total_steps: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; an epoch's last step may accumulate fewer micro-batches."""
        return math.ceil(self.batches_per_epoch / self.gradient_accumulation)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation * self.world_size

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def group_size(self, batch_in_epoch: int) -> int:
        """Micro-batches in the accumulation group that starts at `batch_in_epoch`."""
        return min(self.gradient_accumulation, self.batches_per_epoch - batch_in_epoch)


def make_plan(cfg: Config, batches_per_epoch: int, world_size: int) -> RunPlan:
    ga = cfg.train.gradient_accumulation
    steps_per_epoch = math.ceil(batches_per_epoch / ga)
    total = cfg.train.max_steps if cfg.train.max_steps is not None else (cfg.train.epochs or 1) * steps_per_epoch
    return RunPlan(batches_per_epoch, cfg.train.batch_size, ga, world_size, total)


def format_plan(
    cfg: Config,
    plan: RunPlan,
    paths: OutputPaths,
    *,
    model: str,
    adapters: dict[str, dict[str, int]],
    data: str,
) -> str:
    """The `--dry-run` report (also printed at the start of a run)."""
    lines = ["loha-train plan", f"  model       {model}"]
    for component, row in adapters.items():
        lines.append(f"  adapters    {component}: {row['modules']} modules, {row['params']:,} trainable parameters")
    lines.append(f"  data        {data}")
    t = cfg.train
    lines += [
        f"  batch       {t.batch_size} per process x {t.gradient_accumulation} accumulation x {plan.world_size} "
        f"process(es) = {plan.effective_batch} per optimizer step",
        f"  lr          {t.lr:g} (unet {t.unet_lr or t.lr:g}, text encoder {t.text_encoder_lr or t.lr:g}); "
        "not scaled with the batch: lr applies to the effective batch as given",
        f"  steps       {plan.total_steps} ({plan.steps_per_epoch} per epoch, {plan.epochs:.2f} epochs)",
        f"  precision   frozen weights {cfg.model.dtype}, mixed precision {t.mixed_precision}",
        f"  output      {paths.adapter}",
        f"              checkpoints in {paths.checkpoints}"
        + (f" every {t.save_every_steps} steps" if t.save_every_steps else " (at the end and on interrupt)"),
        f"              samples in {paths.samples}, TensorBoard logs in {paths.logs}",
    ]
    lines += [f"  note        {n}" for n in plan.notes]
    return "\n".join(lines)

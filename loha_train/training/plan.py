"""The run plan: steps, epochs, batch arithmetic and output paths, computed before training and printed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from loha_train.config import Config

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


class Position(NamedTuple):
    """Where a run stands: optimizer steps done, current epoch, micro-batches of it consumed per process."""

    step: int
    epoch: int
    batch_in_epoch: int


def make_plan(cfg: Config, batches_per_epoch: int, world_size: int, start: Position | None = None) -> RunPlan:
    """The plan of a run from `start` (a resumed run's position; None for a new run).

    With train.epochs the total is counted from `start`, so a run resumed with another number of processes or
    another gradient_accumulation (other steps per epoch) still ends after the configured epochs.
    """
    ga = cfg.train.gradient_accumulation
    steps_per_epoch = math.ceil(batches_per_epoch / ga)
    epochs = cfg.train.epochs or 1
    if cfg.train.max_steps is not None:
        total = cfg.train.max_steps
    elif start is None:
        total = epochs * steps_per_epoch
    elif start.epoch >= epochs:
        total = start.step
    else:
        this_epoch = math.ceil((batches_per_epoch - start.batch_in_epoch) / ga)
        total = start.step + this_epoch + (epochs - start.epoch - 1) * steps_per_epoch
    return RunPlan(batches_per_epoch, cfg.train.batch_size, ga, world_size, total)


def rescale_position(position: Position, saved_world: int, world_size: int, batches_per_epoch: int) -> Position:
    """A position saved by `saved_world` processes, for `world_size` processes: the same global batches consumed.

    Every process consumed `position.batch_in_epoch` of the epoch's global batches dealt round-robin, so
    batch_in_epoch * saved_world global batches are done; rounded down when that does not divide by world_size
    (a few batches are then seen again). A position at or past the end of the epoch moves to the next epoch.
    """
    if saved_world == world_size:
        return position
    batch = position.batch_in_epoch * saved_world // world_size
    if batch >= batches_per_epoch:
        return Position(position.step, position.epoch + 1, 0)
    return Position(position.step, position.epoch, batch)


def format_plan(
    cfg: Config,
    plan: RunPlan,
    paths: OutputPaths,
    *,
    model: str | Sequence[str],
    adapters: dict[str, dict[str, int]],
    data: str,
    groups: Sequence[str] = (),
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """The `--dry-run` report (also printed at the start of a run).

    `model` is one line, or the model line and then how its family and prediction type were found; `warnings`
    are printed under the lr line (e.g. an adaptive optimizer given a small lr), then the optimizer's parameter
    `groups` (optim.format_groups).
    """
    model_lines = [model] if isinstance(model, str) else list(model)
    lines = ["loha-train plan", f"  model       {model_lines[0]}"]
    lines += [f"              {line}" for line in model_lines[1:]]
    for component, row in adapters.items():
        lines.append(f"  adapters    {component}: {row['modules']} modules, {row['params']:,} trainable parameters")
    lines.append(f"  data        {data}")
    t = cfg.train
    lines += [
        f"  processes   {plan.world_size}"
        + (" (data parallel: gradients averaged over them; rank 0 writes every file)" if plan.world_size > 1 else ""),
        f"  batch       {t.batch_size} per process x {t.gradient_accumulation} accumulation x {plan.world_size} "
        f"process(es) = {plan.effective_batch} per optimizer step",
        f"  lr          {t.effective_lr:g} (unet {t.effective_unet_lr:g}, "
        f"text encoder {'/'.join(f'{lr:g}' for lr in dict.fromkeys(t.text_encoder_lrs))}); "
        "never scaled automatically: it applies to the effective batch as given",
        *[f"              {w}" for w in warnings],
        *[f"  lr group    {g}" for g in groups],
        *_scaling_rule(plan),
        f"  steps       {plan.total_steps} ({plan.steps_per_epoch} per epoch, {plan.epochs:.2f} epochs)",
        f"  precision   frozen weights {cfg.model.dtype}, mixed precision {t.mixed_precision}",
        f"  output      {paths.adapter}",
        f"              checkpoints in {paths.checkpoints}"
        + (f" every {t.save_every_steps} steps" if t.save_every_steps else " (at the end and on interrupt)"),
        f"              samples in {paths.samples}, TensorBoard logs in {paths.logs}",
    ]
    lines += [f"  note        {n}" for n in (*plan.notes, *notes)]
    return "\n".join(lines)


def _scaling_rule(plan: RunPlan) -> list[str]:
    """How this multi-process run relates to a single-process one, and when to touch lr."""
    if plan.world_size == 1:
        return []
    return [
        f"  scaling     = 1 process x {plan.gradient_accumulation * plan.world_size} accumulation (the same batches, "
        "noise and adapter up to float rounding, when",
        f"              an epoch's batches divide by {plan.world_size}), so the same lr; change lr only with the "
        "effective batch, e.g. linearly (lr x new/old)",
    ]

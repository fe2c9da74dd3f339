"""A running training: the prepared objects, where the run stands, and what a step does (accumulate, clip, step)
and what the loop asks of it (checkpoint, export, sample, validate)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loha_train.config import Config
from loha_train.fileformat.adapter_io import save_adapter
from loha_train.loha.inject import LoHaNetwork
from loha_train.models.bundle import ModelBundle
from loha_train.training import checkpoint, concept
from loha_train.training.checkpoint import TrainState
from loha_train.training.data_pipeline import DataPipeline, stream_state
from loha_train.training.ema import AdapterEMA
from loha_train.training.grad_check import check_gradients_arrived
from loha_train.training.guards import TrainingError
from loha_train.training.max_norm import apply_max_norm
from loha_train.training.metrics import MetricsLog
from loha_train.training.plan import OutputPaths, RunPlan
from loha_train.training.sampling import generate_live, sample_now
from loha_train.training.setup import may_leave_adapters_unused
from loha_train.training.step import global_micro_index, micro_step, seed_everything_for
from loha_train.training.validation import validation_loss

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """The state of a run between optimizer steps; the recipe (recipe.py) drives it."""

    cfg: Config
    accelerator: Any
    bundle: ModelBundle  # trained models are their prepared (DDP) wrappers
    network: LoHaNetwork
    data: DataPipeline
    plan: RunPlan
    paths: OutputPaths
    models: list[Any]  # the prepared trained models
    optimizer: Any
    lr_scheduler: Any
    log: MetricsLog
    metadata: Callable[[dict[str, Any]], dict[str, str]]  # the adapter file's metadata, given the run's stats
    settings: dict[str, Any]  # what a resumed run must share (resume.resume_settings)
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch consumed per process
    extra: dict[str, Any] = field(default_factory=lambda: {"skipped_steps": 0})
    last_checkpoint: int = -1  # step of the newest checkpoint this run can fall back to
    last_sampled: int = -1
    gradients_checked: bool = False  # the first backward of this process is checked once (grad_check.py)
    norms: tuple[int, float, float] | None = None  # network.scale_weight_norms: (keys scaled, mean, max norm)
    ema: AdapterEMA | None = None  # train.ema: the moving average, updated after every optimizer step

    def epoch_batches(self) -> Iterator[Any]:
        """This epoch's remaining micro-batches (consumed ones skipped after a resume)."""
        self.data.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        return iter(self.data.loader)

    def optimizer_step(self, group: int, batches: Iterator[Any]) -> float:
        """Accumulate `group` micro-batches (gradients synchronised on the last), then step; returns the loss."""
        accelerator, cfg = self.accelerator, self.cfg
        loss_sum = torch.zeros((), device=accelerator.device)
        for j in range(group):
            micro = global_micro_index(j, accelerator.process_index, accelerator.num_processes)
            seed_everything_for(cfg.train.seed, self.step, micro)
            sync = contextlib.nullcontext() if j == group - 1 else self._no_sync()
            with sync, accelerator.autocast():
                loss = micro_step(cfg, self.bundle, accelerator.device, next(batches)) / group
                accelerator.backward(loss)
            loss_sum += loss.detach()
        loss_value = accelerator.reduce(loss_sum, "mean").item()
        if not math.isfinite(loss_value):
            self._non_finite(loss_value)
        else:
            if not self.gradients_checked:
                check_gradients_arrived(
                    self.network, some_may_be_unused=may_leave_adapters_unused(cfg, self.bundle.family)
                )
                self.gradients_checked = True
            if cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(list(self.network.parameters()), cfg.train.max_grad_norm)
            self.optimizer.step()
        if cfg.network.scale_weight_norms:
            self.norms = apply_max_norm(self.network, cfg.network.scale_weight_norms)
        if self.ema is not None and math.isfinite(loss_value):
            self.ema.update(self.network)  # after max-norm: the average follows the weights the file would hold
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def step_scalars(self) -> dict[str, float]:
        """The last step's scalars beyond loss and lr: the lr of every parameter group when there are several, and
        max-norm's counts under kohya's TensorBoard names."""
        lrs = self.lr_scheduler.get_last_lr()
        names = [g.get("name", str(i)) for i, g in enumerate(self.optimizer.param_groups)]
        out = {f"lr/{name}": lr for name, lr in zip(names, lrs, strict=False)} if len(lrs) > 1 else {}
        if self.norms is not None:
            scaled, mean, largest = self.norms
            out.update({"max_norm/keys_scaled": scaled, "norm/avg_key_norm": mean, "max_norm/max_key_norm": largest})
        return out

    def norm_postfix(self) -> dict[str, str]:
        """max-norm's figures for the progress bar, as kohya shows them."""
        if self.norms is None:
            return {}
        return {"Keys Scaled": str(self.norms[0]), "Average key norm": f"{self.norms[1]:.3g}"}

    def advance(self, group: int) -> bool:
        """Count a finished optimizer step of `group` micro-batches; True when it ended the epoch."""
        self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + group
        if self.batch_in_epoch < self.plan.batches_per_epoch:
            return False
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return True

    def save_checkpoint(self) -> Path:
        if (stream := stream_state(self.data, self.accelerator)) is not None:
            self.extra["stream"] = stream  # data.streaming: where each process's stream stands
        state = TrainState(
            self.step,
            self.epoch,
            self.batch_in_epoch,
            self.settings,
            self.plan.world_size,
            extra=self.extra,
            effective_batch=self.plan.effective_batch,
        )
        path = checkpoint.save_checkpoint(
            self.accelerator, self.paths.root, state, self.cfg.train.keep_last_checkpoints
        )
        self.last_checkpoint = self.step
        return path

    def export_adapter(self, path: Path) -> None:
        if self.accelerator.is_main_process:
            counters = {k: v for k, v in self.extra.items() if k != "stream"}  # a stream's position is no stat
            stats = {"steps": self.step, "epoch": self.epoch, "finished_at": time.time(), **counters}
            if self.ema is not None:
                stats["ema_updates"] = self.ema.optimization_step
            with self._weights(self.cfg.output.export_ema):
                save_adapter(self.network, path, dtype=self.cfg.output.save_precision, metadata=self.metadata(stats))
        self.accelerator.wait_for_everyone()

    def sample(self) -> None:
        with self._weights(self.cfg.sample.use_ema):
            sample_now(self.cfg, self.bundle, self.accelerator, self.log, self.paths.samples, self.step)
        self.last_sampled = self.step

    def report_concept(self) -> None:
        """sample.concept: sample once more with the adapter at multiplier 0, write and print the concept report."""
        if self.accelerator.is_main_process:
            self.network.set_multiplier(0.0)
            try:
                at_zero = generate_live(self.cfg, self.bundle, self.accelerator, "with the adapter at multiplier 0")
            finally:
                self.network.set_multiplier(1.0)
            from_zero = self.cfg.network.init_from is None
            print(concept.describe(concept.report(self.cfg, self.paths.samples, self.step, at_zero, from_zero)))
        self.accelerator.wait_for_everyone()

    def validate(self) -> None:
        with self._weights(self.cfg.sample.use_ema):
            loss = validation_loss(self.cfg, self.bundle, self.accelerator, self.data)
        self.log.scalars(self.step, {"val_loss": loss})

    def _weights(self, use_ema: bool) -> contextlib.AbstractContextManager:
        """The EMA weights in the network for the block when asked (and kept), else the trained ones."""
        if use_ema and self.ema is not None:
            return self.ema.swapped(self.network)
        return contextlib.nullcontext()

    def _no_sync(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for m in self.models:
            stack.enter_context(self.accelerator.no_sync(m))
        return stack

    def _non_finite(self, value: float) -> None:
        if self.cfg.train.nan_policy == "skip":
            logger.warning("loss is %s at step %d: skipping this step (train.nan_policy: skip)", value, self.step + 1)
            self.extra["skipped_steps"] = self.extra.get("skipped_steps", 0) + 1
            self.optimizer.zero_grad(set_to_none=True)
            return
        where = (
            f"the last good checkpoint is {checkpoint.checkpoint_path(self.paths.root, self.last_checkpoint)} "
            "(continue from it with `--resume latest` after the change)"
            if self.last_checkpoint >= 0
            else "no checkpoint was written yet"
        )
        raise TrainingError(
            f"The loss became {value} at step {self.step + 1}; training stopped and {where}. Lower train.lr, clip "
            "gradients (train.max_grad_norm > 0), prefer bf16 to fp16 mixed precision, or set train.nan_policy: "
            "skip to skip such steps."
        )

"""The training recipe: build from a Config, run the accelerate loop, checkpoint, sample, export. Read top to bottom."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, export
from .checkpoint import CheckpointError, TrainState
from .config import Config, dump_config
from .inject import inject_loha, sd_components
from .metrics import MetricsLog, loss_curve_png
from .models import ModelBundle, load_models, model_hash
from .plan import OutputPaths, Position, RunPlan, format_plan, make_plan, rescale_position
from .runtime import (
    build_data,
    build_optimizer,
    global_micro_index,
    micro_step,
    provenance,
    resume_settings,
    sample_now,
    seed_everything_for,
    validation_loss,
)

logger = logging.getLogger(__name__)


class TrainingError(Exception):
    """The run cannot go on (a NaN loss, an output folder that holds a finished run, ...)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written at `step` so the run can be resumed."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.path = signum, step, path


def train(
    cfg: Config,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> Path | None:
    """Run (or with dry_run only plan) the training described by `cfg`; returns the final adapter path."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    paths = OutputPaths(Path(cfg.output.dir), cfg.output.name)
    _refuse_sharded_engines()
    resume_from = None if dry_run else _check_output_folder(paths, resume, overwrite)
    ddp = DistributedDataParallelKwargs()  # read at prepare(); find_unused_parameters is set once the family is known
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, step_scheduler_with_optimizer=False, kwargs_handlers=[ddp]
    )
    _check_launch(accelerator)
    main = accelerator.is_main_process

    # --- models, data and adapters ------------------------------------------------------------------------
    bundle = load_models(cfg.model)
    ddp.find_unused_parameters = _may_leave_adapters_unused(cfg, bundle.family)
    bundle.unet.to(accelerator.device)
    bundle.vae.to(accelerator.device)
    for te in bundle.text_encoders:
        te.to(accelerator.device)
    data = build_data(cfg, bundle, accelerator, encode=not dry_run)
    components = sd_components(
        bundle.unet if cfg.network.train_unet else None,
        bundle.text_encoders if cfg.network.train_text_encoder else [],
        family=bundle.family,
    )
    network = inject_loha(components, cfg.network, seed=cfg.train.seed)
    for module in network.modules.values():
        module.to(accelerator.device)
    if cfg.network.init_from:
        state, _ = export.load_adapter(cfg.network.init_from)
        export.apply_adapter(network, state, source=cfg.network.init_from)
    saved = TrainState.read(resume_from) if resume_from is not None else None
    start = _start_position(saved, accelerator.num_processes, len(data.sampler))
    plan = make_plan(cfg, len(data.sampler), accelerator.num_processes, start)
    if main and saved is not None:
        _warn_if_layout_changed(saved, plan)
    if main:
        echo(format_plan(cfg, plan, paths, model=bundle.describe(), adapters=network.report(), data=data.summary))
    if dry_run:
        return None

    # --- optimizer, resume ---------------------------------------------------------------------------------
    trained = [m for m in (bundle.unet, *bundle.text_encoders) if any(p.requires_grad for p in m.parameters())]
    if cfg.train.gradient_checkpointing:
        _enable_gradient_checkpointing(bundle, cfg)
    optimizer, lr_scheduler = build_optimizer(cfg, network, plan.total_steps)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    models, optimizer, lr_scheduler = list(prepared[: len(trained)]), prepared[-2], prepared[-1]
    bundle = _through_wrappers(bundle, trained, models)
    checkpoint.register_adapter_hooks(accelerator, network)
    settings = resume_settings(cfg, data, model_hash(cfg.model.path))
    step, epoch, batch_in_epoch, extra = 0, 0, 0, {"skipped_steps": 0}
    if resume_from is not None and start is not None:
        extra = dict(_resume(accelerator, resume_from, settings).extra)
        step, epoch, batch_in_epoch = start
    if main:
        if overwrite and resume_from is None:
            _start_over(paths)
        paths.root.mkdir(parents=True, exist_ok=True)
        export.write_atomic(paths.config, dump_config(cfg).encode("utf-8"))
    log = MetricsLog(paths.logs, start_step=step, enabled=main)
    if step == 0 and data.problems:
        log.scalars(0, {"skipped_bad_files": data.problems})  # data.skip_bad_images: the count stays in the run log
    meta = provenance(cfg, bundle, data, plan, network)

    def save_checkpoint() -> Path:
        state = TrainState(
            step, epoch, batch_in_epoch, settings, plan.world_size, extra=extra, effective_batch=plan.effective_batch
        )
        return checkpoint.save_checkpoint(accelerator, paths.root, state, cfg.train.keep_last_checkpoints)

    def export_adapter(path: Path) -> None:
        if main:
            stats = {"steps": step, "epoch": epoch, "finished_at": time.time(), **extra}
            export.save_adapter(network, path, dtype=cfg.output.save_precision, metadata=meta(stats))
        accelerator.wait_for_everyone()

    def samples() -> None:
        sample_now(cfg, bundle, accelerator, network, log, paths.samples, step)

    # --- the loop -------------------------------------------------------------------------------------------
    stop = _StopFlag()
    last_checkpoint = step if resume_from is not None else -1
    last_sampled = -1
    if step == 0 and cfg.sample.at_start and cfg.sample.prompts:
        samples()
        last_sampled = 0
    if step == 0 and cfg.train.validation_every_steps and data.validation is not None:
        log.scalars(0, {"val_loss": validation_loss(cfg, bundle, accelerator, data)})  # the untrained baseline
    for m in models:
        m.train()

    def optimizer_step(group: int, batches: Any) -> float:
        """Accumulate `group` micro-batches (gradients synchronised on the last), then step; returns the loss."""
        loss_sum = torch.zeros((), device=accelerator.device)
        for j in range(group):
            seed_everything_for(cfg.train.seed, step, global_micro_index(j, *_rank_and_world(accelerator)))
            sync = contextlib.nullcontext() if j == group - 1 else _no_sync(accelerator, models)
            with sync, accelerator.autocast():
                loss = micro_step(cfg, bundle, accelerator, next(batches)) / group
                accelerator.backward(loss)
            loss_sum += loss.detach()
        loss_value = accelerator.reduce(loss_sum, "mean").item()
        if not math.isfinite(loss_value):
            _non_finite(cfg, loss_value, step, optimizer, extra, last_checkpoint, paths)
        else:
            if cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(list(network.parameters()), cfg.train.max_grad_norm)
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_value

    progress = _progress(plan.total_steps, step, main)
    with stop.installed(), progress:  # the bar is closed however the loop ends, so errors print on their own line
        while step < plan.total_steps:
            data.sampler.set_epoch(epoch, batch_in_epoch)
            batches = iter(data.loader)
            epoch_ended = False
            while not epoch_ended and step < plan.total_steps:
                group = plan.group_size(batch_in_epoch)
                loss_value = optimizer_step(group, batches)
                step, batch_in_epoch = step + 1, batch_in_epoch + group
                epoch_ended = batch_in_epoch >= plan.batches_per_epoch
                if epoch_ended:
                    epoch, batch_in_epoch = epoch + 1, 0
                lr = lr_scheduler.get_last_lr()[0]
                log.scalars(step, {"loss": loss_value, "lr": lr, "epoch": epoch})
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", epoch=epoch)

                if cfg.sample.prompts and (
                    _due(cfg.sample.every_n_steps, step) or (epoch_ended and _due(cfg.sample.every_n_epochs, epoch))
                ):
                    samples()
                    last_sampled = step
                if _due(cfg.train.validation_every_steps, step) and data.validation is not None:
                    log.scalars(step, {"val_loss": validation_loss(cfg, bundle, accelerator, data)})
                if _due(cfg.output.save_adapter_every_steps, step) and step < plan.total_steps:
                    export_adapter(paths.periodic_adapter(step))
                signum = _agreed_signal(accelerator, stop.signum)
                if _due(cfg.train.save_every_steps, step) or signum is not None:
                    last_checkpoint, path = step, save_checkpoint()
                    if signum is not None:
                        progress.close()
                        log.close()
                        raise Interrupted(signum, step, path)

    # --- the end ---------------------------------------------------------------------------------------------
    progress.close()
    if last_checkpoint != step:
        save_checkpoint()
    if cfg.sample.prompts and last_sampled != step:
        samples()
    export_adapter(paths.adapter)
    if main:
        log.close()
        loss_curve_png(log.path, paths.loss_curve)
    return paths.adapter


# --- helpers of the recipe (each used once above; kept here so the recipe reads in one place) -------------------


def _check_output_folder(paths: OutputPaths, resume: str | None, overwrite: bool) -> Path | None:
    """Refuse to clobber a finished or started run; return the checkpoint to resume from, if any."""
    if resume is not None and overwrite:
        raise TrainingError(
            f"--resume continues the run in {paths.root} and --overwrite starts a new one there; pass only one."
        )
    if resume is not None:
        return checkpoint.resolve_resume(paths.root, resume)
    started = checkpoint.list_checkpoints(paths.root)
    if overwrite or not (paths.adapter.exists() or started):
        return None
    what = f"a finished run ({paths.adapter.name})" if paths.adapter.exists() else f"{len(started)} checkpoint(s)"
    raise TrainingError(
        f"The output folder {paths.root} already holds {what}. Use `--resume latest` to continue it, "
        "`--overwrite` to start a new run there (the old run's checkpoints and logs are deleted when it starts; "
        "its adapters and samples are replaced as the new run writes them), or choose another output.dir."
    )


def _start_over(paths: OutputPaths) -> None:
    """--overwrite: delete the old run's checkpoints and logs, so `--resume latest` and the logs see only this run."""
    for folder in (paths.checkpoints, paths.logs):
        if folder.exists():
            shutil.rmtree(folder)


def _resume(accelerator: Any, path: Path, settings: dict[str, Any]) -> TrainState:
    saved = TrainState.read(path)  # refuses a checkpoint of another loha-train version
    changed = checkpoint.settings_differences(saved.settings, settings)
    if changed:
        raise CheckpointError(
            f"Cannot resume from {path}: settings that decide what the adapter learns changed since it was "
            "written: " + "; ".join(changed) + ". Restore them, or start a new run in another output.dir."
        )
    return checkpoint.load_checkpoint(accelerator, path)


def _start_position(saved: TrainState | None, world_size: int, batches_per_epoch: int) -> Position | None:
    """Where a resumed run starts (the checkpoint's position in this run's number of processes); None if new."""
    if saved is None:
        return None
    position = Position(saved.step, saved.epoch, saved.batch_in_epoch)
    return rescale_position(position, saved.world_size, world_size, batches_per_epoch)


def _warn_if_layout_changed(saved: TrainState, plan: RunPlan) -> None:
    """Say what a resume with another number of processes or effective batch keeps and what it changes."""
    changes = []
    if saved.world_size != plan.world_size:
        changes.append(f"{saved.world_size} -> {plan.world_size} processes")
    same_batch = saved.effective_batch in (0, plan.effective_batch)
    if not same_batch:
        changes.append(f"effective batch {saved.effective_batch} -> {plan.effective_batch} (lr is not rescaled)")
    if not changes:
        return
    divisible = saved.batch_in_epoch * saved.world_size % plan.world_size == 0
    outcome = (
        "the remaining steps see the batches and noise an uninterrupted run would (when an epoch's batches "
        "divide evenly by both process counts)"
        if same_batch and divisible
        else "the batches from here on differ from those of an uninterrupted run"
    )
    logger.warning("resuming at step %d with %s: %s", saved.step, "; ".join(changes), outcome)


def _non_finite(
    cfg: Config, value: float, step: int, optimizer: Any, extra: dict[str, Any], last: int, paths: OutputPaths
) -> None:
    if cfg.train.nan_policy == "skip":
        logger.warning("loss is %s at step %d: skipping this step (train.nan_policy: skip)", value, step + 1)
        extra["skipped_steps"] = extra.get("skipped_steps", 0) + 1
        optimizer.zero_grad(set_to_none=True)
        return
    where = (
        f"the last good checkpoint is {checkpoint.checkpoint_path(paths.root, last)} (continue from it with "
        "`--resume latest` after the change)"
        if last >= 0
        else "no checkpoint was written yet"
    )
    raise TrainingError(
        f"The loss became {value} at step {step + 1}; training stopped and {where}. Lower train.lr, clip "
        "gradients (train.max_grad_norm > 0), prefer bf16 to fp16 mixed precision, or set train.nan_policy: skip "
        "to skip such steps."
    )


_SHARDED_ENGINES = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def _refuse_sharded_engines() -> None:
    """Refuse DeepSpeed/FSDP/Megatron up front. Under them accelerate's save_state writes the engine's
    whole-model checkpoint instead of our adapter-only one, DeepSpeed steps the optimizer inside backward (our
    manual accumulation would step on every micro-batch), and ZeRO-3/FSDP shard the frozen weights that the LoHa
    layers read directly."""
    for variable, engine in _SHARDED_ENGINES.items():
        if os.environ.get(variable, "false").lower() in {"1", "true", "yes", "on", "y", "t"}:
            raise TrainingError(
                f"{engine} is not supported (accelerate launched with {variable}): it takes over gradient "
                "accumulation, the optimizer step and the checkpoint format, so runs would not train or resume "
                "as configured. Use plain data parallel: `accelerate launch --multi_gpu --num_processes N` (or "
                "answer NO to DeepSpeed and FSDP in `accelerate config`). The adapter and its optimizer state "
                "are a few MB, so ZeRO-2 sharding would save almost no memory here."
            )


def _check_launch(accelerator: Any) -> None:
    """Refuse launches that would silently train N independent copies, or under a sharded engine."""
    engine = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if engine in {"DEEPSPEED", "FSDP", "MEGATRON_LM"}:
        raise TrainingError(f"accelerate set up {engine}, which loha-train does not support; use plain data parallel.")
    launched = int(os.environ.get("WORLD_SIZE") or accelerator.num_processes)  # unset under mpirun
    if launched != accelerator.num_processes:
        raise TrainingError(
            f"launched as {launched} processes (WORLD_SIZE), but accelerate set up {accelerator.num_processes}: "
            "every process would train alone. Without GPUs, set ACCELERATE_USE_CPU=1 for multi-process CPU "
            "training (gloo); with GPUs, check that each process sees one."
        )


def _may_leave_adapters_unused(cfg: Config, family: str) -> bool:
    """Whether a step can leave some adapter parameters without a gradient, which DDP must be told about:
    module dropout skips whole adapters, and a trained text encoder's last layer is unused with clip_skip > 1
    (and SDXL's first encoder always stops at its penultimate layer)."""
    skips_text_layers = cfg.network.train_text_encoder and (cfg.model.clip_skip > 1 or family == "sdxl")
    return cfg.network.module_dropout > 0 or skips_text_layers


def _through_wrappers(bundle: ModelBundle, raw: list[Any], prepared: list[Any]) -> ModelBundle:
    """The bundle with each trained model replaced by its prepared (DDP) wrapper. DDP synchronises gradients
    only for a backward that follows its own forward, so the loss must call the wrapper, not the module."""
    wrapper = {id(module): wrapped for module, wrapped in zip(raw, prepared, strict=True)}
    return dataclasses.replace(
        bundle,
        unet=wrapper.get(id(bundle.unet), bundle.unet),
        text_encoders=[wrapper.get(id(te), te) for te in bundle.text_encoders],
    )


def _agreed_signal(accelerator: Any, signum: int | None) -> int | None:
    """The stop signal any process has received: all must checkpoint and stop at the same step, or one would
    wait at the checkpoint's barrier while the others wait in the next step's gradient all-reduce."""
    if accelerator.num_processes == 1:
        return signum
    flags = accelerator.gather(torch.tensor([signum or 0], device=accelerator.device))
    return int(flags.max()) or None


def _rank_and_world(accelerator: Any) -> tuple[int, int]:
    return accelerator.process_index, accelerator.num_processes


def _due(every: int | None, count: int) -> bool:
    return bool(every) and count % every == 0  # type: ignore[operator]


def _no_sync(accelerator: Any, models: list[Any]) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    for m in models:
        stack.enter_context(accelerator.no_sync(m))
    return stack


def _enable_gradient_checkpointing(bundle: ModelBundle, cfg: Config) -> None:
    bundle.unet.enable_gradient_checkpointing()
    if cfg.network.train_text_encoder:
        for te in bundle.text_encoders:
            te.gradient_checkpointing_enable()


def _progress(total: int, start: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="training", unit="step", dynamic_ncols=True)


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        logger.warning("received %s: writing a checkpoint after this step", signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once (the checkpoint write is atomic)

    @contextlib.contextmanager
    def installed(self) -> Any:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

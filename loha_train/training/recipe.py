"""The training recipe, top to bottom: refuse what cannot work, set up, loop, save. Each part it names is a small
function or the Session (session.py); the step itself (noise, conditioning, loss) is in step.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from loha_train.config import Config, dump_config
from loha_train.fileformat.adapter_io import write_atomic
from loha_train.models.detect import model_hash
from loha_train.models.loading import load_models
from loha_train.training.charts import loss_curve_png
from loha_train.training.checkpoint import TrainState
from loha_train.training.data_pipeline import build_data, preflight_sources, restore_stream
from loha_train.training.ema import AdapterEMA
from loha_train.training.guards import check_launch, check_output_folder, refuse_sharded_engines, start_over
from loha_train.training.metrics import MetricsLog
from loha_train.training.optim import format_groups, lr_warnings, param_groups
from loha_train.training.plan import OutputPaths, Position, format_plan, make_plan
from loha_train.training.progress import paused
from loha_train.training.provenance import provenance
from loha_train.training.resume import load_resumed, resume_settings, start_position, warn_if_layout_changed
from loha_train.training.session import Session
from loha_train.training.setup import (
    build_network,
    init_from_notes,
    may_leave_adapters_unused,
    prepare_for_training,
    to_device,
)
from loha_train.training.signals import Interrupted, StopFlag, agreed_signal
from loha_train.training.step import check_prediction_type
from loha_train.training.wandb_log import check_wandb, wandb_sink


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

    # --- refuse what cannot work, before anything loads ----------------------------------------------------
    paths = OutputPaths(Path(cfg.output.dir), cfg.output.name)
    refuse_sharded_engines()
    check_wandb(cfg)
    resume_from = check_output_folder(paths, resume, overwrite)  # --dry-run predicts the refusal too
    ddp = DistributedDataParallelKwargs()  # read at prepare(); find_unused_parameters is set once the family is known
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, step_scheduler_with_optimizer=False, kwargs_handlers=[ddp]
    )
    check_launch(accelerator)
    main = accelerator.is_main_process
    preflight_sources(cfg.data)  # an uncached hf: dataset fails now, not after the models load

    # --- models, data, adapters and the plan ---------------------------------------------------------------
    bundle = load_models(cfg.model)
    ddp.find_unused_parameters = may_leave_adapters_unused(cfg, bundle.family)
    to_device(bundle, accelerator.device)
    data = build_data(cfg, bundle, accelerator, encode=not dry_run)
    network = build_network(cfg, bundle, accelerator.device)
    saved = TrainState.read(resume_from) if resume_from is not None else None
    start = start_position(saved, accelerator.num_processes, len(data.sampler))
    plan = make_plan(cfg, len(data.sampler), accelerator.num_processes, start)
    if main and saved is not None:
        warn_if_layout_changed(saved, plan)
    check_prediction_type(cfg, bundle.prediction_type)
    groups = format_groups(param_groups(cfg, network, bundle.family))  # a wrong lr_pattern stops a dry run too
    if main:
        report = {"model": bundle.describe(), "adapters": network.report(), "data": data.summary, "groups": groups}
        notes = (*data.notes, *init_from_notes(cfg, network))
        echo(format_plan(cfg, plan, paths, **report, warnings=lr_warnings(cfg), notes=notes))
    if dry_run:
        return None

    # --- optimizer, resume, the output folder and logs -----------------------------------------------------
    bundle, models, optimizer, lr_scheduler = prepare_for_training(cfg, accelerator, bundle, network, plan.total_steps)
    settings = resume_settings(cfg, data, model_hash(cfg.model.path))
    ema = AdapterEMA(cfg.train.ema, network) if cfg.train.ema is not None else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # saved with every checkpoint, restored by --resume
    position, extra = Position(0, 0, 0), {"skipped_steps": 0}
    if resume_from is not None and start is not None:
        extra, position = dict(load_resumed(accelerator, resume_from, settings).extra), start
        restore_stream(data, accelerator, extra)
    if main:
        if overwrite and resume_from is None:
            start_over(paths)
        paths.root.mkdir(parents=True, exist_ok=True)
        write_atomic(paths.config, dump_config(cfg).encode("utf-8"))
    sink = wandb_sink(cfg, paths.logs, position.step, main)  # logging.wandb: the same scalars and sample grids
    log = MetricsLog(paths.logs, start_step=position.step, enabled=main, sink=sink)
    if position.step == 0 and data.problems:
        log.scalars(0, {"skipped_bad_files": data.problems})  # data.skip_bad_images: the count stays in the run log
    meta = provenance(cfg, bundle, data, plan, network)
    last_checkpoint = position.step if resume_from is not None else -1
    run = Session(cfg, accelerator, bundle, network, data, plan, paths, models, optimizer, lr_scheduler, log, meta,
                  settings, *position, extra=extra, last_checkpoint=last_checkpoint, ema=ema)  # fmt: skip

    # --- the loop ------------------------------------------------------------------------------------------
    if run.step == 0 and cfg.sample.at_start and cfg.sample.prompts:
        run.sample()
    if run.step == 0 and cfg.train.validation_every_steps and data.validation is not None:
        run.validate()  # the untrained baseline
    for m in models:
        m.train()
    stop, progress = StopFlag(), _progress(plan.total_steps, run.step, main)
    with stop.installed(), progress:  # the bar is closed however the loop ends, so errors print on their own line
        while run.step < plan.total_steps:
            batches, epoch_ended = run.epoch_batches(), False
            while not epoch_ended and run.step < plan.total_steps:
                group = plan.group_size(run.batch_in_epoch)
                loss = run.optimizer_step(group, batches)
                epoch_ended = run.advance(group)
                lr = lr_scheduler.get_last_lr()[0]
                log.scalars(run.step, {"loss": loss, "lr": lr, "epoch": run.epoch, **run.step_scalars()})
                progress.update(1)
                progress.set_postfix(
                    {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "epoch": run.epoch, **run.norm_postfix()}
                )

                if cfg.sample.prompts and (
                    _due(cfg.sample.every_n_steps, run.step)
                    or (epoch_ended and _due(cfg.sample.every_n_epochs, run.epoch))
                ):
                    with paused(progress, "sampling"):  # its time stays out of the step rate and ETA
                        run.sample()
                if _due(cfg.train.validation_every_steps, run.step) and data.validation is not None:
                    with paused(progress, "validating"):
                        run.validate()
                if _due(cfg.output.save_adapter_every_steps, run.step) and run.step < plan.total_steps:
                    run.export_adapter(paths.periodic_adapter(run.step))
                signum = agreed_signal(accelerator, stop.signum)
                if _due(cfg.train.save_every_steps, run.step) or signum is not None:
                    path = run.save_checkpoint()
                    if signum is not None:
                        progress.close()
                        log.close()
                        raise Interrupted(signum, run.step, path)

    # --- the end -------------------------------------------------------------------------------------------
    progress.close()
    if run.last_checkpoint != run.step:
        run.save_checkpoint()
    if cfg.sample.prompts and run.last_sampled != run.step:
        run.sample()
    if cfg.sample.concept is not None and cfg.sample.prompts:
        run.report_concept()
    run.export_adapter(paths.adapter)
    if main:
        log.close()
        loss_curve_png(log.path, paths.loss_curve)
    return paths.adapter


def _due(every: int | None, count: int) -> bool:
    return bool(every) and count % every == 0  # type: ignore[operator]


def _progress(total: int, start: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="training", unit="step", dynamic_ncols=True)

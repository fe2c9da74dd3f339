"""Refuse runs that cannot work before they start: sharded engines, bad launches, output folders with another run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from loha_train.config.fs import write_problem
from loha_train.training import checkpoint
from loha_train.training.plan import OutputPaths


class TrainingError(Exception):
    """The run cannot go on (a NaN loss, an output folder that holds a finished run, ...)."""


def check_output_folder(paths: OutputPaths, resume: str | None, overwrite: bool) -> Path | None:
    """Refuse to clobber a finished or started run; return the checkpoint to resume from, if any."""
    if resume is not None and overwrite:
        raise TrainingError(
            f"--resume continues the run in {paths.root} and --overwrite starts a new one there; pass only one."
        )
    if resume is not None:
        return checkpoint.resolve_resume(paths.root, resume)
    started = checkpoint.list_checkpoints(paths.root)
    if overwrite:
        _check_deletable(paths)
    if overwrite or not (paths.adapter.exists() or started):
        return None
    what = f"a finished run ({paths.adapter.name})" if paths.adapter.exists() else f"{len(started)} checkpoint(s)"
    raise TrainingError(
        f"The output folder {paths.root} already holds {what}. Use `--resume latest` to continue it, "
        "`--overwrite` to start a new run there (the old run's checkpoints and logs are deleted when it starts; "
        "its adapters and samples are replaced as the new run writes them), or choose another output.dir."
    )


def _check_deletable(paths: OutputPaths) -> None:
    """--overwrite deletes the old checkpoints and logs: make sure it can, before any model loads."""
    for folder in (paths.root, paths.checkpoints, paths.logs):
        if folder.is_dir() and (problem := write_problem(folder)):
            raise TrainingError(
                f"--overwrite must delete the old run's checkpoints and logs, but {folder} {problem}. "
                "Make the output folder writable or choose another output.dir."
            )


def start_over(paths: OutputPaths) -> None:
    """--overwrite: delete the old run's checkpoints and logs, so `--resume latest` and the logs see only this run."""
    for folder in (paths.checkpoints, paths.logs):
        if folder.exists():
            try:
                shutil.rmtree(folder)
            except OSError as err:
                raise TrainingError(
                    f"--overwrite could not delete the old run's {folder}: {err.strerror} ({err.filename}). "
                    "Make it writable or choose another output.dir; the new run has not started."
                ) from None


_SHARDED_ENGINES = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def refuse_sharded_engines() -> None:
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


def check_launch(accelerator: Any) -> None:
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

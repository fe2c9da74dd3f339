"""Resumable checkpoints: checkpoints/step-NNNNNN/ = accelerate state + adapter + train_state.json, atomic."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loha_train import __version__
from loha_train.loha.inject import LoHaNetwork

CHECKPOINTS = "checkpoints"
STATE_FILE = "train_state.json"
ADAPTER_FILE = "adapter.safetensors"
_NAME = re.compile(r"^step-(\d{6,})$")
_LEFTOVER = re.compile(r"^\.step-\d{6,}\.(tmp|deleting)$")  # what a kill during a save or a rotation leaves


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read, or resumed with the current settings."""


@dataclass(frozen=True)
class TrainState:
    """Where a run stands after an optimizer step; everything needed to continue it exactly."""

    step: int  # optimizer steps done
    epoch: int  # current epoch (0-based)
    batch_in_epoch: int  # micro-batches of this epoch already consumed (per process)
    settings: dict[str, Any]  # the settings a resumed run must share (see training.resume.resume_settings)
    world_size: int = 1
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)  # counters: skipped steps, samples seen, ...
    effective_batch: int = 0  # samples per optimizer step over all processes (0: not recorded)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> TrainState:
        """The state saved in checkpoint folder `path`; CheckpointError if unreadable or from another version."""
        try:
            raw = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
            version = raw.get("version")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"Checkpoint {path} is unreadable ({exc}); pick another one.") from exc
        if version != __version__:  # checked first: another version may store other fields
            raise CheckpointError(
                f"Checkpoint {path} was written by loha-train {version}; this is {__version__}. Resume it with "
                "that version, or start a new run (init from its adapter with network.init_from)."
            )
        try:
            return cls(**raw)
        except TypeError as exc:
            raise CheckpointError(f"Checkpoint {path} is unreadable ({exc}); pick another one.") from exc


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (a readable train_state.json and adapter), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _NAME.match(child.name)
            if match and (child / STATE_FILE).is_file() and (child / ADAPTER_FILE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(output_dir: Path, which: str) -> Path:
    """`latest` -> the newest complete checkpoint of output_dir; anything else is a checkpoint folder path."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            partial = _leftovers(output_dir)
            raise CheckpointError(
                f"--resume latest: no complete checkpoint under {Path(output_dir) / CHECKPOINTS}"
                + (f" (only {partial[0].name}, left incomplete by a run that was killed)" if partial else "")
                + ". Checkpoints are written every train.save_every_steps steps and when a run is interrupted."
            )
        return found[-1][1]
    path = Path(which)
    if not path.exists():
        raise CheckpointError(f"--resume {which}: does not exist. {_existing_checkpoints(output_dir)}")
    if _LEFTOVER.match(path.name):
        raise CheckpointError(
            f"--resume {which}: a partial checkpoint left by a run that was killed while writing or deleting it. "
            + _existing_checkpoints(output_dir)
        )
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {which}: not a complete checkpoint folder (it has no {STATE_FILE}). "
            + _existing_checkpoints(output_dir)
        )
    return path


def _existing_checkpoints(output_dir: Path) -> str:
    """What the user can resume from instead: only checkpoints that exist (the newest few), or that none do."""
    found = [path for _, path in list_checkpoints(output_dir)]
    if not found:
        return f"{Path(output_dir) / CHECKPOINTS} holds no complete checkpoint: start the run without --resume."
    shown = ", ".join(str(p) for p in found[-3:])
    return f"Complete checkpoints of this run: {shown}; `--resume latest` picks the newest."


def register_adapter_hooks(accelerator: Any, network: LoHaNetwork) -> None:
    """Make accelerate's save_state/load_state store only the adapter tensors, not the frozen base model."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        _refuse_non_finite(network)  # on every process, so that all of them stop together
        if accelerator.is_main_process:
            state = {k: v.detach().float().contiguous().cpu() for k, v in network.state_dict().items()}
            save_file(state, str(Path(output_dir) / ADAPTER_FILE))
        weights.clear()  # the base weights are frozen and come from the model files

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()
        network.load_state_dict(load_file(str(Path(input_dir) / ADAPTER_FILE)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _refuse_non_finite(network: LoHaNetwork) -> None:
    """A checkpoint is only ever written with finite weights, so "the last checkpoint" is always a good one."""
    for key, tensor in network.state_dict().items():
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"The adapter tensor {key} holds NaN or inf values (an optimizer step overflowed), so this "
                "checkpoint is not written; the checkpoints written before are intact. Lower train.lr or clip "
                "gradients (train.max_grad_norm), then continue with --resume latest."
            )


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState, keep_last: int) -> Path:
    """Write a checkpoint into a temporary folder and rename it into place, then drop old ones.

    A kill at any moment leaves either the previous set of checkpoints or the new one complete (plus a hidden
    partial folder, which list_checkpoints ignores and the next save removes). A failed write removes the partial
    folder and raises OSError(ENOSPC) for a full disk, CheckpointError otherwise; nothing good is replaced.
    """
    final = checkpoint_path(output_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        for leftover in _leftovers(output_dir):
            _remove(leftover)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(state.to_json(), encoding="utf-8")
            _fsync_tree(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            doomed = final.with_name(f".{final.name}.deleting")
            if final.exists():  # the same step saved again (resumed from an older one): renamed away, never half
                os.replace(final, doomed)  # deleted under its own name, where --resume latest would pick it
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            _remove(doomed)
            rotate_checkpoints(output_dir, keep_last)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save reports a full disk as a RuntimeError
        full = accelerator.is_main_process and disk_full(exc, tmp)
        if accelerator.is_main_process:
            _remove(tmp)
        raise _write_error(final, exc, full) from exc
    except BaseException:
        if accelerator.is_main_process:
            _remove(tmp)
        raise
    accelerator.wait_for_everyone()
    return final


def disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT anywhere in the exception chain, the message of a
    library that drops the errno (safetensors: "No space left on device (os error 28)"), or, given `where`, less
    than 1 MiB free there."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(cause) or "Disk quota exceeded" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    if where is None:
        return False
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def _write_error(final: Path, exc: BaseException, disk_full: bool) -> Exception:
    if disk_full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))
    reason = (str(exc).strip().splitlines() or [""])[0]
    return CheckpointError(
        f"Could not write checkpoint {final} ({type(exc).__name__}: {reason}). The partial checkpoint was removed; "
        "the checkpoints written before are intact."
    )


def load_checkpoint(accelerator: Any, path: Path) -> TrainState:
    """Restore adapter, optimizer, scheduler, grad scaler and RNG states; return the saved TrainState."""
    state = TrainState.read(path)
    try:
        accelerator.load_state(str(path))  # torch.load(weights_only=True) for its .bin/.pkl files: no code runs
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"Checkpoint {path} holds a state file with Python objects besides tensors; loha-train never unpickles "
            "those (that could run arbitrary code). Was the folder modified? Resume from another checkpoint."
        ) from exc
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, SafetensorError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"Checkpoint {path} could not be loaded ({type(exc).__name__}: {reason}); pass an earlier checkpoint "
            "folder to --resume."
        ) from exc
    return state


def rotate_checkpoints(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last complete checkpoints (renamed away first, so never half-deleted)."""
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        doomed = path.with_name(f".{path.name}.deleting")
        os.replace(path, doomed)
        _remove(doomed)


def settings_differences(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """Human-readable list of resume-critical settings that changed, by dotted key.

    A setting the checkpoint lacks (it was written before the setting existed) matches only that setting's
    default from `defaults`: the older run behaved as the default does, so a new option left at its default
    keeps such checkpoints resumable, and one turned on is refused.
    """
    defaults = defaults or {}

    def differs(key: str) -> bool:
        if key not in saved and key in defaults:
            return current.get(key) != defaults[key]
        return saved.get(key) != current.get(key)

    def was(key: str) -> str:
        return repr(saved[key]) if key in saved else "no such setting (written by an older loha-train)"

    return [
        f"{k}: checkpoint has {was(k)}, config has {current.get(k)!r}" for k in sorted(saved | current) if differs(k)
    ]


def _leftovers(output_dir: Path) -> list[Path]:
    """Hidden partial folders of checkpoints being written or deleted when a run was killed."""
    root = Path(output_dir) / CHECKPOINTS
    return sorted(p for p in root.iterdir() if _LEFTOVER.match(p.name)) if root.is_dir() else []


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

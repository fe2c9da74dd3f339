"""Fault injection on real processes: SIGKILL mid-step, mid-checkpoint and mid-export, SIGTERM, and Ctrl-C to the
process group; every time `--resume latest` continues, and the final adapter equals an uninterrupted run's."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_reliability import assert_same_adapter, checkpoints, config, loha, snapshot

from loha_train.fileformat import adapter_io
from loha_train.training.checkpoint import resolve_resume
from loha_train.training.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")]

FAULT_RUN = Path(__file__).with_name("fault_run.py")
SETS = {"train__save_every_steps": 2, "output__save_adapter_every_steps": 4}  # 8 steps, keep the last 3 checkpoints


def faulty(fault: str, n: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`loha-train ARGS` in a new process (and process group) with `fault` injected at `n` (see fault_run.py)."""
    command = [sys.executable, str(FAULT_RUN), fault, str(n), "--", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, start_new_session=True)


def resume_command(stderr: str) -> list[str]:
    """The arguments of the `loha-train ... --resume latest` command that an interrupted run printed."""
    line = stderr.split("Resume with:\n", 1)[1].strip().splitlines()[0]
    program, *args = shlex.split(line)
    assert program == "loha-train" and args[-2:] == ["--resume", "latest"], line
    return args


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, builtin_cache: Path) -> Path:
    from accelerate.state import AcceleratorState

    from loha_train import cli

    tmp = tmp_path_factory.mktemp("uninterrupted")
    AcceleratorState._reset_state(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): GEMM rounding depends on the thread count
    try:
        assert cli.main([str(config(tmp, **SETS))]) == 0
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
    return tmp / "out"


def test_sigkill_anywhere_then_resume_latest_ends_with_the_uninterrupted_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: Path
) -> None:
    out, path = tmp_path / "out", config(tmp_path, **SETS)

    # 1. killed after step 3 was logged, between checkpoints
    done = faulty("kill-after-step", 3, path)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert checkpoints(out) == ["step-000002"]
    assert [r["step"] for r in read_metrics(out / "logs/metrics.jsonl")] == [1, 2, 3]
    good = snapshot(out / "checkpoints/step-000002")

    # 2. resumed, then killed while writing the step-4 checkpoint (its adapter file half written, not renamed)
    done = faulty("kill-in-checkpoint", 1, path, "--resume", "latest")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert checkpoints(out) == [".step-000004.tmp", "step-000002"]
    assert snapshot(out / "checkpoints/step-000002") == good, "the previous checkpoint changed"
    assert resolve_resume(out, "latest") == out / "checkpoints/step-000002", "latest must skip the partial folder"

    # 3. resumed, then stopped by SIGTERM after step 5: a checkpoint, exit 143 and the command to resume
    done = faulty("term-after-step", 5, path, "--resume", "latest")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert f"a checkpoint was written to {out / 'checkpoints/step-000005'}. Resume with:" in done.stderr
    assert checkpoints(out) == ["step-000002", "step-000004", "step-000005"], "the partial folder was not removed"

    # 4. the printed command, killed halfway through the final export: the previous export stays valid
    previous = out / "loha.safetensors"
    shutil.copy(out / "loha-step-000004.safetensors", previous)  # stands for an earlier finished export
    before = previous.read_bytes()
    done = faulty("kill-in-export", 0, *resume_command(done.stderr))
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert previous.read_bytes() == before
    adapter_io.load_adapter(previous)  # still a valid LoHa file
    assert len(list(out.glob("loha.safetensors.tmp-*"))) == 1, "the torn temporary file is next to it"
    assert checkpoints(out) == ["step-000005", "step-000006", "step-000008"]

    # 5. resume latest: nothing left to train; it exports again, and removes the dead writer's temporary file
    assert loha([path, "--resume", "latest"], capsys)[0] == 0
    assert sorted(p.name for p in out.glob("loha*.safetensors*")) == [
        "loha-step-000004.safetensors",
        "loha.safetensors",
    ]
    assert_same_adapter(out / "loha.safetensors", reference / "loha.safetensors")
    assert_same_adapter(out / "loha-step-000004.safetensors", reference / "loha-step-000004.safetensors")
    assert read_metrics(out / "logs/metrics.jsonl") == read_metrics(reference / "logs/metrics.jsonl")


def test_ctrl_c_to_the_process_group_with_dataloader_workers_checkpoints_once_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference: Path
) -> None:
    out, path = tmp_path / "out", config(tmp_path, **SETS, data__num_workers=1)
    done = faulty("int-group-after-step", 3, path)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr.count("received SIGINT") == 1, "a dataloader worker reacted to Ctrl-C"
    assert "Traceback" not in done.stderr
    assert checkpoints(out) == ["step-000002", "step-000003"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as every other part of this run (see `reference`)
    try:
        assert loha(resume_command(done.stderr), capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    assert_same_adapter(out / "loha.safetensors", reference / "loha.safetensors")

"""Test helper, not a test: run the loha-train CLI with one fault injected at a deterministic point.

    python tests/fault_run.py FAULT N -- CONFIG.yaml [loha-train options]

FAULT is one of
  kill-after-step      SIGKILL right after step N's loss line is written to logs/metrics.jsonl (mid-run)
  kill-in-checkpoint   SIGKILL while the N-th checkpoint of this process is being written: its adapter file is
                       written half, in the temporary folder, and the process dies before the rename
  kill-in-export       SIGKILL while the final adapter is being written: half of its temporary file is on
                       disk and the process dies before the rename
  term-after-step      SIGTERM to this process after step N is logged (a `kill PID`)
  int-group-after-step SIGINT to the whole process group after step N is logged (Ctrl-C in a terminal; the
                       group includes dataloader workers)
The faults are monkeypatches applied here, so the library carries no test hooks.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _after_step(n: int, act: Any) -> None:
    from loha_train.training import metrics

    original = metrics.MetricsLog.scalars

    def scalars(self: Any, step: int, values: dict[str, float]) -> None:
        original(self, step, values)
        if step == n and "loss" in values:
            act()

    metrics.MetricsLog.scalars = scalars  # type: ignore[method-assign]


def _in_checkpoint(n: int) -> None:
    from loha_train.training import checkpoint

    original = checkpoint.save_file
    calls = 0

    def save_file(tensors: dict[str, Any], filename: str, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        original(tensors, filename, *args, **kwargs)
        if calls == n:
            path = Path(filename)
            assert path.parent.name.endswith(".tmp"), path  # the checkpoint is written into its temporary folder
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            _die()

    checkpoint.save_file = save_file


def _in_export() -> None:
    from loha_train.fileformat import adapter_io

    original = adapter_io._publish

    def publish(tmp: Path, path: Path) -> None:
        if path.suffix == ".safetensors" and "-step-" not in path.name:  # the final adapter, not a periodic one
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
            _die()
        original(tmp, path)

    adapter_io._publish = publish


FAULTS = {
    "kill-after-step": lambda n: _after_step(n, _die),
    "kill-in-checkpoint": _in_checkpoint,
    "kill-in-export": lambda n: _in_export(),
    "term-after-step": lambda n: _after_step(n, lambda: os.kill(os.getpid(), signal.SIGTERM)),
    "int-group-after-step": lambda n: _after_step(n, lambda: os.killpg(os.getpgid(0), signal.SIGINT)),
}


def main(argv: list[str]) -> int:
    fault, n, separator, *cli_args = argv
    assert separator == "--", "usage: fault_run.py FAULT N -- CONFIG.yaml [options]"
    FAULTS[fault](int(n))
    from loha_train import cli

    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Stopping on SIGINT/SIGTERM: a flag checked at step boundaries, agreed over all processes, and the exception."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written at `step` so the run can be resumed."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.path = signum, step, path


class StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        logger.warning("received %s: writing a checkpoint after this step", signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once (the checkpoint write is atomic)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def agreed_signal(accelerator: Any, signum: int | None) -> int | None:
    """The stop signal any process has received: all must checkpoint and stop at the same step, or one would
    wait at the checkpoint's barrier while the others wait in the next step's gradient all-reduce."""
    if accelerator.num_processes == 1:
        return signum
    flags = accelerator.gather(torch.tensor([signum or 0], device=accelerator.device))
    return int(flags.max()) or None

"""Progress bars for what a run waits on besides training steps: image checks, latent/text caching, sampling.

Bars appear only once an operation has run for DELAY seconds, so quick runs stay quiet and slow ones show counts
and an ETA. Time spent sampling or validating is taken out of the training bar's clock, so its step rate and
ETA count training steps only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm.auto import tqdm

DELAY = 2.0  # seconds before a bar shows itself

Progress = Callable[[int, int], None]  # (done, total)


@contextlib.contextmanager
def counter(desc: str, *, enabled: bool = True, unit: str = "image", position: int = 0) -> Iterator[Progress]:
    """A `progress(done, total)` callback drawing a bar (created at the first call, when the total is known)."""
    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(
                total=total, desc=desc, unit=unit, disable=not enabled, delay=DELAY, leave=False,
                position=position, dynamic_ncols=True,
            )  # fmt: skip
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def paused(bar: Any, status: str | None = None) -> Iterator[None]:
    """Stop `bar`'s clock meanwhile (its rate and ETA then leave this time out); show `status` as its postfix."""
    start = time.monotonic()
    if status is not None and not getattr(bar, "disable", True):
        bar.set_postfix_str(status)
    try:
        yield
    finally:
        if not getattr(bar, "disable", True):
            spent = time.monotonic() - start
            bar.start_t += spent  # tqdm's elapsed time and smoothed rate are measured from these
            bar.last_print_t += spent

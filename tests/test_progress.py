"""Progress while a run waits: bars with counts for long preparations, and sampling kept out of the step rate."""

from __future__ import annotations

import io
import time

import pytest
from tqdm import tqdm

from loha_train.training import progress


def test_time_spent_sampling_is_not_in_the_step_rate() -> None:
    bar = tqdm(total=10, file=io.StringIO(), mininterval=0, miniters=1)
    time.sleep(0.2)
    bar.update(2)
    with progress.paused(bar, "sampling"):
        time.sleep(1.0)  # a slow sample
    bar.update(2)
    elapsed = bar.format_dict["elapsed"]
    assert elapsed < 0.6, f"the bar counts {elapsed:.2f} s for 4 steps that trained in about 0.2 s"
    assert "sampling" in bar.postfix


def test_a_long_preparation_shows_counts_and_an_eta(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.0)
    with progress.counter("caching latents") as update:
        for done in range(1, 5):
            update(done, 4)
            time.sleep(0.05)
    err = capsys.readouterr().err
    assert "caching latents:" in err and "/4 [00:00<00:00" in err  # counts of the total, elapsed<remaining


def test_a_quick_preparation_stays_silent(capsys) -> None:
    with progress.counter("checking images") as update:
        update(1, 1)
    assert capsys.readouterr().err == ""

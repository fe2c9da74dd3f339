"""scripts/gpu_check.sh --dry: the GPU check's every step, on the CPU at tiny sizes, ends in a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_a_complete_report(tmp_path: Path, builtin_cache: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "LOHA_TRAIN_CACHE": str(builtin_cache)}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
        check=False,
    )
    report = json.loads((out / "report.json").read_text())
    failed = {s["step"]: (out / f"{s['step']}.log").read_text()[-2000:] for s in report["steps"] if s["exit_status"]}
    assert done.returncode == 0 and report["ok"], (failed, report["tests"], done.stderr[-3000:])
    assert [s["step"] for s in report["steps"]] == [
        "tests", "bench-bf16", "bench-fp32", "loop-1", "loop-2", "bench-compiled",
    ]  # fmt: skip
    assert report["tests"]["tests"] >= 50 and report["tests"]["failures"] == 0  # the CUDA tests ran, on the CPU
    assert report["tests"]["skipped"] <= 1  # only fp16 training, which accelerate runs on a GPU only
    assert {r["variant"] for r in report["bench"]["bf16"]} == {"base", "loha_train", "peft_lora", "peft", "lycoris"}
    assert report["bench"]["compiled"][0]["config"]["compile"] == "aot_eager"
    loops = report["loop"]
    assert [(r["batch"], r["gradient_checkpointing"]) for r in loops] == [(1, False), (2, True)]
    for row in loops:
        parts = row["per_step_s"]
        assert parts["forward"] > 0 and parts["backward"] > 0 and parts["total"] > parts["forward"]
        assert row["peak_memory_bytes"] > 0
    text = (out / "report.md").read_text()
    for heading in ("## CUDA tests", "## One training step, bf16", "## torch.compile", "## The whole loop"):
        assert heading in text

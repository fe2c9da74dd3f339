"""scripts/bench.py still runs end to end on the tiny model and writes rows of the documented schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
ROW_TYPES = {
    "variant": str,
    "median_s": float,
    "median_cpu_s": float,
    "step_times_s": list,
    "losses": list,
    "peak_mem_bytes": int,
    "trainable_params": int,
    "wrapped_modules": int,
    "config": dict,
}


@pytest.mark.slow
def test_bench_tiny_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(SCRIPT), "--model", "tiny", "--latent", "8", "--steps", "1", "--warmup", "0"]
    argv += ["--variants", "loha_train,base", "--threads", "1", "--rounds", "2", "--flops", "--json", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| loha_train |" in proc.stdout and "| base |" in proc.stdout

    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["loha_train", "base"]
    for row in rows:
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind), (row["variant"], key, row.get(key))
        assert row["median_s"] > 0 and row["peak_mem_bytes"] > 0
        assert len(row["step_times_s"]) == 2 and len(row["round_medians_s"]) == 2  # one step from each round
        assert len(row["losses"]) == 1 and row["gflops_per_step"] > 0
        assert row["config"]["model"] == "tiny" and row["config"]["rounds"] == 2
    loha, base = rows
    assert loha["trainable_params"] > 0 and loha["wrapped_modules"] > 0
    assert base["trainable_params"] == 0 and base["wrapped_modules"] == 0
    assert loha["losses"][0] == pytest.approx(base["losses"][0], rel=1e-5)  # zero-init delta: same first loss
    assert loha["time_vs_base"] == pytest.approx(loha["median_s"] / base["median_s"])
    assert loha["gflops_per_step"] > base["gflops_per_step"]  # the adapter's products are counted (oneDNN's too)

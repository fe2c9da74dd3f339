"""Assemble scripts/gpu_check.sh's outputs into OUT/report.md and OUT/report.json (exit 1 if a step failed)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from bench import add_ratios, markdown_table  # noqa: E402  (imports no torch)
from bench_loop import markdown as loop_table  # noqa: E402


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "cuda": torch.version.cuda,
            "device": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(),
        }
    return env


def read_steps(out: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (out / "steps.tsv").read_text(encoding="utf-8").splitlines():
        name, rc, seconds = line.split("\t")
        rows.append({"step": name, "exit_status": int(rc), "seconds": int(seconds), "timed_out": rc in ("124", "137")})
    return rows


def read_tests(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return counts | {"failed": failed}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def compile_comparison(eager: list[dict[str, Any]] | None, compiled: list[dict[str, Any]] | None) -> str:
    if not eager or not compiled:
        return "no comparison (a run is missing; see steps)"
    e = next((r for r in eager if r["variant"] == "loha_train"), None)
    c = compiled[0]
    if e is None:
        return "no eager loha_train row"
    return (
        f"loha_train eager {e['median_s']:.3f} s/step, compiled {c['median_s']:.3f} s/step "
        f"({e['median_s'] / c['median_s']:.2f}x); first losses {e['losses'][0]:.6f} vs {c['losses'][0]:.6f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dry", type=int, default=0)
    args = p.parse_args(argv)
    out: Path = args.out
    steps, tests = read_steps(out), read_tests(out / "tests.xml")
    bench = {name: read_json(out / f"bench-{name}.json") for name in ("bf16", "fp32", "compiled")}
    loops = [row for path in sorted(out.glob("loop-*.json")) if (row := read_json(path))]
    report = {"dry": bool(args.dry), "environment": environment(), "steps": steps, "tests": tests}
    report |= {"bench": bench, "loop": loops}
    ok = all(s["exit_status"] == 0 for s in steps) and tests["tests"] > 0 and not tests["failed"]
    report["ok"] = ok

    md = [f"# GPU check{' (dry run on the CPU)' if args.dry else ''}", "", f"Environment: `{report['environment']}`"]
    md += ["", "## Steps", "", "| step | exit status | seconds |", "|---|--:|--:|"]
    md += [
        f"| {s['step']} | {s['exit_status']}{' (timed out)' if s['timed_out'] else ''} | {s['seconds']} |"
        for s in steps
    ]
    failed = tests["failures"] + tests["errors"]
    listed = ": " + ", ".join(tests["failed"]) if tests["failed"] else ""
    md += ["", "## CUDA tests", "", f"{tests['tests']} run, {tests['skipped']} skipped, {failed} failed{listed}"]
    for name in ("bf16", "fp32"):
        if bench[name]:
            add_ratios(bench[name])
            md += ["", f"## One training step, {name}", "", markdown_table(bench[name])]
    eager = bench["fp32"] if args.dry else bench["bf16"]  # the compiled run uses the loop's precision
    md += ["", "## torch.compile", "", compile_comparison(eager, bench["compiled"])]
    if loops:
        md += ["", "## The whole loop (seconds per optimizer step, steady state)", "", loop_table(loops)]
    md += ["", f"Result: {'OK' if ok else 'FAILED'}", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

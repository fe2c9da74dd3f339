"""Benchmark one SD training step: loha_train LoHa vs PEFT LoHa, PEFT LoRA, LyCORIS LoHa and the frozen base.

Usage (defaults reproduce the reference setting: SD1.5-architecture UNet with random weights, CPU, all cores,
batch 1, 32x32 latents, rank 8, alpha 8, LoHa on attention/feed-forward/proj/ResNet layers, CP on k x k convs,
fused AdamW at lr 1e-4 for every adapter variant, as loha-train's trainer steps):

    .venv/bin/python scripts/bench.py                         # all five variants, 1 warm-up + 5 measured steps
    .venv/bin/python scripts/bench.py --variants base,loha_train --steps 3 --json bench.json
    .venv/bin/python scripts/bench.py --model tiny --steps 1  # seconds-long smoke run
    .venv/bin/python scripts/bench.py --device cuda --dtype bf16 --gradient-checkpointing

Each variant runs in its own process (this script with `--worker`), so peak memory and allocator state do not
leak between variants; the worker writes its result row as JSON to a temporary file (library log lines on its
stdout go to this process's stderr). A "training step" is: forward with a random timestep batch and random
encoder_hidden_states (77 tokens; with --text-encoder, random token ids through the CLIP text encoder), MSE loss
against a random noise target, backward, AdamW step and zero_grad. The `base` variant has no adapter and no
optimizer: forward + backward to the input latents (which require grad, so backward runs through the whole
frozen UNet). Inputs and base weights are identical across variants (same seeds), so every variant's first loss
equals the base loss: LoHa and LoRA start with a zero delta.

Time: wall time per step (CUDA-synchronised), median over the measured steps; "CPU s/step" is the process's user +
system time per step. On a shared CPU machine, CPU time well below threads x wall time means the steps did not get
their cores: the table then adds a NOTE, and such times are not comparable. `--keep-freed-memory` stops glibc from
handing freed activations back to the kernel (otherwise every SD1.5 step page-faults ~2.4 GB back in), which is
faster and steadier; it is off by default so the numbers match an untuned process. `--flops` adds the matmul/conv
FLOPs of one extra step, a noise-free measure of the work each variant adds.
oneDNN: on CPU, loha_train's fused kernels run their products through oneDNN (loha_train/loha/gemm.py), including the
frozen Linear's input-gradient product; `LOHA_TRAIN_ONEDNN=0 scripts/bench.py ...` measures them on torch.mm.
Memory: on CPU, `peak_mem_bytes` is the worker's peak RSS (VmHWM, including model construction) and
`train_peak_mem_bytes` the peak RSS while stepping (VmHWM reset through /proc/self/clear_refs after setup); on
CUDA, torch.cuda.max_memory_allocated over the same two spans.
Precision: `--dtype bf16|fp16` casts the frozen base weights to that dtype, keeps adapter parameters (and AdamW
state) in fp32, and runs forward under torch.autocast; no grad scaler (timing only). CPU runs should stay fp32.
JSON (`--json`): a list of rows, one per variant: variant, median_s, step_times_s, median_cpu_s, peak_mem_bytes,
train_peak_mem_bytes, trainable_params, wrapped_modules, losses, gflops_per_step, ratios (time_vs_base,
time_vs_peft, mem_vs_base, mem_vs_peft; null where that variant was not run) and the shared config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
for _path in (REPO, SCRIPTS):  # run as a file, from any directory, without installing the package
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_variants import DEFAULT_VARIANTS, DTYPES, LOHA_VARIANTS, SEED, VARIANTS, run_worker  # noqa: E402  (imports no torch)

# glibc returns big freed blocks to the kernel (mmap threshold, heap trimming), so every CPU step page-faults its
# activations back in: ~600k faults (~2.4 GB zeroed) per SD1.5 step at 32x32 latents. These keep them in the heap.
KEEP_FREED_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's largest allowed threshold
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
    "MALLOC_TOP_PAD_": str(2**30),
}


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("sd15", "tiny"), default="sd15", help="SD1.5 architecture or the tiny one")
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8, help="LoHa/LoRA rank, also for k x k convs")
    p.add_argument("--alpha", type=float, default=8.0, help="alpha, also for k x k convs")
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps before them")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the variant list this many times in turn, pooling each variant's steps",
    )
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="base weights + autocast; adapters stay fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compiled during the warm-up)")
    p.add_argument(
        "--compile-backend",
        choices=("inductor", "aot_eager", "eager"),
        default="inductor",
        help="with --compile; aot_eager traces without generating code (the CPU dry run of gpu_check.sh)",
    )
    p.add_argument("--text-encoder", action="store_true", help="also run and adapt the CLIP text encoder")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--json", type=Path, default=None, help="write the result rows here")
    p.add_argument("--profile", type=Path, default=None, help="folder for a torch.profiler table per variant")
    p.add_argument("--flops", action="store_true", help="count matmul/conv FLOPs of one extra step (noise-free)")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory in the workers (no page faults per step; see KEEP_FREED_MEMORY_ENV)",
    )
    p.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown or 'empty list'}; valid: {', '.join(VARIANTS)}")
    for name in ("latent", "batch", "rank", "steps", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the first step compiles)")
    return args


# ----------------------------------------------------------------------------------------------- the parent
def worker_argv(args: argparse.Namespace, variant: str, result_file: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--result-file", str(result_file)]
    for name in ("model", "latent", "batch", "rank", "alpha", "steps", "warmup", "device", "dtype", "seed"):
        argv += [f"--{name}", str(getattr(args, name))]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    if args.compile:
        argv += ["--compile", "--compile-backend", args.compile_backend]
    if args.text_encoder:
        argv.append("--text-encoder")
    if args.profile is not None:
        argv += ["--profile", str(args.profile)]
    if args.flops:
        argv.append("--flops")
    if args.keep_freed_memory:  # the environment does the work; the flag only records it in the row
        argv.append("--keep-freed-memory")
    return argv


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any] | None:
    """Run one variant in a fresh process (its stdout, library logs, goes to our stderr); None if it failed."""
    with tempfile.TemporaryDirectory(prefix="loha-bench-") as tmp:
        result_file = Path(tmp) / "row.json"
        print(f"[bench] {variant}: starting worker", file=sys.stderr, flush=True)
        env = {**os.environ, **(KEEP_FREED_MEMORY_ENV if args.keep_freed_memory else {})}
        proc = subprocess.run(worker_argv(args, variant, result_file), stdout=sys.stderr, env=env, check=False)
        if proc.returncode != 0 or not result_file.exists():
            print(f"[bench] {variant}: worker failed with exit code {proc.returncode}", file=sys.stderr, flush=True)
            return None
        return json.loads(result_file.read_text())


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Time and memory ratios to the frozen base and to PEFT LoHa, where those were run."""
    by_name = {r["variant"]: r for r in rows}
    for ref_name, label in (("base", "base"), ("peft", "peft")):
        ref = by_name.get(ref_name)
        for row in rows:
            row[f"time_vs_{label}"] = row["median_s"] / ref["median_s"] if ref else None
            row[f"mem_vs_{label}"] = row["peak_mem_bytes"] / ref["peak_mem_bytes"] if ref else None


def check_agreement(rows: list[dict[str, Any]]) -> list[str]:
    """Adapters must wrap the same modules, the LoHa ones train equally many parameters, and all start at base."""
    adapted = [r for r in rows if r["variant"] != "base"]
    loha = [r for r in rows if r["variant"] in LOHA_VARIANTS]
    problems = []
    if len({r["wrapped_names_sha256"] for r in adapted}) > 1:
        problems.append("the adapters wrapped different module sets: " + _summary(adapted, "wrapped_modules"))
    if len({r["trainable_params"] for r in loha}) > 1:
        problems.append("LoHa variants disagree on trainable parameters: " + _summary(loha, "trainable_params"))
    base = [r["losses"][0] for r in rows if r["variant"] == "base"]
    for row in rows:
        first = row["losses"][0]
        if base and abs(first - base[0]) > 1e-4 * max(abs(base[0]), 1e-12):
            problems.append(f"{row['variant']}: first loss {first:.6g} != base loss {base[0]:.6g} (zero-init delta)")
    return problems


def contention_notes(rows: list[dict[str, Any]]) -> list[str]:
    """CPU runs whose steps got clearly less CPU time than threads x wall time shared their cores."""
    notes = []
    for row in rows:
        cfg = row["config"]
        busy = row["median_cpu_s"] / (cfg["threads"] * row["median_s"])
        if cfg["device"] == "cpu" and busy < 0.8:
            notes.append(
                f"{row['variant']}: its steps used {busy:.0%} of {cfg['threads']} threads x wall time; the cores "
                "were shared (another process?), so its times are inflated"
            )
    return notes


def _summary(rows: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{r['variant']}={r[key]:,}" for r in rows)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| variant | wrapped modules | trainable params | median s/step | vs base | vs PEFT LoHa | CPU s/step "
        "| GFLOP/step | peak mem GiB | vs base | vs PEFT LoHa | train peak GiB |"
    )
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        train_peak = r["train_peak_mem_bytes"]
        lines.append(
            f"| {r['variant']} | {r['wrapped_modules']} | {r['trainable_params']:,} | {r['median_s']:.3f} "
            f"| {_ratio(r['time_vs_base'])} | {_ratio(r['time_vs_peft'])} | {r['median_cpu_s']:.2f} "
            f"| {_fmt(r['gflops_per_step'], '.1f')} | {r['peak_mem_bytes'] / 2**30:.2f} "
            f"| {_ratio(r['mem_vs_base'])} | {_ratio(r['mem_vs_peft'])} "
            f"| {_fmt(None if train_peak is None else train_peak / 2**30, '.2f')} |"
        )
    return "\n".join(lines)


def describe(cfg: dict[str, Any]) -> str:
    te = " + text encoder" if cfg["text_encoder"] else ""
    extras = ", gradient checkpointing" if cfg["gradient_checkpointing"] else ""
    extras += ", glibc keeps freed memory" if cfg["keep_freed_memory"] else ""
    return (
        f"One {cfg['model']} UNet{te} training step (random weights, {cfg['device']}, {cfg['dtype']}, "
        f"{cfg['threads']} threads, batch {cfg['batch']}, {cfg['latent']}x{cfg['latent']} latents, rank "
        f"{cfg['rank']}, alpha {cfg['alpha']:g}{extras}); median of {cfg['steps']} steps after {cfg['warmup']} warm-up"
        + (f", pooled over {cfg['rounds']} interleaved rounds." if cfg.get("rounds", 1) > 1 else ".")
    )


def run_rounds(args: argparse.Namespace) -> dict[str, dict[str, Any] | None]:
    """Every variant once per round, the rounds one after another (a slow drift of a shared machine then hits
    every variant alike); each variant's rounds pooled into one row; None for a variant whose worker failed."""
    done: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    failed: set[str] = set()
    for number in range(args.rounds):
        if args.rounds > 1:
            print(f"[bench] round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
        for variant in args.variants:
            if variant in failed:  # a failed worker does not lose the others
                continue
            row = run_variant(args, variant)
            if row is None:
                failed.add(variant)
            else:
                done[variant].append(row)
    return {v: None if v in failed else pool_rounds(rows) for v, rows in done.items()}


def pool_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a variant's rounds: medians over all their measured steps, the highest memory peaks."""
    if len(rows) == 1:
        return rows[0]
    config = {**rows[0]["config"], "rounds": len(rows)}
    times = [t for r in rows for t in r["step_times_s"]]
    cpu = [c for r in rows for c in r["step_cpu_s"]]
    train_peaks = [r["train_peak_mem_bytes"] for r in rows]
    return {
        **rows[0],
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "median_cpu_s": statistics.median(cpu),
        "step_times_s": times,
        "step_cpu_s": cpu,
        "step_page_faults": [f for r in rows for f in r["step_page_faults"]],
        "round_medians_s": [r["median_s"] for r in rows],
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in rows),
        "train_peak_mem_bytes": None if None in train_peaks else max(train_peaks),
        "config": config,
    }


def run_parent(args: argparse.Namespace) -> int:
    results = run_rounds(args)
    rows = [row for row in results.values() if row is not None]
    problems = [f"{v}: the worker failed (see the log above)" for v, row in results.items() if row is None]
    if not rows:
        print("\n".join(problems))
        return 1
    add_ratios(rows)
    problems += check_agreement(rows)
    print(describe(rows[0]["config"]) + "\n")
    print(markdown_table(rows))
    for problem in problems:
        print(f"\nWARNING: {problem}")
    for note in contention_notes(rows):
        print(f"\nNOTE: {note}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is None:
        return run_parent(args)
    row = run_worker(args)
    if args.result_file is None:
        print(json.dumps(row))
    else:
        args.result_file.write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
oneDNN: on CPU, loha_train's fused kernels run their products through oneDNN (loha_train/gemm.py), including the
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
import contextlib
import hashlib
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file, from any directory, without installing the package
    sys.path.insert(0, str(REPO))

from loha_train.reference_configs import SD1  # noqa: E402  (plain dicts, no torch: cheap in the parent)

VARIANTS = ("loha_train", "peft", "peft_lora", "lycoris", "base")
LOHA_VARIANTS = ("loha_train", "peft", "lycoris")  # must agree on wrapped modules and parameter count
DTYPES = ("fp32", "bf16", "fp16")

# The SD1.5 architecture (the public repos' config.json values, shared with single-file loading); the parameter
# counts below pin it: a config that drifts fails the worker's assertion instead of benchmarking another model.
SD15_UNET: dict[str, Any] = SD1["unet"]
SD15_UNET_PARAMS = 859_520_964
CLIP_L_TEXT: dict[str, Any] = SD1["text_encoder"]  # OpenAI CLIP ViT-L/14 text tower
CLIP_L_TEXT_PARAMS = 123_060_480

# Dotted name suffixes of the adapted Linear/Conv2d modules (diffusers UNet, transformers CLIP text encoder).
UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)  # fmt: skip
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# glibc returns big freed blocks to the kernel (mmap threshold, heap trimming), so every CPU step page-faults its
# activations back in: ~600k faults (~2.4 GB zeroed) per SD1.5 step at 32x32 latents. These keep them in the heap.
KEEP_FREED_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's largest allowed threshold
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
    "MALLOC_TOP_PAD_": str(2**30),
}
TOKENS = 77
SEED = 1234
LR = 1e-4


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
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="base weights + autocast; adapters stay fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
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
    return args


def shared_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every row shares (what the numbers mean)."""
    keys = ("model", "latent", "batch", "rank", "alpha", "steps", "warmup", "device", "dtype", "seed")
    cfg: dict[str, Any] = {k: getattr(args, k) for k in keys}
    cfg["gradient_checkpointing"] = args.gradient_checkpointing
    cfg["text_encoder"] = args.text_encoder
    cfg["threads"] = args.threads or default_threads()
    cfg["unet_targets"] = list(UNET_TARGETS)
    cfg["te_targets"] = list(TE_TARGETS) if args.text_encoder else []
    cfg["optimizer"] = f"AdamW(lr={LR}, fused=True)"
    cfg["keep_freed_memory"] = args.keep_freed_memory
    cfg["rounds"] = getattr(args, "rounds", 1)
    return cfg


def default_threads() -> int:
    """The cores this process may run on (cgroup/affinity aware where the platform says)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------- the parent
def worker_argv(args: argparse.Namespace, variant: str, result_file: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--result-file", str(result_file)]
    for name in ("model", "latent", "batch", "rank", "alpha", "steps", "warmup", "device", "dtype", "seed"):
        argv += [f"--{name}", str(getattr(args, name))]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
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


# ------------------------------------------------------------------------------------------- the worker: models
def build_models(args: argparse.Namespace) -> Any:
    """A container with `unet` (and `text_encoder`), fp32, random weights from args.seed, frozen, train mode."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loha_train.builtin import TINY_CLIP_TEXT, TINY_SD_UNET

    sd15 = args.model == "sd15"
    torch.manual_seed(args.seed)
    models = torch.nn.Module()
    models.unet = UNet2DConditionModel(**(SD15_UNET if sd15 else TINY_SD_UNET))
    if sd15:
        _assert_params(models.unet, SD15_UNET_PARAMS, "SD1.5 UNet")
    if args.text_encoder:
        models.text_encoder = CLIPTextModel(CLIPTextConfig(**(CLIP_L_TEXT if sd15 else TINY_CLIP_TEXT)))
        if sd15:
            _assert_params(models.text_encoder, CLIP_L_TEXT_PARAMS, "CLIP-L text encoder")
    models.requires_grad_(False)
    return models.train()


def _assert_params(module: Any, expected: int, what: str) -> None:
    count = sum(p.numel() for p in module.parameters())
    if count != expected:
        raise AssertionError(f"{what}: {count:,} parameters, expected {expected:,}: the architecture is wrong")


def target_suffixes(models: Any) -> dict[str, tuple[str, ...]]:
    """Component name -> adapted module suffixes."""
    out = {"unet": UNET_TARGETS}
    if hasattr(models, "text_encoder"):
        out["text_encoder"] = TE_TARGETS
    return out


def suffix_regex(suffixes: tuple[str, ...]) -> str:
    """`.(a|b|c)` at the end of a dotted module name."""
    return r"\.(" + "|".join(re.escape(s) for s in suffixes) + r")$"


def expected_targets(models: Any) -> list[str]:
    """Names (in the container) of the Linear/Conv2d modules every adapter variant must wrap."""
    from torch import nn

    names = []
    for comp, suffixes in target_suffixes(models).items():
        pattern = re.compile(suffix_regex(suffixes))
        for name, module in getattr(models, comp).named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d) and pattern.search("." + name):
                names.append(f"{comp}.{name}")
    return sorted(names)


# ----------------------------------------------------------------------------------------- the worker: adapters
# Each injector wraps the expected modules in place and returns (wrapped container names, extra modules that
# own parameters outside the container). Adapter parameters are created in fp32 on the model's device.


def inject_loha_train(models: Any, args: argparse.Namespace) -> tuple[list[str], list[Any]]:
    from loha_train.config import NetworkConfig
    from loha_train.inject import inject_loha, sd_components

    targets = tuple(suffix_regex(s) for s in target_suffixes(models).values())
    cfg = NetworkConfig(
        preset="none", targets=targets, rank=args.rank, alpha=args.alpha,
        conv_rank=args.rank, conv_alpha=args.alpha, use_cp=True,
    )  # fmt: skip
    tes = [models.text_encoder] if hasattr(models, "text_encoder") else []
    network = inject_loha(sd_components(models.unet, tes), cfg, seed=args.seed)
    return list(network.qualnames.values()), []


def _peft_regex(models: Any) -> str:
    """One regex PEFT full-matches against container names."""
    parts = [f"{comp}.*{suffix_regex(s).removesuffix('$')}" for comp, s in target_suffixes(models).items()]
    return "|".join(f"(?:{p})" for p in parts)


def inject_peft(models: Any, args: argparse.Namespace) -> tuple[list[str], list[Any]]:
    from peft import LoHaConfig, inject_adapter_in_model
    from peft.tuners.loha.layer import LoHaLayer

    cfg = LoHaConfig(r=args.rank, alpha=args.alpha, target_modules=_peft_regex(models), use_effective_conv2d=True)
    inject_adapter_in_model(cfg, models)
    return [n for n, m in models.named_modules() if isinstance(m, LoHaLayer)], []


def inject_peft_lora(models: Any, args: argparse.Namespace) -> tuple[list[str], list[Any]]:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import LoraLayer

    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=_peft_regex(models))
    inject_adapter_in_model(cfg, models)
    return [n for n, m in models.named_modules() if isinstance(m, LoraLayer)], []


def inject_lycoris(models: Any, args: argparse.Namespace) -> tuple[list[str], list[Any]]:
    import logging

    from lycoris import LycorisNetwork
    from lycoris.logging import logger

    logger.setLevel(logging.WARNING)
    names = {id(m): n for n, m in models.named_modules()}
    # Class-level state: target exactly these names (re.match from the start), no class-based targets.
    LycorisNetwork.apply_preset(
        {
            "enable_conv": True,
            "target_module": [],
            "target_name": [f"{comp}\\..*{suffix_regex(s)}" for comp, s in target_suffixes(models).items()],
            "module_algo_map": {},
            "name_algo_map": {},
            "exclude_name": [],
            "lora_prefix": "lycoris",
            "use_fnmatch": False,
        }
    )
    network = LycorisNetwork(
        models, multiplier=1.0, lora_dim=args.rank, conv_lora_dim=args.rank, alpha=args.alpha,
        conv_alpha=args.alpha, use_tucker=True, network_module="loha",
    )  # fmt: skip
    network.apply_to()
    return [names[id(lora.org_module[0])] for lora in network.loras], [network]


INJECTORS: dict[str, Callable[[Any, argparse.Namespace], tuple[list[str], list[Any]]]] = {
    "loha_train": inject_loha_train,
    "peft": inject_peft,
    "peft_lora": inject_peft_lora,
    "lycoris": inject_lycoris,
}


def trainable_parameters(modules: list[Any]) -> list[Any]:
    """Parameters with requires_grad across the modules, each once."""
    seen: dict[int, Any] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def cast_frozen_(modules: list[Any], dtype: Any) -> None:
    """Cast frozen floating-point parameters (the base weights) to dtype; trainable ones stay fp32."""
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)


# -------------------------------------------------------------------------------------------- the worker: steps
def make_batch(args: argparse.Namespace, models: Any, step: int, device: Any) -> dict[str, Any]:
    """Inputs for one step, from a generator seeded by (seed, step): identical across variants."""
    import torch

    gen = torch.Generator().manual_seed(args.seed * 1000 + step)
    shape = (args.batch, models.unet.config.in_channels, args.latent, args.latent)
    batch = {
        "latents": torch.randn(shape, generator=gen),
        "target": torch.randn(shape, generator=gen),
        "timesteps": torch.randint(0, 1000, (args.batch,), generator=gen),
    }
    if hasattr(models, "text_encoder"):
        vocab = models.text_encoder.config.vocab_size
        batch["input_ids"] = torch.randint(0, vocab, (args.batch, TOKENS), generator=gen)
    else:
        dim = models.unet.config.cross_attention_dim
        batch["encoder_hidden_states"] = torch.randn(args.batch, TOKENS, dim, generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def train_step(models: Any, batch: dict[str, Any], optimizer: Any, autocast: Any, is_base: bool) -> float:
    """Forward, MSE loss, backward, then AdamW step + zero_grad (base: backward to the input only)."""
    import torch.nn.functional as F

    latents = batch["latents"].requires_grad_(is_base)
    with autocast():
        if "input_ids" in batch:
            context = models.text_encoder(batch["input_ids"]).last_hidden_state
        else:
            context = batch["encoder_hidden_states"]
        pred = models.unet(latents, batch["timesteps"], encoder_hidden_states=context).sample
    loss = F.mse_loss(pred.float(), batch["target"].float())
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    latents.grad = None
    return float(loss.detach())


# ------------------------------------------------------------------------------------------- the worker: memory
def _vm_hwm_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _vm_rss_bytes() -> int | None:
    try:
        match = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def peak_memory(device: str) -> int:
    """Peak memory of this process so far: CUDA allocated, else peak RSS."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_memory(device: str) -> bool:
    """Start a new peak-memory span; False where the platform cannot (then only the process peak is known)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def current_memory(device: str) -> int | None:
    if device == "cuda":
        import torch

        return int(torch.cuda.memory_allocated())
    return _vm_rss_bytes()


# --------------------------------------------------------------------------------------------- the worker: main
def _timer(device: str) -> Callable[[], float]:
    import torch

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    return now


def _usage_since(before: resource.struct_rusage) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of this process since `before`.

    On a shared machine, CPU time close to threads x wall time means the step had its cores; many page faults
    mean the allocator handed memory back to the kernel and had it zeroed again.
    """
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, after.ru_minflt - before.ru_minflt


def prepare(args: argparse.Namespace, variant: str) -> tuple[Any, list[Any], list[str], dict[str, float]]:
    """Build, inject, enable checkpointing, cast and move: (models, trainable params, wrapped names, timings)."""
    import torch

    t0 = time.perf_counter()
    models = build_models(args)
    t1 = time.perf_counter()
    expected = expected_targets(models)
    wrapped, extra = INJECTORS[variant](models, args) if variant != "base" else ([], [])
    t2 = time.perf_counter()
    if variant != "base" and sorted(wrapped) != expected:
        missing, unexpected = sorted(set(expected) - set(wrapped)), sorted(set(wrapped) - set(expected))
        raise AssertionError(f"{variant}: wrapped set differs; missing {missing[:5]}, unexpected {unexpected[:5]}")
    if args.gradient_checkpointing:
        enable_checkpointing(models)
    if variant == "base" and hasattr(models, "text_encoder"):
        models.text_encoder.enable_input_require_grads()  # backward reaches the text encoder's frozen layers
    owners = [models, *extra]
    cast_frozen_(owners, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    for module in owners:
        module.to(args.device)
    params = trainable_parameters(owners)
    return models, params, wrapped, {"build_s": t1 - t0, "inject_s": t2 - t1}


def enable_checkpointing(models: Any) -> None:
    models.unet.enable_gradient_checkpointing()
    if hasattr(models, "text_encoder"):
        te = models.text_encoder
        enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
        enable()


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    variant = args.worker
    torch.set_num_threads(args.threads or default_threads())
    models, params, wrapped, setup = prepare(args, variant)
    if variant != "base" and not params:
        raise AssertionError(f"{variant}: no trainable parameters after injection")
    # fused AdamW for every adapter variant alike: loha-train's trainer steps with it (runtime.build_optimizer)
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True) if variant != "base" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    autocast: Callable[[], Any] = (
        (lambda: torch.autocast(args.device, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    )
    setup_mem, setup_peak = current_memory(args.device), peak_memory(args.device)
    span_ok = reset_peak_memory(args.device)
    now = _timer(args.device)
    times, cpu_times, faults, losses = [], [], [], []
    for step in range(args.warmup + args.steps):
        batch = make_batch(args, models, step, args.device)
        usage, start = resource.getrusage(resource.RUSAGE_SELF), now()
        losses.append(train_step(models, batch, optimizer, autocast, variant == "base"))
        times.append(now() - start)
        cpu, minflt = _usage_since(usage)
        cpu_times.append(cpu)
        faults.append(minflt)
        print(
            f"[bench] {variant}: step {step} {times[-1]:.3f} s (cpu {cpu:.2f} s, {minflt} page faults) "
            f"loss {losses[-1]:.6f}",
            file=sys.stderr,
            flush=True,
        )
    train_peak = peak_memory(args.device) if span_ok else None
    process_peak = max(peak_memory(args.device), setup_peak)
    if args.profile is not None:  # after the memory readings: the profiler holds memory of its own
        profile_step(args, models, optimizer, autocast, variant)
    gflops = count_flops(args, models, optimizer, autocast, variant) / 1e9 if args.flops else None
    measured = times[args.warmup :]
    names = sorted(wrapped)
    return {
        "variant": variant,
        "median_s": statistics.median(measured),
        "mean_s": statistics.fmean(measured),
        "min_s": min(measured),
        "median_cpu_s": statistics.median(cpu_times[args.warmup :]),
        "step_cpu_s": cpu_times[args.warmup :],
        "step_page_faults": faults[args.warmup :],
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "step_times_s": measured,
        "warmup_times_s": times[: args.warmup],
        "losses": losses,
        "peak_mem_bytes": process_peak,
        "train_peak_mem_bytes": train_peak,
        "setup_mem_bytes": setup_mem,
        "setup_peak_mem_bytes": setup_peak,
        "gflops_per_step": gflops,
        "trainable_params": sum(p.numel() for p in params),
        "trainable_tensors": len(params),
        "wrapped_modules": len(names),
        "wrapped_names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        **setup,
        "torch": torch.__version__,
        "config": shared_config(args),
    }


def profile_step(args: argparse.Namespace, models: Any, optimizer: Any, autocast: Any, variant: str) -> None:
    """One extra (unmeasured) step under torch.profiler; the op table goes to <profile>/<variant>.txt."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    batch = make_batch(args, models, args.warmup + args.steps, args.device)
    with profile(activities=activities, record_shapes=True) as prof:
        train_step(models, batch, optimizer, autocast, variant == "base")
    sort = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    args.profile.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=60, max_name_column_width=40)
    (args.profile / f"{variant}.txt").write_text(
        prof.key_averages().table(sort_by=sort, row_limit=40) + "\n\nby input shape:\n" + table + "\n"
    )


def count_flops(args: argparse.Namespace, models: Any, optimizer: Any, autocast: Any, variant: str) -> int:
    """FLOPs of one extra (unmeasured) step as torch.utils.flop_counter counts them (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_onednn_linear()
    batch = make_batch(args, models, args.warmup + args.steps, args.device)
    with FlopCounterMode(display=False) as counter:
        train_step(models, batch, optimizer, autocast, variant == "base")
    return int(counter.get_total_flops())


def _count_onednn_linear() -> None:
    """Teach the FLOP counter oneDNN's linear (loha_train's CPU products), which it does not know: 2 m k n."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _linear_flop(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * math.prod(x_shape) * w_shape[0]


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

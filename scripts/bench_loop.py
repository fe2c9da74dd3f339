"""Time the whole `loha-train` loop per optimizer step, split into data wait, forward, backward, optimizer, logging,
checkpoints, adapter exports and samples (amortised), with the process's peak memory.

The real trainer runs in this process (`loha_train.training.recipe.train`) on a random-weight model with cached
latents and text embeddings; the bench only wraps the loop's parts with timers (CUDA-synchronised on a GPU):

    .venv/bin/python scripts/bench_loop.py                                  # SD1.5 architecture, 256 px, batch 1
    .venv/bin/python scripts/bench_loop.py --resolution 512 --gradient-checkpointing --json loop.json
    .venv/bin/python scripts/bench_loop.py --model tiny --resolution 64 --steps 6   # seconds-long smoke run
    .venv/bin/python scripts/bench_loop.py --device cuda --mixed-precision bf16 --resolution 512 --batch 4

The SD1.5-architecture model (UNet 860M, CLIP-L 123M, VAE 84M parameters, random weights, fp16 on disk) is built
once into $LOHA_TRAIN_CACHE/bench/. Overhead is everything in a step beyond forward + backward + optimizer: data wait,
logging, the progress bar, and the amortised checkpoint, export and sampling time. Steady state excludes the first
`--warmup` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PARTS = ("data", "forward", "backward", "optimizer", "logging", "checkpoint", "export", "sampling", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (checkpoint and samples at the half)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the steady-state figures")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile the UNet")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.steps < args.warmup + 2:
        p.error("--steps must be at least --warmup + 2 (the last step is not a steady-state one)")
    return args


# --------------------------------------------------------------------------------------------------- the model
def sd15_folder(cache: Path) -> Path:
    """A diffusers folder with the SD1.5 architecture and random weights (built once, fp16 on disk)."""
    dest = cache / "bench" / "sd15-random-v1"
    if (dest / "model_index.json").is_file():
        return dest
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loha_train.models.builtin import resolve_builtin
    from loha_train.models.reference_configs import SD1

    tiny = resolve_builtin("builtin:tiny-sd")  # its tokenizer (a CLIP-style BPE) and scheduler config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sd15-", dir=dest.parent))
    print(f"[loop] building the SD1.5-architecture model in {dest} (once)", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(SD1["unet"]).to(torch.float16).save_pretrained(tmp / "unet")
    AutoencoderKL.from_config(SD1["vae"]).to(torch.float16).save_pretrained(tmp / "vae")
    text = {k: v for k, v in SD1["text_encoder"].items() if not k.startswith("_")}
    CLIPTextModel(CLIPTextConfig(**text)).to(torch.float16).save_pretrained(tmp / "text_encoder")
    for part in ("tokenizer", "scheduler", "model_index.json"):
        (shutil.copytree if (tiny / part).is_dir() else shutil.copy)(tiny / part, tmp / part)
    tmp.rename(dest)
    return dest


def image_folder(root: Path, resolution: int, count: int = 8) -> Path:
    """`count` square images at the training resolution with captions (one bucket, no upscaling)."""
    from PIL import Image, ImageDraw

    folder = root / f"images-{resolution}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (resolution, resolution), (40 * i % 255, 120, 200))
        ImageDraw.Draw(image).ellipse((resolution // 4, resolution // 4, resolution * 3 // 4, resolution * 3 // 4))
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a circle, picture {i}", encoding="utf-8")
    return folder


def config(args: argparse.Namespace, model: str, data: Path, out: Path) -> dict[str, Any]:
    half = max(args.steps // 2, 1)
    return {
        "model": {"path": model},
        "network": {"preset": "full", "rank": args.rank, "alpha": args.rank, "conv_rank": args.rank},
        "data": {
            "path": str(data),
            "resolution": args.resolution,
            "bucket_min_side": min(256, args.resolution),
            "bucket_step": 32 if args.resolution < 256 else 64,
            "cache_latents": "memory",
        },
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": 1e-4,
            "save_every_steps": half,
            "gradient_checkpointing": args.gradient_checkpointing,
            "mixed_precision": args.mixed_precision,
            **({"compile": True} if args.compile else {}),
        },
        "sample": {"prompts": [{"prompt": "a circle", "width": 64, "height": 64}], "steps": 4, "every_n_steps": half},
        "output": {"dir": str(out), "name": "loop", "save_adapter_every_steps": half},
    }


# ----------------------------------------------------------------------------------------------- the timers
class Timers:
    """(start, seconds) of each call of each loop part; CUDA-synchronised around each part on a GPU."""

    def __init__(self, device: str) -> None:
        self.sync: Callable[[], None] = lambda: None
        if device == "cuda":
            import torch

            self.sync = torch.cuda.synchronize
        self.parts: dict[str, list[tuple[float, float]]] = defaultdict(list)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.parts[name].append((start, time.perf_counter() - start))

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        timers = self

        def timed(*a: Any, **k: Any) -> Any:
            with timers.part(name):
                return original(*a, **k)

        setattr(owner, attr, timed)

    def within(self, name: str, start: float, end: float) -> float:
        return sum(d for s, d in self.parts[name] if start <= s < end)


DUTIES = ("checkpoint", "export", "sampling")


def instrument(timers: Timers) -> None:
    """Wrap the trainer's loop parts (the bench's only intrusion; the trainer runs unchanged)."""
    import accelerate

    from loha_train.training import session
    from loha_train.training.metrics import MetricsLog

    timers.wrap(session, "micro_step", "forward")
    timers.wrap(accelerate.Accelerator, "backward", "backward")
    timers.wrap(MetricsLog, "scalars", "logging")
    for attr, name in (("save_checkpoint", "checkpoint"), ("export_adapter", "export"), ("sample", "sampling")):
        timers.wrap(session.Session, attr, name)
    timers.wrap(session.Session, "optimizer_step", "step")
    batches = session.Session.epoch_batches

    def epoch_batches(self: Any) -> Iterator[Any]:
        it = batches(self)
        while True:
            with timers.part("data"):
                item = next(it, None)
            if item is None:
                return
            yield item

    session.Session.epoch_batches = epoch_batches  # type: ignore[method-assign]


def breakdown(timers: Timers, warmup: int) -> dict[str, float]:
    """Seconds per steady-state step for each part, from one optimizer step's start to the next's (so the last
    step, followed by the end of the run, is left out). Checkpoints, exports and samples are amortised: their
    whole run's time (at the start and the end included) over the steps."""
    starts = [s for s, _ in timers.parts["step"]]
    steps = len(starts)
    windows = [(starts[i], starts[i + 1]) for i in range(warmup, steps - 1)]
    per: dict[str, float] = {}
    for name in ("data", "forward", "backward", "logging", "step"):
        per[name] = statistics.mean(timers.within(name, a, b) for a, b in windows)
    per["optimizer"] = per.pop("step") - per["data"] - per["forward"] - per["backward"]
    in_loop = statistics.mean(b - a - sum(timers.within(d, a, b) for d in DUTIES) for a, b in windows)
    for name in DUTIES:
        per[name] = sum(d for _, d in timers.parts[name]) / steps
    per["total"] = in_loop + sum(per[d] for d in DUTIES)
    per["other"] = per["total"] - sum(per[p] for p in PARTS if p != "other")
    core = per["forward"] + per["backward"] + per["optimizer"]
    per["overhead_pct"] = 100.0 * (per["total"] - core) / per["total"]  # data, logging, duties, progress bar
    per["overhead_in_loop_pct"] = 100.0 * (in_loop - core) / in_loop  # the same without the amortised duties
    return per


def peak_memory(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(args: argparse.Namespace) -> dict[str, Any]:
    from loha_train.config import config_from_dict
    from loha_train.models.builtin import cache_dir
    from loha_train.training.recipe import train

    if args.device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    model = str(sd15_folder(cache_dir())) if args.model == "sd15" else "builtin:tiny-sd"
    timers = Timers(args.device)
    instrument(timers)
    with tempfile.TemporaryDirectory(prefix="loha-loop-") as tmp:
        data = image_folder(Path(tmp), args.resolution)
        cfg = config_from_dict(config(args, model, data, Path(tmp) / "out"))
        started = time.perf_counter()
        train(cfg, echo=lambda text: print(text, file=sys.stderr))
        wall = time.perf_counter() - started
    row = {
        "model": args.model,
        "resolution": args.resolution,
        "batch": args.batch,
        "gradient_checkpointing": args.gradient_checkpointing,
        "mixed_precision": args.mixed_precision,
        "device": args.device,
        "compile": args.compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "per_step_s": breakdown(timers, args.warmup),
        "peak_memory_bytes": peak_memory(args.device),
        "wall_s": wall,
    }
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| setting | s/step | data | forward | backward | optimizer | logging | checkpoint | export | sampling "
    head += "| other | overhead | peak memory |"
    lines = [head, "|---|" + "--:|" * 13]
    for r in rows:
        s = r["per_step_s"]
        setting = f"{r['resolution']} px, batch {r['batch']}" + (", ckpt" if r["gradient_checkpointing"] else "")
        setting += f", {r['mixed_precision']}" if r["mixed_precision"] != "no" else ""
        cells = [f"{s[p]:.3f}" for p in PARTS]
        lines.append(
            f"| {setting} | {s['total']:.2f} | " + " | ".join(cells) + f" | {s['overhead_pct']:.1f}% "
            f"| {r['peak_memory_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    row = run(args)
    print(markdown([row]))
    if args.json is not None:
        args.json.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

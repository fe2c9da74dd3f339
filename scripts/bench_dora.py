"""Micro-benchmark: the cost of DoRA (network.weight_decompose) on single SD1.5-sized LoHa layers.

    .venv/bin/python scripts/bench_dora.py [--reps 15] [--rank 8] [--threads 1]

For each layer shape it times forward + backward (to the input and the adapter tensors) of the frozen layer alone,
the LoHa layer (fused rank-r^2 kernel), the DoRA LoHa layer (`LoHaModule.dora_forward`: frozen op + rank-r^2 path,
scaled per output row or input column by the factor from the merged weight's norm) and DoRA computed naively as one
op on the decomposed weight W' (as lycoris-lora runs it; its backward adds a token-sized weight-gradient product).
The variants alternate rep by rep, so machine drift hits all alike; it prints the median CPU seconds (one thread:
other jobs' load does not count) and the ratios to the frozen layer. The full-step bench
(`scripts/bench.py --variants base,loha_train,loha_train_dora`) measures the whole UNet when the machine has the time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loha_train.loha.layers import LoHaModule, wrap_layer

# (name, layer factory, input shape): SD1.5 at 256 px (32x32 latents), batch 1
SHAPES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("attn to_q 320x320, 1024 tokens", lambda: nn.Linear(320, 320), (1, 1024, 320)),
    ("ff.net.0.proj 640->5120, 256 tokens", lambda: nn.Linear(640, 5120), (1, 256, 640)),
    ("resnet conv2 3x3 320, 32x32", lambda: nn.Conv2d(320, 320, 3, padding=1), (1, 320, 32, 32)),
]


class OnMergedWeight(nn.Module):
    """DoRA as one op on W' (the naive form), for comparison."""

    def __init__(self, layer: LoHaModule) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, w = self.layer.base, self.layer.dora_weight()
        return F.linear(x, w, base.bias) if isinstance(base, nn.Linear) else base._conv_forward(x, w, base.bias)


def _adapter(make: Callable[[], nn.Module], rank: int, dora: bool) -> LoHaModule:
    layer = wrap_layer(make(), rank, float(rank), weight_decompose=dora)
    with torch.no_grad():
        layer.hada_w2_a.normal_(std=0.1)  # a trained-looking delta, not the zero init
    return layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="1: CPU time is then a fair measure on a busy machine")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| layer | frozen | LoHa | DoRA LoHa | DoRA on W' | LoHa vs frozen | DoRA vs frozen | DoRA on W' vs frozen |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for name, make, shape in SHAPES:
        torch.manual_seed(0)
        layers: dict[str, nn.Module] = {
            "frozen": make().requires_grad_(False),
            "loha": _adapter(make, args.rank, dora=False),
            "dora": _adapter(make, args.rank, dora=True),
            "naive": OnMergedWeight(_adapter(make, args.rank, dora=True)),
        }
        x = torch.randn(shape, requires_grad=True)
        times: dict[str, list[float]] = {k: [] for k in layers}
        for rep in range(args.reps + 2):
            for key, layer in layers.items():
                t = time.process_time()
                layer(x).square().mean().backward()
                if rep >= 2:  # two warm-ups
                    times[key].append(time.process_time() - t)
                layer.zero_grad(set_to_none=True)
                x.grad = None
        f, lo, do, nv = (statistics.median(times[k]) for k in ("frozen", "loha", "dora", "naive"))
        print(f"| {name} | {f:.4f} | {lo:.4f} | {do:.4f} | {nv:.4f} | {lo / f:.2f}x | {do / f:.2f}x | {nv / f:.2f}x |")


if __name__ == "__main__":
    main()

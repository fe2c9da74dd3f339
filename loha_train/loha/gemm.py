"""Matrix products for the fused LoHa kernels: oneDNN's matmul on x86 CPUs in float32, torch.mm elsewhere.

On CPU, torch.mm runs MKL's sgemm. On AMD CPUs MKL takes its AVX2 code path even where AVX-512 is there, and the
thin products of the rank-r^2 path (64 columns at rank 8) run at about half of what oneDNN, the library PyTorch
already uses for its CPU convolutions, reaches on the same shapes: measured on the SD1.5 bench's shapes, 2-3x for
the adapter products and ~2x for the frozen Linear's input-gradient product. `mm` routes a product through
oneDNN's matmul (the `mkldnn::_linear_pointwise` op that PyTorch's own CPU compiler emits) when the tensors are
float32 CPU tensors and the product is large enough for the call overhead to pay; results equal torch.mm within
float32 rounding and are deterministic for a given thread count, like MKL's.

The frozen layer's *forward* product is never routed here: at init the wrapped model must give bit-identical
outputs to the unwrapped one, so it stays on the op the unwrapped layer uses. Set LOHA_TRAIN_ONEDNN=0 to use
torch.mm everywhere (benchmarks compare both; a CPU build without oneDNN falls back by itself).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

ENV = "LOHA_TRAIN_ONEDNN"
MIN_MACS = 1 << 18  # below ~0.26M multiply-adds the oneDNN call overhead outweighs its faster kernel


@functools.cache
def _load() -> Callable[..., Tensor] | None:
    """oneDNN's linear (y = x w^T) if this build has it and it agrees with torch.mm on a probe, else None.

    Read once per process (reset() reads LOHA_TRAIN_ONEDNN again)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        # fixed values, no random draw: the probe must not move the global RNG (exact resume depends on it)
        a = torch.arange(128, dtype=torch.float32).reshape(8, 16).sin()
        b = torch.arange(64, dtype=torch.float32).reshape(16, 4).cos()
        ok = torch.allclose(op(a, b.t(), None, "none", [], ""), a @ b, rtol=1e-4, atol=1e-5)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return op if ok else None


def onednn_enabled() -> bool:
    """Whether float32 CPU products go through oneDNN in this process."""
    return _load() is not None


def reset() -> None:
    """Re-read LOHA_TRAIN_ONEDNN on the next product (tests and benchmarks switch it)."""
    _load.cache_clear()


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D a (n, k) and b (k, m), either possibly a transposed view."""
    if (
        a.dtype == b.dtype == torch.float32
        and a.device.type == "cpu"
        and not torch.compiler.is_compiling()  # inductor picks its own CPU kernels (oneDNN among them)
        and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_MACS
    ):
        linear = _load()
        if linear is not None:
            return linear(a, b.t(), None, "none", [], "")
    return a @ b

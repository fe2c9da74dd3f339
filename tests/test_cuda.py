"""CUDA paths (`pytest -m cuda`, run by scripts/gpu_check.sh): the fused kernels in fp32/fp16/bf16 against a
float64 CPU reference, mixed-precision training that resumes, and SDPA attention.

Without CUDA these tests are skipped. LOHA_TRAIN_TEST_DEVICE=cpu runs the same code on the CPU at the same tiny
sizes (`scripts/gpu_check.sh --dry` does, so CI proves the script and these tests without a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from loha_train.loha.layers import LoHaModule, wrap_layer

DEVICE = os.environ.get("LOHA_TRAIN_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative error (max |ours - reference| / max |reference|) allowed per compute dtype. fp32 on CUDA may use TF32
# for convolutions and matmuls (10-bit mantissa), hence 2e-3 rather than float32 rounding.
TOLERANCE = {"fp32": 2e-3, "fp16": 2e-2, "bf16": 6e-2}


# --- the fused kernels against float64 ---------------------------------------------------------------------------

LAYERS = {
    "linear": lambda: nn.Linear(40, 24),
    "conv1x1": lambda: nn.Conv2d(12, 20, 1),
    "conv3x3": lambda: nn.Conv2d(12, 20, 3, padding=1),
    "conv3x3-cp": lambda: nn.Conv2d(12, 20, 3, padding=1, stride=2),
}


def _input(kind: str) -> torch.Tensor:
    return torch.randn(3, 7, 40) if kind == "linear" else torch.randn(2, 12, 9, 9)


def _reference_output(
    m: LoHaModule, x: torch.Tensor, row_scale: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """base(x) + x DeltaW^T (or the conv) in float64 on the CPU from the naive formula (rows scaled), and the
    float64 copies of the factors it was built from (their .grad is the reference gradient)."""
    f64 = {name: p.detach().double().cpu().requires_grad_(True) for name, p in m.named_parameters() if p.requires_grad}
    w1 = f64["hada_w1_a"] @ f64["hada_w1_b"] if "hada_t1" not in f64 else None
    w2 = f64["hada_w2_a"] @ f64["hada_w2_b"] if "hada_t2" not in f64 else None
    if "hada_t1" in f64:  # CP: W_i = einsum(t_i, w_i_a, w_i_b) over the rank dims
        w1 = torch.einsum("ijkl,io,jc->ockl", f64["hada_t1"], f64["hada_w1_a"], f64["hada_w1_b"])
        w2 = torch.einsum("ijkl,io,jc->ockl", f64["hada_t2"], f64["hada_w2_a"], f64["hada_w2_b"])
    base = m.base
    delta = (w1 * w2).reshape(base.weight.shape) * (m.alpha / m.rank)
    delta = delta * row_scale.double().cpu().reshape(-1, *([1] * (delta.dim() - 1)))
    weight = base.weight.detach().double().cpu() + delta
    bias = base.bias.detach().double().cpu()
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias), f64
    return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation), f64


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize(
    ("rank_dropout", "rescale"), [(0.0, False), (0.3, False), (0.3, True)], ids=["no-dropout", "dropout", "scaled"]
)
@pytest.mark.parametrize("path", ["factored", "merged"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_fused_kernels_match_float64_reference(
    kind: str, dtype: str, path: str, rank_dropout: float, rescale: bool
) -> None:
    torch.manual_seed(0)
    base = LAYERS[kind]().requires_grad_(False)
    m = wrap_layer(base, 4, 2.0, use_cp=kind.endswith("-cp"), rank_dropout=rank_dropout, rank_dropout_scale=rescale)
    m = m.to(DEVICE)
    m.path = path
    for p in m.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.4)  # a non-zero delta in every factor
    m.train()
    x_cpu = _input(kind)
    x = x_cpu.clone().to(DEVICE).requires_grad_(True)
    torch.manual_seed(7)
    with torch.autocast(DEVICE, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        out = m(x)
    torch.manual_seed(7)  # the same draw as the layer's: its only random op is the rank-dropout mask
    # LyCORIS's mask: rows kept where rand > p; with rank_dropout_scale divided by the fraction actually kept
    keep = (torch.rand(m.out_features, device=DEVICE) > rank_dropout).double().cpu()
    row_scale = keep / keep.mean() if rescale else keep
    x_ref = x_cpu.double().requires_grad_(True)  # a new leaf (x is a clone)
    ref, ref_params = _reference_output(m, x_ref, row_scale)
    weight = torch.randn(ref.shape, dtype=torch.float64)  # a loss whose gradient reaches every element
    (out.float() * weight.to(DEVICE, torch.float32)).sum().backward()
    (ref * weight).sum().backward()

    tol = TOLERANCE[dtype]
    assert _rel(out, ref.detach()) < tol
    assert _rel(x.grad, x_ref.grad) < tol
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, ref_params[name].grad) < tol, name


# --- mixed-precision training that resumes -----------------------------------------------------------------------


@pytest.fixture
def deterministic() -> Iterator[None]:
    """CUDA's deterministic algorithms where it has them (cuBLAS needs its workspace setting before first use)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


# A tiny run with a LoHa on every layer, conv cores and rank dropout (test_train.tiny_raw's keys, overridden)
RUN: dict[str, Any] = {
    "network__alpha": 4,
    "network__conv_rank": 2,
    "network__conv_alpha": 2,
    "network__rank_dropout": 0.1,
    "data__resolution": 64,
    "data__bucket_max_side": 96,
    "output__name": "run",
}


def _run(tmp: Path, name: str, precision: str, *, steps: int, resume: bool = False) -> dict[str, torch.Tensor]:
    from test_train import tiny_raw

    from loha_train.config import config_from_dict
    from loha_train.training.recipe import train

    raw = tiny_raw(
        tmp / name,
        **RUN,
        train__max_steps=steps,
        train__save_every_steps=steps // 2,
        train__seed=3,
        train__mixed_precision=precision,
    )
    adapter = train(config_from_dict(raw), resume="latest" if resume else None, echo=lambda _: None)
    assert adapter is not None
    return load_file(adapter)


def _accelerator_supports(precision: str) -> bool:
    return precision == "bf16" or DEVICE == "cuda"  # accelerate refuses fp16 (GradScaler) without a GPU


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_resumes_exactly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
    deterministic: None,
    builtin_cache: Path,
    fresh_accelerate: None,
) -> None:
    """N steps in one go == N/2 steps, resume, N/2 more (fp16 with accelerate's GradScaler, whose scale is in the
    checkpoint); N = 20 on CUDA. Exact on CPU; on CUDA, exact where deterministic algorithms hold, else within
    1e-4 relative."""
    if not _accelerator_supports(precision):
        pytest.skip("accelerate runs fp16 mixed precision (GradScaler) on a GPU only")
    if DEVICE == "cpu":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    steps = 20 if DEVICE == "cuda" else 6  # the same path; the CPU dry run keeps it short
    whole = _run(tmp_path, "whole", precision, steps=steps)
    _run(tmp_path, "parts", precision, steps=steps // 2)
    parts = _run(tmp_path, "parts", precision, steps=steps, resume=True)
    assert whole.keys() == parts.keys()
    worst = max(_rel(parts[k].float(), whole[k].double()) for k in whole if whole[k].abs().max() > 0)
    assert worst <= (0.0 if DEVICE == "cpu" else 1e-4), worst
    assert all(torch.isfinite(t).all() for t in whole.values())


# --- attention ---------------------------------------------------------------------------------------------------


def test_unet_attention_runs_through_sdpa(tiny_unet: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' attention goes through F.scaled_dot_product_attention (flash/efficient kernels on CUDA)."""
    calls: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args[0].dtype)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    unet = tiny_unet.to(DEVICE)
    x = torch.randn(1, 4, 16, 16, device=DEVICE)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        unet(x, torch.tensor([10], device=DEVICE), ctx)
    assert calls and set(calls) == {torch.bfloat16}

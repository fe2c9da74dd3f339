"""The oneDNN product route of the fused kernels: float32 results against a float64 reference, and its switch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from loha_train.loha import gemm
from loha_train.loha.layers import wrap_layer

pytestmark = pytest.mark.skipif(not gemm.onednn_enabled(), reason="this torch build has no oneDNN matmul")


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """Record the shapes of every product that goes through oneDNN."""
    calls: list[tuple[int, ...]] = []
    real = gemm._load()
    assert real is not None

    def counting(a: torch.Tensor, w: torch.Tensor, *rest: object) -> torch.Tensor:
        calls.append((*a.shape, w.shape[0]))
        return real(a, w, *rest)

    monkeypatch.setattr(gemm, "_load", lambda: counting)
    yield calls


def test_mm_matches_torch_mm_in_every_orientation(spy):
    torch.manual_seed(0)
    a, b = torch.randn(300, 200), torch.randn(200, 100)
    for x, y in ((a, b), (a.T.contiguous().T, b), (a, b.T.contiguous().T)):
        torch.testing.assert_close(gemm.mm(x, y), (x.double() @ y.double()).float(), rtol=1e-5, atol=1e-4)
    assert len(spy) == 3
    small = gemm.mm(torch.randn(4, 4), torch.randn(4, 4))  # below MIN_MACS: torch.mm
    assert small.shape == (4, 4) and len(spy) == 3
    gemm.mm(a.double(), b.double())  # float64 never goes to oneDNN
    assert len(spy) == 3


LAYERS = [
    ("linear", lambda: nn.Linear(256, 192), (2, 64, 256), {}),
    ("pointwise", lambda: nn.Conv2d(96, 80, 1), (1, 96, 24, 24), {}),
    ("conv3x3", lambda: nn.Conv2d(48, 40, 3, padding=1), (1, 48, 24, 24), {"use_cp": False}),
    ("conv-cp", lambda: nn.Conv2d(48, 40, 3, padding=1), (1, 48, 24, 24), {"use_cp": True}),
]


@pytest.mark.parametrize(("name", "make", "shape", "kw"), LAYERS, ids=[n for n, *_ in LAYERS])
def test_fused_float32_through_onednn_equals_float64_reference(spy, name, make, shape, kw):
    """Outputs and every gradient of the float32 fused kernel (oneDNN products) equal plain autograd in float64."""
    torch.manual_seed(0)
    layer = wrap_layer(make(), 8, 4.0, rank_dropout=0.25, **kw).train()
    with torch.no_grad():
        for p in layer.parameters(recurse=False):
            p.normal_(0, 0.2)
    layer.path = "factored"
    x = torch.randn(shape)
    results = []
    for dtype, fused in ((torch.float32, True), (torch.float64, False)):
        model = layer.to(dtype)
        model.fused = fused
        torch.manual_seed(3)  # the same rank-dropout mask
        xi = x.to(dtype).requires_grad_()
        out = model(xi)
        params = list(model.parameters(recurse=False))
        grads = torch.autograd.grad(out.square().sum(), [xi, *params])
        results.append([out.double(), *(g.double() for g in grads)])
    assert spy, "no product went through oneDNN"
    for got, want in zip(*results, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_switch_off_falls_back_to_torch_mm(monkeypatch):
    monkeypatch.setenv(gemm.ENV, "0")
    gemm.reset()
    try:
        assert not gemm.onednn_enabled()
        a, b = torch.randn(300, 200), torch.randn(200, 100)
        assert torch.equal(gemm.mm(a, b), a @ b)
    finally:
        monkeypatch.delenv(gemm.ENV)
        gemm.reset()
    assert gemm.onednn_enabled()


def test_probe_leaves_the_global_rng_alone():
    """The first product probes oneDNN; a random draw there would shift the noise of a resumed run."""
    gemm.reset()
    before = torch.random.get_rng_state()
    assert gemm.onednn_enabled()
    assert torch.equal(torch.random.get_rng_state(), before)

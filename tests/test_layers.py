"""LoHa layer invariants: zero init, reference forward, merge, dropouts, parameter counts, what trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loha_train.loha.layers import LoHaConv2d, LoHaLinear, LoHaModule, parameter_count, wrap_layer

CONVS = {
    "1x1": dict(in_channels=6, out_channels=5, kernel_size=1),
    "3x3": dict(in_channels=6, out_channels=5, kernel_size=3, padding=1),
    "3x3-stride2": dict(in_channels=6, out_channels=5, kernel_size=3, stride=2, padding=1),
    "3x3-dilated": dict(in_channels=6, out_channels=5, kernel_size=3, padding=2, dilation=2),
    "3x3-nobias": dict(in_channels=6, out_channels=5, kernel_size=3, padding=1, bias=False),
}


def _randomize(module: LoHaModule) -> LoHaModule:
    """Give the zero-initialised factor values so the delta is non-trivial."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.normal_(0, 0.5)
    return module


def _layers() -> list[tuple[str, nn.Module, torch.Tensor, dict]]:
    torch.manual_seed(0)
    out = [("linear", nn.Linear(6, 5).double(), torch.randn(3, 4, 6, dtype=torch.float64), {})]
    for name, kw in CONVS.items():
        for cp in (False, True):
            conv = nn.Conv2d(**kw).double()
            out.append((f"conv{name}-cp{cp}", conv, torch.randn(2, 6, 7, 7, dtype=torch.float64), {"use_cp": cp}))
    for name in ("1x1", "3x3"):  # batch 1 takes the plain-GEMM branch of the 1x1 matmuls
        conv = nn.Conv2d(**CONVS[name]).double()
        out.append((f"conv{name}-batch1", conv, torch.randn(1, 6, 7, 7, dtype=torch.float64), {"use_cp": True}))
    return out


LAYERS = _layers()
IDS = [name for name, *_ in LAYERS]


def _wrap(base: nn.Module, rank=3, alpha=5.0, **kw) -> LoHaModule:
    return wrap_layer(base, rank, alpha, **kw).double()


@pytest.mark.parametrize(("name", "base", "x", "kw"), LAYERS, ids=IDS)
def test_zero_init_is_bit_identical_to_base(name, base, x, kw):
    ref = base(x)
    layer = _wrap(base, **kw)
    assert torch.equal(layer(x), ref)
    layer.train()
    assert torch.equal(layer(x), ref)


def _reference(layer: LoHaModule, x: torch.Tensor) -> torch.Tensor:
    """base(x) + op(x, DeltaW) with the dense delta: the definition the factored forward must match."""
    delta = layer.delta_weight() * layer.multiplier
    base = layer.base
    if isinstance(base, nn.Linear):
        return base(x) + F.linear(x, delta)
    return base(x) + F.conv2d(x, delta, None, base.stride, base.padding, base.dilation)


@pytest.mark.parametrize(("name", "base", "x", "kw"), LAYERS, ids=IDS)
def test_forward_equals_dense_reference(name, base, x, kw):
    layer = _randomize(_wrap(base, **kw))
    layer.multiplier = 0.7
    torch.testing.assert_close(layer(x), _reference(layer, x))
    # gradients of the factors through the factored path equal those through the dense delta
    grads = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters(recurse=False)))
    refs = torch.autograd.grad(_reference(layer, x).square().sum(), list(layer.parameters(recurse=False)))
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize(("name", "base", "x", "kw"), LAYERS, ids=IDS)
def test_merge_unmerge(name, base, x, kw):
    original = base.weight.detach().clone()
    layer = _randomize(_wrap(base, **kw))
    layer.multiplier = 0.8
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged)
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), unmerged)
    torch.testing.assert_close(layer.base.weight, original + 0.8 * layer.delta_weight())
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, original)
    torch.testing.assert_close(layer(x), unmerged)


@pytest.mark.parametrize(("name", "base", "x", "kw"), LAYERS, ids=IDS)
def test_parameter_count_formula(name, base, x, kw):
    r = 3
    layer = _wrap(base, rank=r, **kw)
    out, inp = base.weight.shape[:2]
    k = base.weight[0, 0].numel() if base.weight.dim() == 4 else 1
    expected = 2 * r * (out + inp) + 2 * r * r * k if layer.use_cp else 2 * r * (out + inp * k)
    assert parameter_count(layer) == expected
    assert layer.use_cp == (kw.get("use_cp", False) and k > 1)


def test_shapes_follow_lycoris_layout():
    lin = LoHaLinear(nn.Linear(6, 5), 3, 1.0)
    assert lin.hada_w1_a.shape == (5, 3) and lin.hada_w1_b.shape == (3, 6)
    cp = LoHaConv2d(nn.Conv2d(6, 5, 3), 3, 1.0, use_cp=True)
    assert cp.hada_w1_a.shape == (3, 5) and cp.hada_w1_b.shape == (3, 6) and cp.hada_t1.shape == (3, 3, 3, 3)
    plain = LoHaConv2d(nn.Conv2d(6, 5, 3), 3, 1.0, use_cp=False)
    assert plain.hada_w1_a.shape == (5, 3) and plain.hada_w1_b.shape == (3, 54)
    assert set(cp.adapter_state()) == {
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "hada_t1",
        "hada_t2",
        "alpha",
    }
    assert cp.alpha.dim() == 0


def test_dropouts_have_no_effect_in_eval():
    torch.manual_seed(0)
    layer = _randomize(_wrap(nn.Linear(6, 5).double(), rank_dropout=0.5, module_dropout=0.5))
    x = torch.randn(4, 6, dtype=torch.float64)
    layer.eval()
    outs = [layer(x) for _ in range(20)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    torch.testing.assert_close(outs[0], _reference(layer, x))


def test_rank_dropout_statistics():
    torch.manual_seed(0)
    layer = _randomize(_wrap(nn.Linear(6, 32).double(), rank_dropout=0.3)).train()
    x = torch.randn(1, 6, dtype=torch.float64)
    base = layer.base(x)
    draws = torch.stack([layer(x) - base for _ in range(6000)])
    full = (_reference(layer, x) - base)[0]
    # LyCORIS's default (rank_dropout_scale off): each output row is either dropped (exactly 0) or kept as it is
    kept = draws[:, 0, :] != 0
    assert kept.double().mean().item() == pytest.approx(0.7, abs=0.02)
    torch.testing.assert_close(draws[:, 0, :][kept], full.expand_as(draws[:, 0, :])[kept])
    torch.testing.assert_close(draws.mean(0)[0], 0.7 * full, atol=0.05 * full.abs().max().item(), rtol=0)
    # rank_dropout_scale: kept rows divided by the fraction kept in that draw, so the mean is the undropped delta
    layer.rank_dropout_scale = True
    draws = torch.stack([layer(x) - base for _ in range(6000)])
    torch.testing.assert_close(draws.mean(0)[0], full, atol=0.05 * full.abs().max().item(), rtol=0)


def test_module_dropout_statistics():
    torch.manual_seed(0)
    layer = _randomize(_wrap(nn.Linear(6, 5).double(), module_dropout=0.25)).train()
    x = torch.randn(2, 6, dtype=torch.float64)
    base = layer.base(x)
    skipped = sum(torch.equal(layer(x), base) for _ in range(4000))
    assert skipped / 4000 == pytest.approx(0.25, abs=0.03)


def test_one_optimizer_step_changes_only_adapter_tensors(tiny_unet):
    from loha_train.config import NetworkConfig
    from loha_train.fileformat.keys import sd_components
    from loha_train.loha.inject import inject_loha

    base_before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    network = inject_loha(sd_components(tiny_unet), NetworkConfig(preset="full"), seed=0)
    adapter_before = {k: v.clone() for k, v in network.state_dict().items()}
    opt = torch.optim.AdamW(list(network.parameters()), lr=1e-2)
    tiny_unet.train()
    out = tiny_unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 77, 32))
    out.sample.square().mean().backward()
    opt.step()

    after = tiny_unet.state_dict()
    adapter_keys = {k for k in after if k.rsplit(".", 1)[1] in adapter_before_suffixes(adapter_before)}
    assert {k.replace(".base.", ".") for k in set(after) - adapter_keys} == set(base_before)
    for key in set(after) - adapter_keys:
        assert torch.equal(after[key], base_before[key.replace(".base.", ".")]), f"base tensor {key} changed"
    for key, value in network.state_dict().items():
        if key.endswith(".alpha"):
            assert torch.equal(value, adapter_before[key])
        else:
            assert not torch.equal(value, adapter_before[key]), f"{key} did not train"
    trainable = {n.rsplit(".", 1)[1] for n, p in tiny_unet.named_parameters() if p.requires_grad}
    assert trainable == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}


def adapter_before_suffixes(state: dict[str, torch.Tensor]) -> set[str]:
    return {k.rsplit(".", 1)[1] for k in state}


def test_bad_layers_are_refused():
    with pytest.raises(ValueError, match="groups"):
        LoHaConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 1.0)
    with pytest.raises(ValueError, match="rank"):
        LoHaLinear(nn.Linear(4, 4), 0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        LoHaLinear(nn.Linear(4, 4), 2, 0.0)
    with pytest.raises(TypeError):
        wrap_layer(nn.LayerNorm(4), 2, 1.0)


@pytest.mark.parametrize("path", ["factored", "merged"])
@pytest.mark.parametrize(("name", "base", "x", "kw"), LAYERS, ids=IDS)
def test_fused_kernel_equals_plain_autograd_reference(name, base, x, kw, path):
    """Both fused single-node paths (the default picks per call) against plain autograd over the same maths."""
    layer = _randomize(_wrap(base, rank_dropout=0.3, **kw)).train()
    layer.path = path
    x = x.clone().requires_grad_()
    params = list(layer.parameters(recurse=False))
    results = []
    for fused in (True, False):
        layer.fused = fused
        torch.manual_seed(7)  # the same rank-dropout mask for both
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *params])
        results.append((out, grads))
    (out_f, grads_f), (out_r, grads_r) = results
    torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
    for gf, gr in zip(grads_f, grads_r, strict=True):
        torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["factored", "merged"])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv-cp"])
def test_fused_kernels_pass_gradcheck(kind, path):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = _wrap(nn.Linear(4, 3).double(), rank=2), torch.randn(2, 4, dtype=torch.float64)
    else:
        conv = nn.Conv2d(3, 2, 3, stride=2, padding=1).double()
        layer, x = _wrap(conv, rank=2, use_cp=kind == "conv-cp"), torch.randn(1, 3, 5, 5, dtype=torch.float64)
    _randomize(layer)
    layer.path = path
    params = list(layer.parameters(recurse=False))

    names = [n for n, _ in layer.named_parameters(recurse=False)]

    def functional(x_, *ps):  # the factors as explicit inputs, so gradcheck perturbs them too
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x_,))

    inputs = (x.requires_grad_(), *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(functional, inputs)


def test_fused_kernel_under_bf16_autocast_matches_reference():
    torch.manual_seed(0)
    for base, x in ((nn.Linear(16, 8), torch.randn(4, 16)), (nn.Conv2d(8, 6, 3, padding=1), torch.randn(2, 8, 6, 6))):
        layer = _randomize(wrap_layer(base, 4, 2.0))
        outs = []
        for fused, path in ((True, "factored"), (True, "merged"), (False, "auto")):
            layer.fused, layer.path = fused, path
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x.clone().requires_grad_())
            assert out.dtype == torch.bfloat16
            out.float().sum().backward()
            outs.append((out.float(), layer.hada_w1_a.grad.clone()))
            layer.zero_grad()
        for out, grad in outs[:2]:
            torch.testing.assert_close(out, outs[2][0], rtol=0.05, atol=0.05)
            torch.testing.assert_close(grad, outs[2][1], rtol=0.1, atol=0.1)


def test_auto_path_follows_the_cost_model():
    """Few tokens per weight element: the rank-r^2 path; many (small channels, big images, high rank): merged."""
    small_rank = wrap_layer(nn.Linear(1280, 1280), 8, 8.0)
    factored, merged = small_rank.extra_cost(torch.empty(1024, 1280))
    assert factored < merged
    high_rank = wrap_layer(nn.Linear(320, 320), 32, 32.0)
    factored, merged = high_rank.extra_cost(torch.empty(4096, 320))
    assert merged < factored
    conv = wrap_layer(nn.Conv2d(320, 320, 3, padding=1), 16, 16.0, use_cp=True)
    factored, merged = conv.extra_cost(torch.empty(1, 320, 64, 64))
    assert merged < factored  # the CP core costs r^4 k^2 per pixel

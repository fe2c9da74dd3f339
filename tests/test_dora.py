"""DoRA for LoHa (network.weight_decompose): against lycoris-lora 4.1.3's LohaModule, its files both ways, the
consumers' published rules (WebUI network.py, ComfyUI weight_adapter/base.py), merge and inspect."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_unet
from test_export import _randomise, lycoris_preset
from torch import nn

from loha_train.config import NetworkConfig
from loha_train.fileformat.adapter_io import load_adapter, save_adapter
from loha_train.fileformat.consumer_dora import dora_verdict
from loha_train.fileformat.keys import sd_components
from loha_train.fileformat.spec import inject_from_file, network_config_from_file
from loha_train.loha.inject import inject_loha
from loha_train.loha.layers import wrap_layer

# alpha != rank everywhere, so a missing or doubled scale cannot hide
DORA = NetworkConfig(
    preset="full", rank=4, alpha=3.0, conv_rank=2, conv_alpha=5.0, weight_decompose=True, wd_on_output=True
)


def _layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(12, 10)
    return nn.Conv2d(6, 8, 3, padding=1)


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, 12, generator=g) if kind == "linear" else torch.randn(2, 6, 7, 7, generator=g)


def _loha_delta(m) -> torch.Tensor:
    """DeltaW from the factors by the published formula (plain or CP), scaled by alpha / rank."""
    scale = float(m.alpha) / m.rank
    if m.use_cp:
        f1 = torch.einsum("ijkl,jr,ip->prkl", m.hada_t1, m.hada_w1_b, m.hada_w1_a)
        f2 = torch.einsum("ijkl,jr,ip->prkl", m.hada_t2, m.hada_w2_b, m.hada_w2_a)
        return (f1 * f2 * scale).detach()
    flat = (m.hada_w1_a @ m.hada_w1_b) * (m.hada_w2_a @ m.hada_w2_b) * scale
    return flat.reshape(m.base.weight.shape).detach()


def _dora_formula(w: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, on_output: bool) -> torch.Tensor:
    """LyCORIS's weight decomposition at multiplier 1: (W + dW) * m / ||W + dW||, written out per axis."""
    merged = w + delta
    if on_output:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (w.dim() - 2))
    return merged * m / norm


@pytest.mark.parametrize(
    ("kind", "use_cp", "on_output", "multiplier"),
    [
        ("linear", False, True, 1.0),
        ("linear", False, False, 0.6),
        ("conv", True, True, 0.6),
        ("conv", False, False, 1.0),
    ],
)
def test_dora_layer_equals_lycoris_loha_module(kind, use_cp, on_output, multiplier):
    from lycoris.modules.loha import LohaModule

    base = _layer(kind)
    theirs = LohaModule(
        "m", copy.deepcopy(base), multiplier, 3, 2.0, use_tucker=use_cp, weight_decompose=True, wd_on_out=on_output
    )
    ours = wrap_layer(base, 3, 2.0, use_cp=use_cp, weight_decompose=True, wd_on_output=on_output)
    ours.multiplier = multiplier
    # the untrained magnitude is the base weight's norm, in LyCORIS's shape
    assert ours.dora_scale.shape == theirs.dora_scale.shape
    assert torch.allclose(ours.dora_scale, theirs.dora_scale)
    _randomise_module(ours)
    with torch.no_grad():
        for name, p in ours.adapter_state().items():
            getattr(theirs, name).copy_(p)
    x = _input(kind)
    expected = theirs(x).detach()
    grads = []
    for path in ("factored", "merged"):  # output/input scaling of the rank-r^2 path, or one op on W'
        ours.path = path
        out = ours(x)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5), path
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad})
        ours.zero_grad(set_to_none=True)
    # the gradient reaches every factor and the magnitude, the same by both paths
    assert all(g.abs().sum() > 0 for g in grads[0].values()) and "dora_scale" in grads[0]
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5) for n in grads[0])


def _randomise_module(module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("on_output", [True, False])
def test_merge_bakes_the_dora_formula_and_unmerge_restores(on_output):
    base = _layer("conv")
    original = base.weight.detach().clone()
    layer = wrap_layer(base, 3, 2.0, use_cp=True, weight_decompose=True, wd_on_output=on_output)
    _randomise_module(layer)
    expected = _dora_formula(original, _loha_delta(layer), layer.dora_scale.detach(), on_output)
    x = _input("conv")
    with torch.no_grad():
        unmerged_out = layer(x)
        layer.merge()
        assert torch.allclose(base.weight, expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(layer(x), unmerged_out, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    assert torch.equal(base.weight, original)


def test_untrained_dora_reproduces_the_base_model():
    unet = make_tiny_unet()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, torch.tensor([10]), encoder_hidden_states=ctx).sample
        inject_loha(sd_components(unet, []), DORA, seed=0)
        after = unet(x, torch.tensor([10]), encoder_hidden_states=ctx).sample
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)


def _unet_out(unet: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([3, 700]), encoder_hidden_states=ctx).sample


def test_lycoris_lora_loads_our_dora_file_with_equal_outputs(tmp_path):
    from lycoris import create_lycoris_from_weights

    unet = make_tiny_unet()
    network = inject_loha(sd_components(unet, []), DORA, seed=0)
    _randomise(network, std=0.2)
    with torch.no_grad():  # magnitudes near the base norms, as training leaves them
        for m in network.modules.values():
            m.dora_scale.copy_(m.dora_scale.abs() + 0.5)
    path = save_adapter(network, tmp_path / "dora.safetensors", dtype="fp32")
    state, _ = load_adapter(path)
    assert {k.rsplit(".", 1)[1] for k in state} >= {"dora_scale"}
    conv1 = state["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"]
    assert conv1.shape == (unet.down_blocks[0].resnets[0].conv1.base.weight.shape[0], 1, 1, 1)  # LyCORIS's layout
    ours = _unet_out(unet)

    their_unet = make_tiny_unet()
    with lycoris_preset(lora_prefix="lora_unet"):
        lyco, _ = create_lycoris_from_weights(1.0, str(path), their_unet)
        lyco.apply_to()
    assert len(lyco.loras) == len(network.modules) and all(lora.wd for lora in lyco.loras)
    assert torch.allclose(_unet_out(their_unet), ours, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_unet_out(make_tiny_unet()), ours, rtol=1e-3, atol=1e-3)  # the adapter does act


def test_a_dora_loha_file_written_by_lycoris_loads_into_ours(tmp_path):
    from lycoris import LycorisNetwork

    path = tmp_path / "lycoris-dora.safetensors"
    blocks = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
    their_unet = make_tiny_unet()
    with lycoris_preset(lora_prefix="lora_unet", target_module=blocks, target_name=[], enable_conv=True):
        theirs = LycorisNetwork(
            their_unet, 1.0, lora_dim=4, conv_lora_dim=2, alpha=3, conv_alpha=5, use_tucker=True,
            network_module="loha", weight_decompose=True,
        )  # fmt: skip
        theirs.apply_to()
        _randomise(theirs, seed=5, std=0.2)
        with torch.no_grad():
            for lora in theirs.loras:
                lora.dora_scale.copy_(lora.dora_scale.abs() + 0.5)
        theirs.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    expected = _unet_out(their_unet)

    state, metadata = load_adapter(path)
    spec = network_config_from_file(state, metadata)
    assert {m.dora for m in spec.modules.values()} == {"out"}
    unet = make_tiny_unet()
    ours = inject_from_file(sd_components(unet, []), state, metadata, source=path)
    assert len(ours.modules) == len(theirs.loras)
    assert torch.allclose(_unet_out(unet), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- the consumers
def _webui(w, delta, m, multiplier=1.0):
    """A1111 network.py apply_weight_decompose + finalize_updown: per-input-column norm, always."""
    merged = w + delta
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
    return w + multiplier * (merged * (m / norm) - w)


def _comfy(w, delta, m, strength=1.0):
    """ComfyUI weight_adapter/base.py weight_decompose: axis from dora_scale's shape; the row case uses ||W||."""
    merged = w + delta
    if m.shape[0] == merged.shape[0]:
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(w.dtype).eps
    return w + strength * (merged * (m / norm) - w)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_consumer_rules_and_their_verdicts(kind):
    for on_output in (False, True):
        base = _layer(kind)
        w = base.weight.detach().clone()
        layer = wrap_layer(base, 3, 2.0, use_cp=False, weight_decompose=True, wd_on_output=on_output)
        _randomise_module(layer)
        trained = layer.dora_weight().detach()
        delta, m = _loha_delta(layer), layer.dora_scale.detach()
        axis = "out" if on_output else "in"
        for consumer, rule in (("WebUI", _webui), ("ComfyUI", _comfy)):
            same = torch.allclose(rule(w, delta, m), trained, rtol=1e-4, atol=1e-5)
            assert same == (dora_verdict(consumer, axis)[0] == "exact"), (consumer, axis)


def test_inspect_reports_dora_per_consumer(tmp_path, tiny_sd_dir):
    from loha_train.fileformat.inspection import format_report, inspect_adapter, report_dict

    for on_output in (True, False):
        cfg = NetworkConfig(preset="attn-mlp", rank=4, alpha=3.0, weight_decompose=True, wd_on_output=on_output)
        network = inject_loha(sd_components(make_tiny_unet(), []), cfg, seed=0)
        path = save_adapter(network, tmp_path / f"dora-{on_output}.safetensors", dtype="fp16")
        report = inspect_adapter(path, base=str(tiny_sd_dir))
        text, data = format_report(report), report_dict(report)
        n = len(network.modules)
        row = "per output row" if on_output else "per input column"
        assert f"DoRA (weight decomposition): {n} of {n} modules, dora_scale {row}" in text
        assert all(m["dora"] == ("out" if on_output else "in") for m in data["modules"])
        if on_output:  # WebUI scrambles a per-row magnitude; ComfyUI divides by ||W||
            assert f"WebUI DoRA: {n}/{n} modules wrong" in text and f"ComfyUI DoRA: {n}/{n} modules approximate" in text
            # the tiny UNet is no SD layout WebUI loads, so only ComfyUI counts here; where WebUI applies, it fails
            assert report.ok and report.checks[0].not_applicable is not None
            report.checks[0].not_applicable = None
            assert not report.ok and "DoRA modules applied wrongly" in format_report(report)
        else:
            assert f"WebUI DoRA: {n}/{n} modules exact" in text and f"ComfyUI DoRA: {n}/{n} modules exact" in text
            assert report.ok, text
        json.dumps(data)


def test_merge_command_bakes_the_dora_weight(tmp_path, tiny_sd_dir):
    from safetensors.torch import load_file
    from test_inspect_merge import _file_delta

    from loha_train import cli
    from loha_train.config import ModelConfig
    from loha_train.fileformat.consumers import ConsumerModel, check_comfyui
    from loha_train.models.loading import load_models
    from loha_train.models.single_file import ldm_state_dict

    bundle = load_models(ModelConfig(path=str(tiny_sd_dir)), with_tokenizers=False)
    original = {k: v.detach().clone() for k, v in ldm_state_dict(bundle).items()}
    cfg = NetworkConfig(preset="attn-mlp", rank=4, alpha=3.0, weight_decompose=True, wd_on_output=False)
    network = inject_loha(sd_components(bundle.unet, []), cfg, seed=0)
    _randomise(network, std=0.2)
    with torch.no_grad():
        for m in network.modules.values():
            m.dora_scale.copy_(m.dora_scale.abs() + 0.5)
    adapter = save_adapter(network, tmp_path / "dora.safetensors", dtype="fp32")
    out = tmp_path / "merged.safetensors"
    assert cli.main(["merge", "--base", str(tiny_sd_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    merged = load_file(out)
    state, metadata = load_adapter(adapter)
    spec = network_config_from_file(state, metadata)
    model = ConsumerModel("sd1", {k: tuple(v.shape) for k, v in original.items()}, dict(bundle.unet.config))
    comfy = check_comfyui({key: m.delta_shape for key, m in spec.modules.items()}, model)
    assert comfy.unmatched == {} and len(comfy.targets) == len(network.modules)
    for stem, (ldm_key, _) in comfy.targets.items():
        w = original[ldm_key]
        expected = _dora_formula(w, _file_delta(state, stem, w.shape), state[f"{stem}.dora_scale"], on_output=False)
        assert torch.allclose(merged[ldm_key], expected, rtol=1e-5, atol=1e-6), stem

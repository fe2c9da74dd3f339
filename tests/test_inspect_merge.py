"""`loha-train inspect` and `merge` through the real command line on the built-in tiny SD model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loha_train import cli
from loha_train.config import ModelConfig, config_from_dict, config_to_dict
from loha_train.fileformat.adapter_io import build_metadata, load_adapter, save_adapter
from loha_train.fileformat.consumers import ConsumerModel, check_comfyui
from loha_train.fileformat.keys import sd_components
from loha_train.fileformat.spec import network_config_from_file
from loha_train.loha.inject import inject_loha
from loha_train.models.builtin import resolve_builtin
from loha_train.models.loading import load_models
from loha_train.models.single_file import ldm_state_dict

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base(cache) -> Path:
    """builtin:tiny-sd-random as a diffusers folder, built once into this module's own cache."""
    return resolve_builtin("builtin:tiny-sd-random", cache=cache)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """A trained-looking LoHa file for tiny-sd: UNet (linear, 1x1 and CP 3x3 convs) and text encoder."""
    bundle = load_models(ModelConfig(path=str(base)), with_tokenizers=False)
    cfg = config_from_dict(
        {
            "model": {"path": str(base)},
            "network": {"preset": "full", "rank": 4, "alpha": 3.0, "conv_rank": 2, "conv_alpha": 5.0},
            "data": {"path": "builtin:shapes", "trigger_word": "sks"},
            "train": {"max_steps": 1},
            "output": {"dir": str(tmp_path_factory.mktemp("run"))},
        },
        check_paths=False,
    )
    network = inject_loha(sd_components(bundle.unet, bundle.text_encoders), cfg.network, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    meta = build_metadata(config=config_to_dict(cfg), network=network, family="sd1", prediction_type="epsilon")
    return save_adapter(network, tmp_path_factory.mktemp("adapter") / "shapes.safetensors", dtype="fp32", metadata=meta)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory) -> Path:
    """A valid LoHa file with SDXL keys (lora_te1_, original-layout UNet names)."""
    tensors = {}
    for stem, width in (
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640),
    ):
        tensors |= {
            f"{stem}.hada_w1_a": torch.randn(width, 2),
            f"{stem}.hada_w1_b": torch.randn(2, width),
            f"{stem}.hada_w2_a": torch.randn(width, 2),
            f"{stem}.hada_w2_b": torch.randn(2, width),
            f"{stem}.alpha": torch.tensor(1.0),
        }
    path = tmp_path_factory.mktemp("sdxl") / "xl_style.safetensors"
    save_file(tensors, path)
    return path


def _run(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOHA_TRAIN_CACHE": str(cache)}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)


def _file_delta(state: dict[str, torch.Tensor], stem: str, shape: torch.Size) -> torch.Tensor:
    """The once-scaled LoHa delta straight from the file's tensors (lycoris-format.md), in the weight's shape."""
    a1, b1, a2, b2 = (state[f"{stem}.hada_{n}"].double() for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    scale = float(state[f"{stem}.alpha"]) / b1.shape[0]
    if f"{stem}.hada_t1" in state:
        t1, t2 = state[f"{stem}.hada_t1"].double(), state[f"{stem}.hada_t2"].double()
        factors = [torch.einsum("ijkl,jr,ip->prkl", t, b, a) for t, a, b in ((t1, a1, b1), (t2, a2, b2))]
    else:
        factors = [a1 @ b1, a2 @ b2]
    return (factors[0] * factors[1] * scale).reshape(shape).float()


# ----------------------------------------------------------------------------------------- real subprocesses
def test_inspect_json_through_the_installed_command(adapter, base, cache):
    result = _run(str(BIN / "loha-train"), "inspect", str(adapter), "--base", str(base), "--json", cache=cache)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert report["ok"] is True and report["base"]["unmatched"] == 0
    consumers = report["base"]["consumers"]
    assert consumers["ComfyUI"]["unmatched"] == {} and consumers["ComfyUI"]["loaded"] == len(report["modules"]) == 95
    assert consumers["WebUI"]["applicable"] is False  # tiny-sd has 1 ResNet per level; WebUI's rules assume 2
    kinds = {m["kind"] for m in report["modules"]}
    assert kinds == {"linear", "conv", "conv-cp"}
    assert report["family"] == "sd1"
    assert report["metadata"]["loha_train.config"]["network"]["preset"] == "full"  # JSON entries come parsed


def test_merge_through_python_m_loads_in_diffusers_and_equals_base_plus_delta(adapter, base, cache, tmp_path):
    out = tmp_path / "merged"
    result = _run(sys.executable, "-m", "loha_train", "merge", "--base", str(base), "--adapter", str(adapter),
                  "--out", str(out), "--multiplier", "0.7", cache=cache)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    assert not [p for p in tmp_path.iterdir() if p.name != "merged"]  # no temporary folder left behind

    from diffusers import StableDiffusionPipeline

    merged = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    original = load_models(ModelConfig(path=str(base)), with_tokenizers=False)
    state, _ = load_adapter(adapter)
    stems = {k.split(".")[0] for k in state}
    for name, ours, theirs in (
        ("unet", original.unet, merged.unet),
        ("te", original.text_encoders[0], merged.text_encoder),
    ):
        inject = sd_components(ours, []) if name == "unet" else sd_components(None, [ours])
        prefix = inject[0].prefix
        adapted = 0
        for param_name, before in ours.named_parameters():
            after = theirs.get_parameter(param_name)
            module = param_name.removesuffix(".weight")
            stem = inject[0].key_fn(module, prefix)
            if param_name.endswith(".weight") and stem in stems:
                expected = before + 0.7 * _file_delta(state, stem, before.shape)
                assert torch.allclose(after, expected, atol=1e-6), param_name
                adapted += 1
            else:
                assert torch.equal(after, before), param_name
        assert adapted == sum(1 for s in stems if s.startswith(prefix + "_"))


def test_errors_are_one_paragraph_without_traceback(sdxl_file, base, cache, tmp_path):
    out = tmp_path / "never"
    result = _run(str(BIN / "loha-train"), "merge", "--base", str(base), "--adapter", str(sdxl_file),
                  "--out", str(out), cache=cache)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("loha-train merge: error: ")
    assert str(sdxl_file) in result.stderr and "made for sdxl" in result.stderr and "(sd1)" in result.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ in-process
def test_inspect_shows_table_totals_family_and_provenance(adapter, capsys):
    assert cli.main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in out and "conv-cp" in out
    assert "total: 95 modules" in out and "targets: sd1 (metadata ss_base_model_version=sd_v1)" in out
    assert "ss_network_module: lycoris.kohya" in out and "modelspec.architecture: stable-diffusion-v1/lora" in out
    assert "Provenance (loha_train.*):" in out and '    network: preset="full"' in out
    assert "loha_train.targets: unet: 83, text_encoder: 12" in out


def test_inspect_base_builtin_passes_and_sdxl_file_fails(adapter, sdxl_file, cache, capsys, monkeypatch):
    monkeypatch.setenv("LOHA_TRAIN_CACHE", str(cache))
    assert cli.main(["inspect", str(adapter), "--base", "builtin:tiny-sd-random"]) == 0
    out = capsys.readouterr().out
    assert "ComfyUI: 95/95 keys load, 0 unmatched" in out and "WebUI: not applicable" in out
    assert out.rstrip().endswith("Result: PASS")

    assert cli.main(["inspect", str(sdxl_file), "--base", "builtin:tiny-sd-random"]) == 1
    out = capsys.readouterr().out
    assert "targets: sdxl" in out and "the file targets sdxl, the base model is sd1" in out
    assert "ComfyUI: 0/2 keys load, 2 unmatched" in out and "Result: FAIL: 2 unmatched key(s)" in out


@pytest.mark.parametrize("kind", ["lora", "lokr", "truncated"])
def test_inspect_refuses_files_that_are_not_loha(tmp_path, adapter, capsys, kind):
    path = tmp_path / f"{kind}.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    if kind == "lora":
        save_file({f"{stem}.lora_up.weight": torch.zeros(32, 4), f"{stem}.lora_down.weight": torch.zeros(4, 32)}, path)
    elif kind == "lokr":
        save_file({f"{stem}.lokr_w1": torch.zeros(4, 4), f"{stem}.lokr_w2": torch.zeros(8, 8)}, path)
    else:
        path.write_bytes(adapter.read_bytes()[:-1000])
    assert cli.main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("loha-train inspect: error: ") and captured.err.count("\n") == 1
    assert str(path) in captured.err
    assert {"lora": "LoRA", "lokr": "LoKr", "truncated": "truncated or corrupt"}[kind] in captured.err


def test_merge_single_file_patches_the_weights_comfyui_would(adapter, base, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--multiplier", "1.5"]
    assert cli.main(args) == 0
    merged = load_file(out)
    bundle = load_models(ModelConfig(path=str(base)), with_tokenizers=False)
    original = ldm_state_dict(bundle)
    state, metadata = load_adapter(adapter)
    spec = network_config_from_file(state, metadata)
    model = ConsumerModel("sd1", {k: tuple(v.shape) for k, v in original.items()}, dict(bundle.unet.config))
    comfy = check_comfyui({key: m.delta_shape for key, m in spec.modules.items()}, model)
    assert set(merged) == set(original) and comfy.unmatched == {}
    for stem, (ldm_key, _) in comfy.targets.items():
        expected = original[ldm_key] + 1.5 * _file_delta(state, stem, original[ldm_key].shape)
        assert torch.allclose(merged[ldm_key], expected, atol=1e-6), stem
    patched = {ldm_key for ldm_key, _ in comfy.targets.values()}
    for key in set(original) - patched:
        assert torch.equal(merged[key], original[key]), key

    # an existing output is refused, then replaced with --overwrite
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main([*args[:-1], "1.0", "--overwrite"]) == 0
    assert not torch.equal(load_file(out)[ldm_key], merged[ldm_key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]


def test_anything_but_a_subcommand_is_a_training_run(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_cmd_train", lambda argv: seen.append(list(argv)) or 0)
    assert cli.main(["run.yaml", "--set", "train.max_steps=3"]) == 0
    assert seen == [["run.yaml", "--set", "train.max_steps=3"]]


def test_merge_refuses_weights_that_come_out_non_finite(
    adapter: Path, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_reliability import loha

    out = tmp_path / "merged.safetensors"
    args = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]
    status, _, err = loha([*args, "--multiplier", "1e300"], capsys)  # a finite float that overflows fp32
    assert status == 2 and "is NaN or infinite" in err and "Nothing was written" in err, err
    status, _, err = loha([*args, "--multiplier", "1e7", "--precision", "fp16"], capsys)  # fits fp32, not fp16
    assert status == 2 and "exceeds the largest torch.float16 value (65504)" in err, err
    assert list(tmp_path.iterdir()) == []


def test_merge_into_a_single_file_base_keeps_every_tensor_and_the_metadata_it_does_not_patch(adapter, base, tmp_path):
    """kohya merges into the checkpoint's own state dict: keys the diffusers layout drops (EMA, logit_scale, other
    extras) and the base's metadata survive, and only the tensors ComfyUI would patch change."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from loha_train.models.single_file import save_single_file

    bundle = load_models(ModelConfig(path=str(base)), with_tokenizers=False)
    plain = save_single_file(bundle, tmp_path / "plain.safetensors")
    original = load_file(plain)
    extras = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.diffusion_modelinput_blocks00weight": torch.randn(4, 4, 3, 3),
        "model_ema.num_updates": torch.tensor(12345, dtype=torch.int64),
        "cond_stage_model.logit_scale": torch.tensor(4.6052),
        "first_stage_model.quant_conv.bias.fp16": torch.randn(8).half(),
    }
    with safe_open(plain, framework="pt") as f:
        base_meta = {**f.metadata(), "modelspec.title": "my base", "ss_extra": "kept"}
    base_file = tmp_path / "base.safetensors"
    save_file({**original, **extras}, base_file, metadata=base_meta)

    out = tmp_path / "merged.safetensors"
    args = ["merge", "--base", str(base_file), "--adapter", str(adapter), "--out", str(out), "--multiplier", "1.5"]
    assert cli.main(args) == 0
    merged = load_file(out)
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == base_meta
    assert set(merged) == set(original) | set(extras)

    state, metadata = load_adapter(adapter)
    spec = network_config_from_file(state, metadata)
    model = ConsumerModel("sd1", {k: tuple(v.shape) for k, v in original.items()}, dict(bundle.unet.config))
    comfy = check_comfyui({key: m.delta_shape for key, m in spec.modules.items()}, model)
    assert comfy.unmatched == {}
    for stem, (ldm_key, _) in comfy.targets.items():
        expected = original[ldm_key] + 1.5 * _file_delta(state, stem, original[ldm_key].shape)
        assert torch.allclose(merged[ldm_key], expected, atol=1e-6), stem
    patched = {ldm_key for ldm_key, _ in comfy.targets.values()}
    source = {**original, **extras}
    for key in set(source) - patched:  # byte-identical: same dtype, same bits
        assert merged[key].dtype == source[key].dtype and torch.equal(merged[key], source[key]), key

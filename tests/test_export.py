"""Export/import of LoHa files: round trips, lycoris-lora both ways, hashes, metadata, validation, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_text_encoder, make_tiny_unet
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn

from loha_train.config import NetworkConfig, config_from_dict, config_to_dict
from loha_train.fileformat import adapter_io
from loha_train.fileformat.adapter_io import AdapterError, apply_adapter, load_adapter, save_adapter
from loha_train.fileformat.keys import sd_components
from loha_train.fileformat.metadata import build_metadata
from loha_train.fileformat.spec import inject_from_file, network_config_from_file
from loha_train.loha.inject import inject_loha

# alpha != rank everywhere, so a missing or doubled scale cannot hide
FULL = NetworkConfig(preset="full", train_text_encoder=True, rank=4, alpha=3.0, conv_rank=2, conv_alpha=5.0)


def _randomise(network, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _trained(cfg: NetworkConfig = FULL, seed: int = 1):
    unet, te = make_tiny_unet(), make_tiny_text_encoder()
    network = inject_loha(sd_components(unet, [te]), cfg, seed=0)
    _randomise(network, seed)
    return unet, te, network


def _outputs(unet, te):
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    ids = torch.tensor([[0, 5, 9, 33, 2] + [1] * 72])
    with torch.no_grad():
        return unet(x, torch.tensor([3, 700]), encoder_hidden_states=ctx).sample, te(ids).last_hidden_state


def _kinds(network) -> set[str]:
    kinds = set()
    for m in network.modules.values():
        if isinstance(m.base, nn.Linear):
            kinds.add("linear")
        else:
            kinds.add("conv-cp" if m.use_cp else ("conv1x1" if m.base.kernel_size == (1, 1) else "conv-plain"))
    return kinds


# ------------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_round_trip_reproduces_tensors_and_outputs(tmp_path, dtype):
    unet, te, network = _trained()
    path = save_adapter(network, tmp_path / "a.safetensors", dtype=dtype)
    state, metadata = load_adapter(path)
    torch_dtype = adapter_io.SAVE_DTYPES[dtype]
    own = network.state_dict()
    assert set(state) == set(own)
    for key, tensor in own.items():
        if key.endswith(".alpha"):  # kept float32, so alpha / rank is the trained scale at every precision
            assert state[key].dtype == torch.float32 and state[key].shape == () and float(state[key]) == float(tensor)
        else:
            assert state[key].dtype == torch_dtype and torch.equal(state[key], tensor.detach().to(torch_dtype)), key
    assert metadata["sshs_model_hash"]

    # a fresh model with the file applied computes exactly what the trained one does with rounded factors
    with torch.no_grad():
        for tensor in own.values():
            tensor.copy_(tensor.to(torch_dtype).float())
    expected = _outputs(unet, te)
    fresh_unet, fresh_te = make_tiny_unet(), make_tiny_text_encoder()
    fresh = inject_loha(sd_components(fresh_unet, [fresh_te]), FULL, seed=123)
    apply_adapter(fresh, state)
    for got, want in zip(_outputs(fresh_unet, fresh_te), expected, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(expected[0], _outputs(make_tiny_unet(), make_tiny_text_encoder())[0])  # it does something


def test_network_config_from_file_reinjects_a_file_without_its_config(tmp_path):
    cfg = NetworkConfig(
        preset="full",
        rank=4,
        alpha=3.0,
        conv_rank=2,
        use_cp=False,
        rank_pattern={"attn2": 6},
        alpha_pattern={"ff": 1.5},
    )
    _, _, network = _trained(cfg)
    path = save_adapter(network, tmp_path / "a.safetensors", dtype="fp32")
    state, metadata = load_adapter(path)
    spec = network_config_from_file(state, metadata)
    assert set(spec.modules) == set(network.modules)
    for key, module in network.modules.items():
        got = spec.modules[key]
        assert (got.rank, got.alpha, got.use_cp) == (module.rank, float(module.alpha), module.use_cp), key
    fresh_unet = make_tiny_unet()
    fresh = inject_from_file(sd_components(fresh_unet, [make_tiny_text_encoder()]), state, metadata, source=path)
    for key, module in network.modules.items():
        assert torch.allclose(fresh.modules[key].delta_weight(), module.delta_weight(), atol=1e-6), key


# --------------------------------------------------------------------------------------- lycoris-lora interop
_LYCORIS_STATE = (
    "LORA_PREFIX",
    "TARGET_REPLACE_MODULE",
    "TARGET_REPLACE_NAME",
    "ENABLE_CONV",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)


@contextmanager
def lycoris_preset(**preset):
    """lycoris-lora keeps its naming prefix and targets as class state: set them, and always restore them."""
    from lycoris import LycorisNetwork

    saved = {k: getattr(LycorisNetwork, k) for k in _LYCORIS_STATE}
    LycorisNetwork.apply_preset(preset)
    try:
        yield LycorisNetwork
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
        LycorisNetwork.apply_preset({"lora_prefix": "lycoris"})


class _TextModelHolder(nn.Module):
    """transformers 5 dropped CLIPTextModel's `text_model` level; the consumers' names still have it."""

    def __init__(self, te: nn.Module) -> None:
        super().__init__()
        self.text_model = te


def _lycoris_deltas(path: Path, root: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    from lycoris import create_lycoris_from_weights

    with lycoris_preset(lora_prefix=prefix):
        network, _ = create_lycoris_from_weights(1.0, str(path), root)
    with torch.no_grad():
        return {lora.lora_name: lora.get_weight(lora.shape).float() for lora in network.loras}


@pytest.mark.parametrize("use_cp", [True, False])
def test_lycoris_lora_loads_our_file_with_our_delta_weights(tmp_path, use_cp):
    cfg = NetworkConfig(
        preset="full", train_text_encoder=True, rank=4, alpha=3.0, conv_rank=2, conv_alpha=5.0, use_cp=use_cp
    )
    _, _, network = _trained(cfg)
    assert _kinds(network) == {"linear", "conv1x1", "conv-cp" if use_cp else "conv-plain"}
    path = save_adapter(network, tmp_path / "ours.safetensors", dtype="fp32")
    theirs = _lycoris_deltas(path, make_tiny_unet(), "lora_unet")
    theirs |= _lycoris_deltas(path, _TextModelHolder(make_tiny_text_encoder()), "lora_te")
    assert set(theirs) == set(network.modules)  # every module found: nothing silently dropped
    for key, module in network.modules.items():
        ours = module.delta_weight().detach()
        assert theirs[key].shape == ours.shape, key
        assert torch.allclose(theirs[key], ours, rtol=1e-5, atol=1e-6), key


def test_a_loha_file_written_by_lycoris_lora_loads_into_our_model(tmp_path):
    from lycoris import LycorisNetwork

    path = tmp_path / "lycoris.safetensors"
    blocks = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
    with lycoris_preset(lora_prefix="lora_unet", target_module=blocks, target_name=[], enable_conv=True):
        theirs = LycorisNetwork(
            make_tiny_unet(),
            1.0,
            lora_dim=4,
            conv_lora_dim=2,
            alpha=3,
            conv_alpha=5,
            use_tucker=True,
            network_module="loha",
        )
        theirs.apply_to()
        _randomise(theirs, seed=5)
        theirs.save_weights(str(path), torch.float16, {"ss_network_module": "lycoris.kohya"})
        their_deltas = {lora.lora_name: lora.get_weight(lora.shape).detach().float() for lora in theirs.loras}
    assert any(lora.tucker for lora in theirs.loras)

    state, metadata = load_adapter(path)
    unet = make_tiny_unet()
    ours = inject_from_file(sd_components(unet, []), state, metadata, source=path)
    assert set(ours.modules) == set(their_deltas)
    for key, module in ours.modules.items():
        # lycoris computes in the saved fp16; ours in float32 from the same fp16 factors
        assert torch.allclose(module.delta_weight().detach(), their_deltas[key], rtol=1e-2, atol=1e-3), key


# ------------------------------------------------------------------------------------------ hashes, metadata
def _config(**network):
    raw = {
        "model": {"path": "builtin:tiny-sd-random", "clip_skip": 2},
        "network": {"preset": "full", "rank": 4, "alpha": 3.0, "conv_rank": 2, "rank_pattern": {"attn2": 6}, **network},
        "data": {"path": "builtin:shapes", "trigger_word": "sks", "resolution": 256},
        "train": {"max_steps": 10, "seed": 7},
        "output": {"dir": "/tmp/run", "name": "shapes-loha", "trigger_words": ["sks", "shape"]},
    }
    return config_from_dict(raw, check_paths=False)


def _metadata(cfg, network, family="sd1", prediction="epsilon"):
    return build_metadata(
        config=config_to_dict(cfg),
        network=network,
        family=family,
        prediction_type=prediction,
        base_model_hash="ab" * 32,
        base_model_name="builtin:tiny-sd-random",
        dataset={
            "fingerprint": {"images": 16, "sha256": "cd" * 32},
            "tag_frequency": {"shapes": {"a red circle": 2}},
            "bucket_info": {"buckets": {0: {"resolution": [256, 256], "count": 16}}, "mean_img_ar_error": 0.0},
            "dirs": {"/data/shapes": 16},
            "num_train_images": 16,
            "num_reg_images": 0,
        },
        plan={"total_steps": 10, "effective_batch": 1, "steps_per_epoch": 16},
        stats={"steps": 10, "epoch": 1, "finished_at": 1_700_000_100.5},
        started_at=1_700_000_000.25,
    )


def test_file_hashes_alpha_and_metadata_are_what_consumers_read(tmp_path):
    cfg = _config(rank=32, conv_rank=16)  # > 1 MiB of tensors, so the legacy hash window holds data
    _, _, network = _trained(cfg.network)
    path = save_adapter(network, tmp_path / "a.safetensors", dtype="fp32", metadata=_metadata(cfg, network))
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len :]).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    # sd-scripts: the window at 1 MiB of the file serialised with only its ss_* metadata
    tensors = load_file(path)
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert len(ss_only) > 0x110000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]

    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == len(network.modules)
    assert all(v.shape == () and float(v) != 0 for v in alphas.values())
    assert all(t.is_contiguous() for t in tensors.values())
    assert all(isinstance(v, str) for v in meta.values())
    parsed = {k: json.loads(v) for k, v in meta.items() if v.startswith("{")}  # WebUI parses these
    assert {"ss_network_args", "ss_tag_frequency", "ss_bucket_info", "ss_dataset_dirs", "loha_train.config"} <= set(
        parsed
    )


def test_metadata_content():
    cfg = _config()
    _, _, network = _trained(cfg.network)
    meta = _metadata(cfg, network)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "3.0")
    assert json.loads(meta["ss_network_args"]) | {"algo": "loha", "conv_dim": "2", "use_tucker": "True"} == json.loads(
        meta["ss_network_args"]
    )
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.resolution"] == "256x256" and meta["ss_resolution"] == "(256, 256)"
    assert float(meta["ss_training_started_at"]) == 1_700_000_000.25  # WebUI shows float(value) as a date
    assert meta["ss_clip_skip"] == "2" and meta["ss_steps"] == "10" and meta["ss_seed"] == "7"
    assert json.loads(meta["ss_dataset_dirs"]) == {"shapes": {"n_repeats": 1, "img_count": 16}}
    assert meta["modelspec.trigger_phrase"] == "sks, shape"
    assert json.loads(meta["loha_train.trigger_words"]) == ["sks", "shape"]
    assert json.loads(meta["loha_train.dataset_fingerprint"])["images"] == 16
    assert meta["loha_train.base_model_hash"] == "ab" * 32
    # the resolved config reloads to the same Config, and the expanded preset is recorded
    assert config_from_dict(json.loads(meta["loha_train.config"]), check_paths=False) == cfg
    targets = json.loads(meta["loha_train.targets"])
    assert sum(targets["modules"].values()) == len(network.modules)
    assert set(targets["targets"]["unet"]) == {q.split(".", 1)[1] for q in network.qualnames.values() if q[0] == "u"}
    overrides = targets["rank_alpha_overrides"]
    assert overrides and all("attn2" in k and v["rank"] == 6 for k, v in overrides.items())

    sd2 = _metadata(cfg, network, "sd2", "v_prediction")
    assert (sd2["ss_base_model_version"], sd2["ss_v2"]) == ("sd_v2_v", "True")
    assert (sd2["modelspec.architecture"], sd2["modelspec.prediction_type"]) == ("stable-diffusion-v2-768-v/lora", "v")
    sdxl = _metadata(cfg, network, "sdxl")
    assert sdxl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


# ------------------------------------------------------------------------------------------------ atomicity
def test_a_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    _, _, network = _trained(NetworkConfig(preset="attn-only", rank=2))
    path = save_adapter(network, tmp_path / "a.safetensors")
    good = path.read_bytes()
    _randomise(network, seed=9)

    def crash(tmp: Path, final: Path) -> None:
        assert tmp.parent == final.parent and tmp.stat().st_size > 0  # the new file was fully written
        raise OSError("disk vanished")

    monkeypatch.setattr(adapter_io, "_publish", crash)
    with pytest.raises(OSError, match="disk vanished"):
        save_adapter(network, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["a.safetensors"]


# ------------------------------------------------------------------------------------------------ validation
def _loha_module(prefix: str, out: int = 8, inp: int = 8, rank: int = 2, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.hada_w1_a": torch.randn(out, rank),
        f"{prefix}.hada_w1_b": torch.randn(rank, inp),
        f"{prefix}.hada_w2_a": torch.randn(out, rank),
        f"{prefix}.hada_w2_b": torch.randn(rank, inp),
        f"{prefix}.alpha": torch.tensor(alpha),
    }


_STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
BAD_FILES = {
    "lora": ({f"{_STEM}.lora_up.weight": torch.zeros(8, 2), f"{_STEM}.lora_down.weight": torch.zeros(2, 8)}, "LoRA"),
    "lokr": ({f"{_STEM}.lokr_w1": torch.zeros(2, 2), f"{_STEM}.lokr_w2": torch.zeros(4, 4)}, "LoKr"),
    "checkpoint": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, "full Stable Diffusion"),
    "peft": ({"base_model.model.down_blocks.0.hada_w1_a": torch.zeros(2, 2)}, "PEFT"),
    "lycoris_prefix": (_loha_module("lycoris_down_blocks_0_attn1_to_q"), "lycoris_ prefix"),
    "alpha_zero": (_loha_module(_STEM, alpha=0.0), "alpha is 0"),
    "incomplete": ({k: v for k, v in _loha_module(_STEM).items() if "w2_b" not in k}, "missing hada_w2_b"),
    "bad_shapes": ({**_loha_module(_STEM), f"{_STEM}.hada_w2_b": torch.zeros(3, 8)}, "inconsistent factor shapes"),
    "nan": ({**_loha_module(_STEM), f"{_STEM}.hada_w1_a": torch.full((8, 2), float("nan"))}, "NaN"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_files_that_are_not_usable_loha_are_one_paragraph_errors(tmp_path, name):
    tensors, expected = BAD_FILES[name]
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    with pytest.raises(AdapterError) as err:
        load_adapter(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_truncated_and_garbage_files_are_errors(tmp_path):
    _, _, network = _trained(NetworkConfig(preset="attn-only", rank=2))
    path = save_adapter(network, tmp_path / "a.safetensors")
    data = path.read_bytes()
    for name, content in (("truncated", data[: len(data) - 100]), ("garbage", b"\x07" * 64), ("empty", b"")):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(AdapterError, match="truncated or corrupt") as err:
            load_adapter(bad)
        assert str(bad) in str(err.value)
    with pytest.raises(AdapterError, match="no such file"):
        load_adapter(tmp_path / "missing.safetensors")


def test_missing_alpha_means_scale_one_as_in_webui_and_comfyui(tmp_path, caplog):
    tensors = {k: v for k, v in _loha_module(_STEM, rank=2).items() if not k.endswith("alpha")}
    save_file(tensors, tmp_path / "a.safetensors")
    state, _ = load_adapter(tmp_path / "a.safetensors")
    assert float(state[f"{_STEM}.alpha"]) == 2.0
    assert "no alpha" in caplog.text


def test_apply_names_the_file_and_lists_mismatches(tmp_path):
    _, _, network = _trained(NetworkConfig(preset="attn-only", rank=2))
    path = save_adapter(network, tmp_path / "a.safetensors")
    state, _ = load_adapter(path)
    other = inject_loha(sd_components(make_tiny_unet(), []), NetworkConfig(preset="attn-only", rank=3))
    with pytest.raises(AdapterError) as err:
        apply_adapter(other, state, source=path)
    assert str(path) in str(err.value) and "wrong shape" in str(err.value) and "unexpected" in str(err.value)


def test_a_file_for_other_dimensions_is_refused_before_touching_the_model(tmp_path):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # tiny: 32 -> 32
    save_file(_loha_module(stem, out=320, inp=768), tmp_path / "sd15.safetensors")  # SD 1.5's 768 -> 320
    state, metadata = load_adapter(tmp_path / "sd15.safetensors")
    unet = make_tiny_unet()
    with pytest.raises(AdapterError) as err:
        inject_from_file(sd_components(unet, []), state, metadata, source="sd15.safetensors", family="sd1")
    message = str(err.value)
    assert "made for sd1" in message and "768-wide text context" in message
    assert "wrong shape" in message and "file delta (320, 768), model weight (32, 32)" in message
    assert not any(type(m).__name__.startswith("LoHa") for m in unet.modules())

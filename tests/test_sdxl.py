"""SDXL on the built-in tiny model: two text encoders, size/crop conditioning, original-layout keys, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import expected_sdxl_keys
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train import assert_same_run, losses, run, tiny_config
from torch import nn

from loha_train import cli, data
from loha_train.config import ModelConfig, NetworkConfig
from loha_train.fileformat.adapter_io import AdapterError, load_adapter, save_adapter
from loha_train.fileformat.consumers import ConsumerModel, check_comfyui, comfy_unet_config, comfy_unet_to_diffusers
from loha_train.fileformat.keys import sd_components
from loha_train.fileformat.merge import merge_adapter
from loha_train.fileformat.spec import inject_from_file
from loha_train.loha.inject import inject_loha
from loha_train.models.bundle import ModelBundle
from loha_train.models.encode import encode_captions
from loha_train.models.loading import load_models
from loha_train.models.single_file import ldm_state_dict
from loha_train.training import data_pipeline, step
from loha_train.training.sampling import SampleModels, make_pipeline

pytestmark = pytest.mark.usefixtures("builtin_cache", "fresh_accelerate")

XL = "builtin:tiny-sdxl"
# alpha != rank everywhere, so a missing or doubled scale cannot hide; CP on the 3x3 convs
FULL = NetworkConfig(preset="full", train_text_encoder=True, rank=4, alpha=3.0, conv_rank=2, conv_alpha=5.0)


def _bundle() -> ModelBundle:
    return load_models(ModelConfig(path=XL))


def _trained(seed: int = 1) -> tuple[ModelBundle, Any]:
    bundle = _bundle()
    network = inject_loha(sd_components(bundle.unet, bundle.text_encoders, family="sdxl"), FULL, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return bundle, network


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, builtin_cache: Path) -> tuple[ModelBundle, Any, Path]:
    bundle, network = _trained()
    path = save_adapter(network, tmp_path_factory.mktemp("xl") / "xl.safetensors", dtype="fp32")
    return bundle, network, path


# ------------------------------------------------------------------------------------------------ training
HARD = {  # accumulation, captions that vary (no text cache: both encoders run every step), both dropouts
    "model__path": XL,
    "network__train_text_encoder": True,
    "train__text_encoder_lr": 5e-4,
    "train__gradient_accumulation": 2,
    "data__shuffle_captions": True,
    "data__caption_dropout": 0.2,
    "network__rank_dropout": 0.2,
    "network__module_dropout": 0.1,
    "sample__prompts": ["a red circle"],  # the SDXL pipeline over the adapted models, at the start and the end
    "sample__steps": 2,
}


def test_sdxl_trains_end_to_end_and_resumes_exactly(tmp_path: Path) -> None:
    run(tmp_path / "straight", **HARD, train__max_steps=6)
    run(tmp_path / "split", **HARD, train__max_steps=3)
    run(tmp_path / "split", resume="latest", **HARD, train__max_steps=6)
    assert_same_run(tmp_path / "straight", tmp_path / "split", 6)
    assert [s for s, _ in losses(tmp_path / "split")] == list(range(1, 7))

    out = tmp_path / "straight"
    assert sorted(p.name for p in (out / "samples").glob("*-00.png")) == ["step-000000-00.png", "step-000006-00.png"]
    with safe_open(str(out / "loha.safetensors"), framework="pt") as f:
        stems = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    prefixes = {s.split("_text_model")[0] if "_te" in s else "lora_unet" for s in stems}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert not any(s.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for s in stems)
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_sdxl_dry_run_plan_names_the_detected_family(tmp_path: Path) -> None:
    from loha_train.training.recipe import train

    lines: list[str] = []
    train(tiny_config(tmp_path, model__path=XL), dry_run=True, echo=lines.append)
    plan = "\n".join(lines)
    assert "(sdxl, epsilon, diffusers)" in plan
    assert "family sdxl: model_index.json: text_encoder_2" in plan
    assert "prediction epsilon: scheduler/scheduler_config.json: prediction_type=epsilon" in plan


# ---------------------------------------------------------------------------------------------- conditioning
def _two_non_square_samples(bundle: ModelBundle) -> tuple[dict[str, Any], list[data.CropPlan], list[Path]]:
    cfg = tiny_config(Path("unused"), model__path=XL)
    data_cfg = data_pipeline.resolve_data_config(cfg.data)
    index = data.check_images(data.scan_dataset(data_cfg, 0), skip_bad=False).index
    dataset = data.ImageDataset(index.train, data_cfg, seed=0)
    wanted = [i for i, item in enumerate(dataset.items) if item.size in ((128, 96), (96, 128))][:2]
    ref = data.BucketBatchSampler(dataset.items, dataset.buckets, 1, 0).epoch_batches(0)[0][0]
    batch = data.collate([dataset[ref._replace(item=i)] for i in wanted])
    return batch, [dataset.plans[i] for i in wanted], [dataset.items[i].path for i in wanted]


def test_size_and_crop_conditioning_is_what_the_diffusers_sdxl_pipeline_builds() -> None:
    from PIL import Image

    bundle = _bundle()
    batch, plans, paths = _two_non_square_samples(bundle)
    cfg = tiny_config(Path("unused"), model__path=XL)
    cond = step.conditioning(cfg, bundle, batch, torch.device("cpu"))
    pipe = make_pipeline(SampleModels(bundle.unet, bundle.vae, bundle.text_encoders, bundle.tokenizers, {}), "euler")
    projection = bundle.text_encoders[1].config.projection_dim
    expected = []
    for plan, path in zip(plans, paths, strict=True):
        with Image.open(path) as image:
            original = (image.height, image.width)
        target = (plan.target[1], plan.target[0])
        expected.append(pipe._get_add_time_ids(original, (plan.top, plan.left), target, torch.float32, projection))
        assert original[0] != original[1] and plan.top != plan.left  # a swapped pair could not hide
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], torch.cat(expected))

    # the text conditioning is the pipeline's: penultimate layers of both encoders side by side, pooled from the second
    embeds, _, pooled, _ = pipe.encode_prompt(batch["captions"], device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["added_cond_kwargs"]["text_embeds"], pooled)
    cached = encode_captions(bundle.text_encoders, bundle.tokenizers, batch["captions"])  # what the text cache holds
    assert torch.equal(cached["text_embeds"], pooled)


# -------------------------------------------------------------------------------------------- exported keys
def test_exported_keys_are_the_consumers_sdxl_names_and_patch_the_trained_weights(exported) -> None:
    _, _, path = exported
    fresh = _bundle()  # identically built, untouched
    state, _ = load_adapter(path)
    stems = {k.split(".")[0] for k in state}
    assert stems == expected_sdxl_keys(fresh.unet, fresh.text_encoders)  # "full": every mapped module

    ldm = ldm_state_dict(fresh)
    model = ConsumerModel("sdxl", {k: tuple(v.shape) for k, v in ldm.items()}, dict(fresh.unet.config))
    deltas = {}
    for stem in stems:
        a, b = state[f"{stem}.hada_w1_a"], state[f"{stem}.hada_w1_b"]
        cp = f"{stem}.hada_t1" in state
        deltas[stem] = (a.shape[1], b.shape[1], *state[f"{stem}.hada_t1"].shape[2:]) if cp else (a.shape[0], b.shape[1])
    comfy = check_comfyui(deltas, model)
    assert comfy.unmatched == {} and set(comfy.targets) == stems
    # each key patches the very weight of the module it was trained on (same values in the single-file layout)
    modules = {**_named_weights(fresh.unet, "lora_unet"), **_te_weights(fresh)}
    for stem, (ldm_key, part) in comfy.targets.items():
        weight = ldm[ldm_key] if part is None else ldm[ldm_key].chunk(3)[part]
        assert torch.equal(weight, modules[stem]), stem


def _named_weights(unet: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Original-layout key stem -> weight, by ComfyUI's diffusers -> LDM table (independent of inject.py)."""
    table = comfy_unet_to_diffusers(comfy_unet_config(unet.config))
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d) and f"{name}.weight" in table:
            out[prefix + "_" + table[f"{name}.weight"].removesuffix(".weight").replace(".", "_")] = module.weight
    return out


def _te_weights(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    out = {}
    for i, te in enumerate(bundle.text_encoders, start=1):
        for name, module in te.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                out[f"lora_te{i}_text_model_" + name.removeprefix("text_model.").replace(".", "_")] = module.weight
    return out


# ------------------------------------------------------------------------------------------ lycoris-lora
def _sgm_view(unet: nn.Module) -> nn.Module:
    """The UNet's Linear/Conv2d modules (the same objects) under their original-layout paths, by ComfyUI's table:
    the module tree lycoris-lora names `lora_unet_input_blocks_...` after, as kohya's SDXL UNet has them."""
    root = nn.Module()
    table = comfy_unet_to_diffusers(comfy_unet_config(unet.config))
    for name, module in unet.named_modules():
        if not (isinstance(module, nn.Linear | nn.Conv2d) and f"{name}.weight" in table):
            continue
        *parents, leaf = table[f"{name}.weight"].removesuffix(".weight").split(".")
        parent = root
        for part in parents:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, module)
    return root


class _TextModelHolder(nn.Module):
    """transformers 5 dropped CLIPTextModel's `text_model` level; the consumers' names still have it."""

    def __init__(self, te: nn.Module) -> None:
        super().__init__()
        self.text_model = te


def _outputs(bundle: ModelBundle) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x, ctx = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 77, bundle.unet.config.cross_attention_dim, generator=g),
    )
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[96.0, 128, 0, 16, 96, 96]] * 2)}
    ids = torch.tensor([[0, 5, 9, 33, 2] + [1] * 72])
    with torch.no_grad():
        unet = bundle.unet(x, torch.tensor([3, 700]), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        return [unet] + [te(ids, output_hidden_states=True).hidden_states[-2] for te in bundle.text_encoders]


def test_lycoris_lora_loads_the_sdxl_file_onto_an_identical_model_with_our_weights(exported) -> None:
    from lycoris import LycorisNetwork, create_lycoris_from_weights

    bundle, network, path = exported
    fresh = _bundle()
    roots = {
        "lora_unet": _sgm_view(fresh.unet),
        "lora_te1": _TextModelHolder(fresh.text_encoders[0]),
        "lora_te2": fresh.text_encoders[1],  # CLIPTextModelWithProjection keeps the text_model level
    }
    theirs, loaded = {}, []
    try:
        for prefix, root in roots.items():
            LycorisNetwork.apply_preset({"lora_prefix": prefix})
            lyco, _ = create_lycoris_from_weights(1.0, str(path), root)
            theirs |= {lora.lora_name: lora for lora in lyco.loras}
            loaded.append(lyco)
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": "lycoris"})
    assert set(theirs) == set(network.modules)  # every key found a module: nothing silently dropped
    for key, module in network.modules.items():
        with torch.no_grad():
            ours, their = module.delta_weight(), theirs[key].get_weight(theirs[key].shape).float()
        assert their.shape == ours.shape and torch.allclose(their, ours, rtol=1e-5, atol=1e-6), key

    # lycoris-lora's own forward on the fresh model computes what ours does
    for lyco in loaded:
        lyco.apply_to()
    for got, want in zip(_outputs(fresh), _outputs(bundle), strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_outputs(_bundle())[0], _outputs(bundle)[0], atol=1e-3)  # the adapter does something


# ------------------------------------------------------------------------------------ reading SDXL files back
def test_merge_and_inspect_accept_original_layout_keys(exported, tmp_path: Path, capsys) -> None:
    _, _, path = exported
    assert cli.main(["inspect", str(path), "--base", XL]) == 0
    out = capsys.readouterr().out
    assert "targets: sdxl" in out and "ComfyUI: " in out and out.rstrip().endswith("Result: PASS")

    merged_path = merge_adapter(XL, path, tmp_path / "merged.safetensors", multiplier=0.5)
    merged, original = load_file(merged_path), ldm_state_dict(_bundle())
    state, metadata = load_adapter(path)
    reference = _bundle()
    network = inject_from_file(sd_components(reference.unet, reference.text_encoders), state, metadata)
    comfy = check_comfyui({k: _delta_shape(m) for k, m in network.modules.items()}, _consumer_model(original))
    assert comfy.unmatched == {}
    for stem, (ldm_key, part) in comfy.targets.items():
        delta = network.modules[stem].delta_weight().detach()
        before, after = original[ldm_key], merged[ldm_key]
        if part is not None:
            before, after = before.chunk(3)[part], after.chunk(3)[part]
        assert torch.allclose(after, before + 0.5 * delta.reshape(before.shape), atol=1e-6), stem


def _delta_shape(module: Any) -> tuple[int, ...]:
    shape = tuple(module.base.weight.shape)
    return shape if module.use_cp or len(shape) == 2 else (shape[0], shape[1] * shape[2] * shape[3])


def _consumer_model(ldm: dict[str, torch.Tensor]) -> ConsumerModel:
    return ConsumerModel("sdxl", {k: tuple(v.shape) for k, v in ldm.items()}, dict(_bundle().unet.config))


def test_a_diffusers_layout_sdxl_file_still_loads_and_a_module_named_twice_is_refused(exported, tmp_path: Path) -> None:
    _, network, path = exported
    state, _ = load_adapter(path)
    sgm_to_diffusers = {key: "lora_unet_" + network.qualnames[key].removeprefix("unet.").replace(".", "_")
                        for key in network.modules if key.startswith("lora_unet_")}  # fmt: skip
    renamed = {}
    for key, tensor in state.items():
        stem, _, suffix = key.partition(".")
        renamed[f"{sgm_to_diffusers.get(stem, stem)}.{suffix}"] = tensor
    save_file(renamed, tmp_path / "diffusers_names.safetensors")
    other_state, metadata = load_adapter(tmp_path / "diffusers_names.safetensors")
    fresh = _bundle()
    loaded = inject_from_file(sd_components(fresh.unet, fresh.text_encoders), other_state, metadata)
    for sgm, diffusers_name in sgm_to_diffusers.items():
        assert torch.equal(loaded.modules[diffusers_name].delta_weight(), network.modules[sgm].delta_weight())

    upsampler = "lora_unet_output_blocks_1_2_conv"
    copies = {k.replace(upsampler, sgm_to_diffusers[upsampler]): v.clone() for k, v in state.items() if upsampler in k}
    twice = {**state, **copies}
    save_file(twice, tmp_path / "twice.safetensors")
    twice_state, _ = load_adapter(tmp_path / "twice.safetensors")
    other = _bundle()
    with pytest.raises(AdapterError, match=r"name the same module.*output_blocks_1_2_conv.*up_blocks_0_upsamplers"):
        inject_from_file(sd_components(other.unet, other.text_encoders), twice_state, source="twice.safetensors")


def test_sd_components_infers_sdxl_naming_without_text_encoders() -> None:
    bundle = _bundle()
    unet_only = inject_loha(sd_components(bundle.unet), NetworkConfig(preset="attn-only", rank=2))
    assert all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
               for k in unet_only.modules)  # fmt: skip

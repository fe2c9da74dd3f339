"""Loading base models (diffusers folder, single file, builtin), detection, hashing, single-file writing."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loha_train.config import ModelConfig
from loha_train.models import hashing, layout, single_file
from loha_train.models import loading as models
from loha_train.models.builtin import resolve_builtin
from loha_train.models.bundle import ModelBundle, ModelError
from loha_train.models.clip_bpe import train_clip_bpe, write_clip_tokenizer
from loha_train.models.detect import detect_model, model_hash
from loha_train.models.loading import load_models
from loha_train.models.single_file import save_single_file

TINY = ("tiny-sd-random", "tiny-sd-v", "tiny-sdxl")


def _components(bundle: ModelBundle) -> dict[str, torch.nn.Module]:
    return {"unet": bundle.unet, "vae": bundle.vae} | {f"te{i}": m for i, m in enumerate(bundle.text_encoders)}


def assert_same_weights(a: ModelBundle, b: ModelBundle) -> None:
    for name, module in _components(a).items():
        sa, sb = module.state_dict(), _components(b)[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{name}.{key}"


def unet_output(bundle: ModelBundle) -> torch.Tensor:
    """The UNet's output on fixed inputs, computed on a copy: CPU kernels round differently depending on where
    the weights sit in memory (diffusers leaves them at file offsets); fresh storage makes that equal for all."""
    gen = torch.Generator().manual_seed(0)
    unet = copy.deepcopy(bundle.unet)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    extra = {}
    if bundle.family == "sdxl":
        pooled = bundle.text_encoders[1].config.projection_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=gen),
            "time_ids": torch.ones(1, 6),
        }
    with torch.no_grad():
        return unet(sample, 500, context, **extra).sample


@pytest.fixture(scope="module")
def bundles(builtin_cache: Path) -> dict[str, ModelBundle]:
    return {name: load_models(ModelConfig(path=f"builtin:{name}")) for name in TINY}


def write_header_file(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, path, metadata=metadata)
    return path


UNET = "model.diffusion_model."
STEM = {f"{UNET}input_blocks.0.0.weight": (8, 4, 3, 3)}
SD1_TE = "cond_stage_model.transformer.text_model."
XL_TE1, XL_TE2 = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."
V_META = {"loha_train.prediction_type": "v_prediction"}
UNET_ENTRY = {"unet": ["diffusers", "UNet2DConditionModel"]}


# ------------------------------------------------------------------------------------------- diffusers folders
@pytest.mark.parametrize(
    ("name", "family", "prediction", "encoders"),
    [
        ("tiny-sd-random", "sd1", "epsilon", ["CLIPTextModel"]),
        ("tiny-sd-v", "sd2", "v_prediction", ["CLIPTextModel"]),
        ("tiny-sdxl", "sdxl", "epsilon", ["CLIPTextModel", "CLIPTextModelWithProjection"]),
    ],
)
def test_builtin_loads_as_a_diffusers_folder(
    bundles: dict[str, ModelBundle], name: str, family: str, prediction: str, encoders: list[str]
) -> None:
    bundle = bundles[name]
    assert (bundle.kind, bundle.family, bundle.prediction_type) == ("diffusers", family, prediction)
    assert bundle.source == resolve_builtin(f"builtin:{name}")
    assert [type(m).__name__ for m in bundle.text_encoders] == encoders
    assert len(bundle.tokenizers) == len(encoders)
    for module in _components(bundle).values():
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    scheduler = bundle.noise_scheduler
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert scheduler.config.prediction_type == bundle.scheduler_config["prediction_type"] == prediction
    assert (scheduler.config.beta_schedule, scheduler.config.num_train_timesteps) == ("scaled_linear", 1000)
    info = detect_model(f"builtin:{name}")
    assert (info.kind, info.family, info.prediction_type) == ("diffusers", family, prediction)


def test_loading_a_folder_by_path_is_the_same_as_builtin(bundles: dict[str, ModelBundle], tiny_sd_dir: Path) -> None:
    assert_same_weights(load_models(ModelConfig(path=str(tiny_sd_dir))), bundles["tiny-sd-random"])


def test_dtype_and_zero_terminal_snr(tiny_sd_dir: Path) -> None:
    cfg = ModelConfig(path="builtin:tiny-sd-v", dtype="bf16", zero_terminal_snr=True)
    bundle = load_models(cfg)
    frozen = {name: {p.dtype for p in m.parameters()} for name, m in _components(bundle).items()}
    # the VAE stays float32 when its config says force_upcast (diffusers' default), as the pipelines keep it
    assert frozen.pop("vae") == ({torch.float32} if bundle.vae.config.force_upcast else {torch.bfloat16})
    assert set().union(*frozen.values()) == {torch.bfloat16}
    assert bundle.noise_scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-8)
    assert bundle.prediction_type == bundle.noise_scheduler.config.prediction_type == "v_prediction"
    half = load_models(ModelConfig(path=str(tiny_sd_dir)), dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16


def test_family_is_only_asserted(tiny_sd_dir: Path) -> None:
    assert load_models(ModelConfig(path=str(tiny_sd_dir), family="sd1")).family == "sd1"
    with pytest.raises(ModelError, match=r"model\.family is 'sdxl' but the files are sd1"):
        load_models(ModelConfig(path=str(tiny_sd_dir), family="sdxl"))


# ------------------------------------------------------------------------------------------------ single files
@pytest.mark.parametrize("name", TINY)
def test_single_file_round_trip(bundles: dict[str, ModelBundle], name: str, tmp_path: Path) -> None:
    bundle = bundles[name]
    path = save_single_file(bundle, tmp_path / f"{name}.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written atomically, no temp file left
    info = detect_model(path)
    assert (info.kind, info.family, info.prediction_type) == ("single_file", bundle.family, bundle.prediction_type)
    loaded = load_models(ModelConfig(path=str(path), tokenizer_path=f"builtin:{name}"))
    assert (loaded.kind, loaded.family, loaded.prediction_type) == (
        "single_file",
        bundle.family,
        bundle.prediction_type,
    )
    assert_same_weights(bundle, loaded)
    assert torch.equal(unet_output(bundle), unet_output(loaded))
    assert loaded.scheduler_config == bundle.scheduler_config


@pytest.mark.parametrize("name", TINY)
def test_diffusers_from_single_file_reads_our_files(bundles: dict[str, ModelBundle], name: str, tmp_path: Path) -> None:
    """diffusers' public reader (the LDM layout WebUI and ComfyUI use) sees the same weights."""
    import diffusers

    bundle = bundles[name]
    path = save_single_file(bundle, tmp_path / "model.safetensors")
    cls = diffusers.StableDiffusionXLPipeline if bundle.family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(bundle.source), local_files_only=True)
    components = {"unet": pipe.unet, "vae": pipe.vae, "te0": pipe.text_encoder}
    if bundle.family == "sdxl":
        components["te1"] = pipe.text_encoder_2
    for name_, module in _components(bundle).items():
        theirs = components[name_].state_dict()
        assert all(torch.equal(t, theirs[k]) for k, t in module.state_dict().items()), name_


def test_fp16_single_file_and_ckpt(
    bundles: dict[str, ModelBundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = bundles["tiny-sd-random"]
    half = save_single_file(bundle, tmp_path / "half.safetensors", dtype=torch.float16)
    tensors = load_file(half)
    assert {t.dtype for k, t in tensors.items() if not k.endswith("position_ids")} == {torch.float16}
    assert load_models(ModelConfig(path=str(half), tokenizer_path="builtin:tiny-sd-random")).unet.dtype == torch.float32

    # A .ckpt has no metadata: its architecture is the family's reference config, here made tiny.
    configs = json.loads(safe_open(str(half), "pt").metadata()[layout.METADATA_CONFIGS])
    monkeypatch.setitem(models.REFERENCE, "sd1", configs)
    full = {k: v for k, v in load_file(save_single_file(bundle, tmp_path / "full.safetensors")).items()}
    torch.save({"state_dict": full, "global_step": 10}, tmp_path / "model.ckpt")
    info = detect_model(tmp_path / "model.ckpt")
    assert (info.kind, info.family, info.prediction_type) == ("single_file", "sd1", "epsilon")
    ckpt = load_models(ModelConfig(path=str(tmp_path / "model.ckpt"), tokenizer_path="builtin:tiny-sd-random"))
    assert_same_weights(bundle, ckpt)


@dataclasses.dataclass
class _Payload:
    """Unpickling this runs os.mkdir(marker): what a malicious .ckpt would do."""

    marker: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def test_ckpt_never_unpickles_objects(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    with path.open("wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(str(marker))}}, f, protocol=2)
    with pytest.raises(ModelError, match=r"evil\.ckpt: this \.ckpt pickles Python objects besides tensors"):
        detect_model(path)
    assert not marker.exists()


def test_real_architectures_convert_to_the_public_layouts() -> None:
    """Full-size SD 1.5 / 2.1 / SDXL on the meta device: our keys are what the public files have.

    Counts as in v1-5-pruned-emaonly.safetensors (686 + 248 + 197 = 1131 tensors) and SDXL base 1.0 (2515
    tensors, one of them the unused OpenCLIP logit_scale); diffusers' own reader maps every key back.
    """
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    expected = {"sd1": ("v1", 686, 1131), "sd2": ("v2", 686, 1214), "sdxl": ("xl_base", 1680, 2514)}
    for family, (model_type, unet_keys, total) in expected.items():
        configs = models.REFERENCE[family]
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(configs["unet"])
            vae = AutoencoderKL.from_config(configs["vae"])
            encoders = [CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))]
            if family == "sdxl":
                encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
        bundle = SimpleNamespace(unet=unet, vae=vae, text_encoders=encoders, family=family)
        ldm = single_file.ldm_state_dict(bundle)  # type: ignore[arg-type]
        prefixes = layout.TEXT_PREFIXES[family]
        assert infer_diffusers_model_type(ldm) == model_type
        assert sum(k.startswith(layout.UNET_PREFIX) for k in ldm) == unet_keys
        assert sum(k.startswith(layout.VAE_PREFIX) for k in ldm) == 248
        assert len(ldm) == total
        back = [
            (unet, single_file.unet_from_ldm(ldm, unet.config)),
            (vae, single_file.vae_from_ldm(ldm, vae.config)),
            *((m, single_file.text_from_ldm(ldm, p, m)) for m, p in zip(encoders, prefixes, strict=True)),
        ]
        for module, state in back:
            ours = module.state_dict()
            assert state.keys() == ours.keys()
            assert all(state[k].shape == ours[k].shape for k in ours)


# ------------------------------------------------------------------------------------------------- the VAE
def test_vae_path_overrides_the_vae(bundles: dict[str, ModelBundle], tiny_sd_dir: Path, tmp_path: Path) -> None:
    other = bundles["tiny-sd-v"].vae.state_dict()
    ldm_file = tmp_path / "vae-ldm.safetensors"
    save_file(layout.vae_to_ldm(other, bundles["tiny-sd-v"].vae.config), ldm_file)
    diffusers_file = tmp_path / "vae-diffusers.safetensors"
    save_file(other, diffusers_file)
    for vae_path in ("builtin:tiny-sd-v", str(resolve_builtin("builtin:tiny-sd-v") / "vae"), ldm_file, diffusers_file):
        vae = load_models(ModelConfig(path=str(tiny_sd_dir), vae_path=str(vae_path))).vae
        assert not vae.training and not any(p.requires_grad for p in vae.parameters())
        assert all(torch.equal(t, other[k]) for k, t in vae.state_dict().items()), vae_path


# ----------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize(
    ("shapes", "metadata", "family", "prediction"),
    [
        ({f"{SD1_TE}embeddings.token_embedding.weight": (9, 4)}, None, "sd1", "epsilon"),
        ({"cond_stage_model.model.token_embedding.weight": (9, 4)}, None, "sd2", None),
        ({"cond_stage_model.model.ln_final.weight": (4,)}, V_META, "sd2", "v_prediction"),
        ({f"{XL_TE1}final_layer_norm.weight": (4,), f"{XL_TE2}positional_embedding": (7, 4)}, None, "sdxl", "epsilon"),
        ({f"{XL_TE2}ln_final.weight": (4,), "v_pred": (0,)}, None, "sdxl", "v_prediction"),
        ({f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024)}, None, "sd2", None),
        ({f"{UNET}label_emb.0.0.weight": (8, 16)}, None, "sdxl", "epsilon"),
    ],
)  # fmt: skip
def test_detects_family_from_header_keys(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shapes: dict[str, tuple[int, ...]],
    metadata: dict[str, str] | None,
    family: str,
    prediction: str | None,
) -> None:
    path = write_header_file(tmp_path / "m.safetensors", STEM | shapes, metadata)
    monkeypatch.setattr("safetensors.torch.load_file", None)  # detection must not read tensor data
    info = detect_model(path)
    assert (info.kind, info.family, info.prediction_type) == ("single_file", family, prediction)
    assert info.evidence


def test_sd2_single_file_needs_a_prediction_type(tmp_path: Path) -> None:
    path = write_header_file(tmp_path / "sd2.safetensors", STEM | {"cond_stage_model.model.ln_final.weight": (4,)})
    with pytest.raises(ModelError, match=r"sd2\.safetensors.*set model\.prediction_type"):
        load_models(ModelConfig(path=str(path), tokenizer_path="builtin:tiny-sd-random"))


def test_single_file_needs_a_tokenizer(bundles: dict[str, ModelBundle], tmp_path: Path) -> None:
    path = save_single_file(bundles["tiny-sd-random"], tmp_path / "m.safetensors")
    with pytest.raises(ModelError, match=r"m\.safetensors.*holds no tokenizer.*tokenizer_path"):
        load_models(ModelConfig(path=str(path)))
    with pytest.raises(ModelError, match="expected a CLIP tokenizer"):
        load_models(ModelConfig(path=str(path), tokenizer_path=str(tmp_path)))
    assert load_models(ModelConfig(path=str(path)), with_tokenizers=False).tokenizers == []  # merge, inspect


def test_tokenizer_must_fit_the_text_encoder(tiny_sd_dir: Path, tmp_path: Path) -> None:
    words = ["".join(letters) for letters in itertools.product("abcdefghij", repeat=3)]
    vocab, merges = train_clip_bpe([" ".join(words)], vocab_size=1200)
    write_clip_tokenizer(tmp_path / "big", vocab, merges)
    with pytest.raises(ModelError, match=r"big: tokenizer has 1200 tokens but the text encoder .* embeds 1000"):
        load_models(ModelConfig(path=str(tiny_sd_dir), tokenizer_path=str(tmp_path / "big")))


def _folder(tmp_path: Path, index: dict[str, Any] | None, unet: dict[str, Any] | None = None) -> Path:
    root = tmp_path / "model"
    (root / "unet").mkdir(parents=True)
    if index is not None:
        (root / "model_index.json").write_text(json.dumps(index))
    if unet is not None:
        (root / "unet" / "config.json").write_text(json.dumps(unet))
    return root


def _junk(tmp_path: Path) -> Path:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return path


def _truncated(tmp_path: Path) -> Path:
    path = write_header_file(tmp_path / "cut.safetensors", STEM | {"cond_stage_model.model.x": (64, 64)})
    path.write_bytes(path.read_bytes()[:-100])
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: _folder(t, None), "not a diffusers model folder: no model_index.json"),
        (lambda t: _folder(t, {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}),
         "unsupported architecture 'FluxPipeline'"),
        (lambda t: _folder(t, UNET_ENTRY, {"in_channels": 9}), "9 input channels"),
        (lambda t: _folder(t, UNET_ENTRY), r"missing config\.json"),
        (lambda t: _folder(t, {**UNET_ENTRY, "text_encoder": [None, None], "text_encoder_2": ["x", "X"]}, {}),
         "no text_encoder"),
        (_truncated, "truncated or corrupt"),
        (_junk, "truncated or corrupt"),
        (lambda t: write_header_file(t / "lora.safetensors", {"lora_unet_x.hada_w1_a": (4, 2)}), "is it a LoRA"),
        (lambda t: write_header_file(t / "inpaint.safetensors", {f"{UNET}input_blocks.0.0.weight": (8, 9, 3, 3)}),
         "9 input channels"),
        (lambda t: write_header_file(t / "refiner.safetensors", STEM | {"conditioner.embedders.0.model.x": (4,)}),
         "SDXL refiner"),
        (lambda t: write_header_file(t / "unet.safetensors", STEM), "cannot tell the model family"),
        (lambda t: t / "model.bin", r"expected a diffusers folder, a \.safetensors or \.ckpt file"),
        (lambda t: t / "missing.safetensors", "no such file"),
        (lambda t: "builtin:tiny-sd-xxl", "valid names: builtin:tiny-sd, "),
    ],
)  # fmt: skip
def test_unusable_models_name_the_file_and_what_was_expected(tmp_path: Path, make: Any, message: str) -> None:
    target = make(tmp_path)
    with pytest.raises(ModelError, match=message) as error:
        detect_model(target)
    if isinstance(target, Path):
        assert str(target) in str(error.value)


def test_wrong_architecture_single_file_is_a_model_error(bundles: dict[str, ModelBundle], tmp_path: Path) -> None:
    path = save_single_file(bundles["tiny-sd-random"], tmp_path / "m.safetensors")
    tensors = load_file(path)  # drop our metadata: the reference SD 1.5 architecture does not fit tiny weights
    save_file(tensors, path)
    with pytest.raises(ModelError, match=r"m\.safetensors: the UNet weights do not fit.*reference sd1 architecture"):
        load_models(ModelConfig(path=str(path), tokenizer_path="builtin:tiny-sd-random"))


# ------------------------------------------------------------------------------------------------- hashing
def test_model_hash_is_stable_and_computed_once(
    bundles: dict[str, ModelBundle], builtin_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_single_file(bundles["tiny-sd-random"], tmp_path / "m.safetensors")
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert model_hash(path) == hashlib.sha256(data[8 + header :]).hexdigest()  # tensor data only, as WebUI

    def no_rehash(_: Path) -> str:
        raise AssertionError("hashed twice")

    monkeypatch.setattr(hashing, "_sha256", no_rehash)
    assert model_hash(path) == model_hash(str(path))  # memory
    monkeypatch.setattr(hashing, "_MEMORY", {})
    assert model_hash(path) == hashlib.sha256(data[8 + header :]).hexdigest()  # the cache file, across runs
    assert str(path.resolve()) in (builtin_cache / "hashes.json").read_text()
    monkeypatch.undo()

    os.utime(path, ns=(1, 1))  # a changed file (new mtime) is hashed again
    assert model_hash(path) == hashlib.sha256(data[8 + header :]).hexdigest()

    folder = model_hash("builtin:tiny-sd-random")
    assert folder == model_hash(
        resolve_builtin("builtin:tiny-sd-random", cache=tmp_path / "other")
    )  # same bytes elsewhere
    assert len({folder, model_hash("builtin:tiny-sd-v"), model_hash("builtin:tiny-sdxl")}) == 3

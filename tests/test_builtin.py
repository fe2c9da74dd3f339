"""Built-in demo assets: deterministic tiny models, a real CLIP-style BPE tokenizer, the shapes data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTokenizer

from loha_train.models import builtin
from loha_train.models.builtin import BuiltinError, resolve_builtin
from loha_train.models.clip_bpe import train_clip_bpe

CAPTION = "a red circle on a white background"
# Golden ids: the vocabulary must not drift between machines or library versions (CLIP's own "a</w>" is 320 too:
# both vocabularies start with the same 512 byte symbols).
CAPTION_IDS = [781, 320, 552, 535, 515, 320, 546, 521, 782]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("path", ["builtin:nope", "tiny-sd", "builtin:"])
def test_unknown_names_list_the_valid_ones(path: str, tmp_path: Path) -> None:
    with pytest.raises(
        BuiltinError,
        match="builtin:tiny-sd, builtin:tiny-sd-random, builtin:tiny-sd-v, builtin:tiny-sdxl, builtin:shapes, "
        "builtin:stars",
    ):
        resolve_builtin(path, cache=tmp_path)
    assert not any(tmp_path.iterdir())


def test_tiny_sd_is_bit_identical_across_fresh_caches(tmp_path: Path) -> None:
    first = resolve_builtin("builtin:tiny-sd-random", cache=tmp_path / "a")
    second = resolve_builtin("builtin:tiny-sd-random", cache=tmp_path / "b")
    a, b = _files(first), _files(second)
    weights = [name for name in a if name.endswith(".safetensors")]
    assert sorted(weights) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert a == b  # weights, tokenizer and configs, byte for byte


def test_built_folder_is_an_ordinary_diffusers_model(builtin_cache: Path) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    root = resolve_builtin("builtin:tiny-sd-random")
    assert root == builtin_cache / "builtin" / builtin.BUILD_VERSION / "tiny-sd-random"
    assert {p.name for p in root.iterdir()} == {
        "model_index.json",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    }
    pipe = StableDiffusionPipeline.from_pretrained(root, local_files_only=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    config = pipe.scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.num_train_timesteps == 1000

    xl = StableDiffusionXLPipeline.from_pretrained(resolve_builtin("builtin:tiny-sdxl"), local_files_only=True)
    assert xl.tokenizer_2.pad_token == "!"
    assert xl.text_encoder_2.config.hidden_size != xl.text_encoder.config.hidden_size  # as in SDXL


def test_models_have_distinct_weights(builtin_cache: Path) -> None:
    names = ("tiny-sd", "tiny-sd-random", "tiny-sd-v", "tiny-sdxl")
    unets = {n: _files(resolve_builtin(f"builtin:{n}") / "unet") for n in names}
    blobs = [files["diffusion_pytorch_model.safetensors"] for files in unets.values()]
    assert len(set(blobs)) == 4


def test_existing_folder_is_reused_and_no_temp_dirs_remain(builtin_cache: Path) -> None:
    root = resolve_builtin("builtin:tiny-sd-random")
    stamp = (root / "unet" / "config.json").stat().st_mtime_ns
    assert resolve_builtin("builtin:tiny-sd-random") == root
    assert (root / "unet" / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(dest: Path) -> None:
        (dest / "000.png").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(builtin, "build_shapes", broken)
    with pytest.raises(OSError, match="disk full"):
        resolve_builtin("builtin:shapes", cache=tmp_path)
    assert list((tmp_path / "builtin" / builtin.BUILD_VERSION).iterdir()) == []


# ------------------------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def tokenizer(tiny_sd_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer", local_files_only=True)


def test_tokenizer_encodes_a_caption_to_known_ids(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer(CAPTION).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        *(f"{w}</w>" for w in CAPTION.split()),
        "<|endoftext|>",
    ]
    assert ids == CAPTION_IDS
    assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION
    assert tokenizer("  A RED\tCircle on a WHITE background ").input_ids == ids  # CLIP's normalisation


def test_tokenizer_is_byte_level_bpe(tokenizer: CLIPTokenizer) -> None:
    backend = tokenizer.backend_tokenizer.model
    assert type(backend).__name__ == "BPE"
    assert backend.end_of_word_suffix == "</w>"
    ids = tokenizer("a zebra, 1girl").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[2:5] == ["z", "e", "br"]  # an unseen word splits into learned subwords
    assert "zebra</w>" not in tokenizer.get_vocab()
    assert tokenizer.unk_token_id not in ids[1:-1]  # every byte has a symbol: nothing is unknown
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra , 1 girl"  # as CLIP: digits apart
    assert tokenizer.decode(tokenizer("naïve café").input_ids, skip_special_tokens=True) == "naïve café"


def test_special_ids_match_the_text_encoder(tiny_sd_dir: Path, tokenizer: CLIPTokenizer) -> None:
    config = json.loads((tiny_sd_dir / "text_encoder" / "config.json").read_text())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (781, 782, 782)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (781, 782, 782)
    assert len(tokenizer) <= config["vocab_size"] == builtin.TINY_CLIP_TEXT["vocab_size"]
    padded = tokenizer(CAPTION, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[len(CAPTION_IDS) :] == [782] * (77 - len(CAPTION_IDS))


def test_bpe_learner_respects_vocab_size_and_ascii() -> None:
    vocab, merges = train_clip_bpe(builtin.clip_corpus(), vocab_size=600)
    assert len(vocab) == 600 and len(merges) == 600 - 514
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert sorted(vocab.values()) == list(range(600))
    with pytest.raises(ValueError, match="ASCII"):
        train_clip_bpe(["café"], vocab_size=600)


# -------------------------------------------------------------------------------------------------- shapes
def test_shapes_dataset(builtin_cache: Path, tmp_path: Path) -> None:
    root = resolve_builtin("builtin:shapes")
    images = sorted(root.glob("*.png"))
    assert len(images) == 16 and len(list(root.glob("*.txt"))) == 16
    sizes = set()
    for path in images:
        caption = path.with_suffix(".txt").read_text().strip()
        _, colour, shape, *_, background, _ = caption.split()
        assert caption == f"a {colour} {shape} on a {background} background"
        assert path.stem.endswith(f"_{colour}_{shape}")
        with Image.open(path) as image:
            sizes.add(image.size)
            pixels = np.asarray(image.convert("RGB"))
        in_colour = (pixels == builtin._RGB[colour]).all(axis=-1)
        assert in_colour.mean() > 0.1  # the shape is there, in its colour
        assert tuple(pixels[0, 0]) == builtin._RGB[background]
    assert sizes == {(64, 64), (128, 96), (96, 128)}
    rebuilt = resolve_builtin("builtin:shapes", cache=tmp_path)
    for path in images:
        with Image.open(path) as a, Image.open(rebuilt / path.name) as b:
            assert a.tobytes() == b.tobytes()

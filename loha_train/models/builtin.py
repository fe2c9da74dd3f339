"""Built-in demo assets (tiny SD-architecture models, a shapes data set), built locally on first use."""

# `resolve_builtin("builtin:NAME")` returns a folder under the cache dir (`$LOHA_TRAIN_CACHE`, default
# `~/.cache/loha-train`), building it the first time: into a temporary folder, then renamed into place, so a crash
# or a concurrent build never leaves a half-written folder behind. The models are ordinary diffusers folders
# (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) and load through the same code as a user's.
#
# Weights are random but deterministic: every tensor is drawn from one seeded `torch.Generator` in module order,
# so two machines build bit-identical models. The tokenizer is a real CLIP-style byte-level BPE learned by
# `clip_bpe` from the fixed corpus below (it covers the demo captions; other words split into subwords) and
# written as vocab.json + merges.txt like the SD repos' tokenizer folders.

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loha_train.models.clip_bpe import BOS, EOS, train_clip_bpe, write_clip_tokenizer
from loha_train.models.demo import RGB
from loha_train.models.reference_configs import SD_SCHEDULE

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

# A small SD 1.x-shaped UNet: cross-attention blocks with 1x1-conv proj_in/proj_out, ResNet blocks with
# conv_shortcut and time_emb_proj, a downsampler and an upsampler, a cross-attention mid block.
TINY_SD_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

TINY_CLIP_TEXT: dict[str, Any] = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}

# Four blocks give the real VAE's downsampling factor of 8, so resolutions mean what they mean for SD.
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (8, 16, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 64,
}

# The demo model (builtin:tiny-sd) trained by scripts/build_demo_model.py and shipped in the package, in fp16:
# 32 px images, a VAE with downsampling 4 (8x8x4 latents), a UNet with cross-attention at both levels, a small
# frozen CLIP text encoder sharing the built-in tokenizer.
DEMO_DIR = "loha_train/models/assets/tiny-sd"
DEMO_UNET: dict[str, Any] = {  # the tiny UNet with cross-attention at both levels
    **TINY_SD_UNET,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
DEMO_CLIP_TEXT: dict[str, Any] = {**TINY_CLIP_TEXT, "hidden_act": "quick_gelu"}
DEMO_VAE: dict[str, Any] = {  # the tiny VAE with three blocks (downsampling 4) and wider channels, for 32 px
    **TINY_VAE,
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "sample_size": 32,
}

# Part of every cache folder name: bump it whenever a builder's output changes, so stale caches are not reused.
BUILD_VERSION = "v1"
SEED = 20240521


class BuiltinError(ValueError):
    """An unknown `builtin:` name."""


# A small SDXL-shaped UNet: DownBlock2D first as in SDXL, two transformer layers in the second level and the mid
# block, linear projections, the text_time added condition (pooled text embedding + 6 size/crop numbers).
TINY_SDXL_UNET: dict[str, Any] = {
    **TINY_SD_UNET,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": TINY_CLIP_TEXT["hidden_size"] + 48,  # both encoders' hidden states, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + TINY_CLIP_TEXT["projection_dim"],
}


# quick_gelu as OpenAI's CLIP (SD 1.x, SDXL's first encoder), gelu as OpenCLIP (SD 2.x, SDXL's second). The
# second SDXL encoder is wider than the first, as in SDXL (768 vs 1280): readers tell them apart by width.
_OPENAI_CLIP: dict[str, Any] = {"hidden_act": "quick_gelu"}
_OPEN_CLIP: dict[str, Any] = {"hidden_act": "gelu"}


@dataclass(frozen=True)
class _TinyModel:
    family: str
    prediction_type: str
    seed: int  # distinct per model, so no two built-ins share weights (or a model_hash)
    unet: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # per encoder, overrides of TINY_CLIP_TEXT
    scheduler: str  # the scheduler class the real model family ships
    pipeline: str


# tiny-sd-v has SD 2.x's markers: linear proj_in/proj_out, a GELU (OpenCLIP-like) text encoder, v-prediction
# with a DDIM scheduler config as SD 2.1 ships.
_MODELS: dict[str, _TinyModel] = {
    "tiny-sd-random": _TinyModel(
        "sd1", "epsilon", SEED, TINY_SD_UNET, (_OPENAI_CLIP,), "PNDMScheduler", "StableDiffusionPipeline"
    ),
    "tiny-sd-v": _TinyModel(
        "sd2",
        "v_prediction",
        SEED + 100,
        {**TINY_SD_UNET, "use_linear_projection": True},
        (_OPEN_CLIP,),
        "DDIMScheduler",
        "StableDiffusionPipeline",
    ),
    "tiny-sdxl": _TinyModel(
        "sdxl",
        "epsilon",
        SEED + 200,
        TINY_SDXL_UNET,
        (_OPENAI_CLIP, {**_OPEN_CLIP, "hidden_size": 48}),
        "EulerDiscreteScheduler",
        "StableDiffusionXLPipeline",
    ),
}
_DATASETS = ("shapes", "stars")
TRAINED = "tiny-sd"  # the demo model: trained, shipped in the package (DEMO_DIR), never built on the fly
BUILTIN_NAMES: tuple[str, ...] = (TRAINED, *_MODELS, *_DATASETS)
PREFIX = "builtin:"


def is_builtin(path: str) -> bool:
    """True for a `builtin:NAME` string."""
    return path.startswith(PREFIX)


def cache_dir() -> Path:
    """`$LOHA_TRAIN_CACHE`, or `~/.cache/loha-train`."""
    env = os.environ.get("LOHA_TRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loha-train"


def resolve_builtin(path: str, *, cache: Path | None = None) -> Path:
    """Return the folder of `builtin:NAME`, building it under the cache dir the first time.

    Raises BuiltinError for a name that is not one of BUILTIN_NAMES.
    """
    name = path.removeprefix(PREFIX)
    if not is_builtin(path) or name not in BUILTIN_NAMES:
        valid = ", ".join(PREFIX + n for n in BUILTIN_NAMES)
        raise BuiltinError(f"unknown built-in {path!r}; valid names: {valid}")
    if name == TRAINED:
        return demo_model_dir()
    final = (cache or cache_dir()) / "builtin" / BUILD_VERSION / name
    if final.is_dir():
        return final
    builders: dict[str, Callable[[Path], None]] = {"shapes": build_shapes, "stars": build_stars}
    builder = builders.get(name) or (lambda d: build_tiny_model(name, d))
    logger.info("building %s into %s (first use only, a few seconds; later runs reuse it)", path, final)
    return _build_atomically(final, builder)


def demo_model_dir() -> Path:
    """The demo model's folder inside the installed package (scripts/build_demo_model.py wrote it)."""
    root = Path(__file__).resolve().parent / "assets" / "tiny-sd"
    if not (root / "model_index.json").is_file():
        raise BuiltinError(f"the demo model is missing from {root}: rebuild it with scripts/build_demo_model.py")
    return root


def _build_atomically(final: Path, builder: Callable[[Path], None]) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        builder(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------- demo corpus
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black", "gray")
_EXTRA_WORDS = (
    "a photo of, a painting of, a drawing of, a picture of, an illustration of, a close-up of, a render of, "
    "orange purple pink brown cyan magenta dark light bright pale rectangle star heart diamond oval hexagon "
    "line dot shape shapes object background foreground plain simple small large big tiny centered left right "
    "top bottom corner middle with and in the on of style high quality best worst low blurry sharp detailed "
    "cat dog person man woman house tree sky flower car portrait landscape sks trigger token "
    "1girl solo looking at viewer, masterpiece, 0 1 2 3 4 5 6 7 8 9"
)


def clip_corpus() -> list[str]:
    """The fixed text the built-in tokenizer is learned from: the demo captions (weighted up) and common words."""
    captions = [f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    photos = [f"a photo of a {c} {s}" for c in COLOURS for s in SHAPES]
    return captions * 4 + photos * 2 + [_EXTRA_WORDS]


# ------------------------------------------------------------------------------------------------- models
def seeded_init_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in module order (no dependence on torch's init).

    Weights ~ N(0, 1/fan_in); 1-D tensors (norm weights, biases) get distinct values around 1 or 0 so that a
    conversion that swaps two of them cannot go unnoticed.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(1.0 + 0.1 * noise)


def build_tiny_model(name: str, dest: Path) -> None:
    """Write the tiny diffusers model `name` (one of the model names in BUILTIN_NAMES) into `dest`."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = _MODELS[name]
    vocab, merges = train_clip_bpe(clip_corpus(), TINY_CLIP_TEXT["vocab_size"])
    unet = UNet2DConditionModel(**spec.unet)
    seeded_init_(unet, spec.seed)
    unet.save_pretrained(dest / "unet")
    vae = AutoencoderKL(**TINY_VAE)
    seeded_init_(vae, spec.seed + 1)
    vae.save_pretrained(dest / "vae")
    index: dict[str, Any] = {"_class_name": spec.pipeline, "_diffusers_version": diffusers.__version__}
    for i, overrides in enumerate(spec.text_encoders):
        suffix = "" if i == 0 else f"_{i + 1}"
        pad = EOS if i == 0 else "!"  # SDXL's second tokenizer pads with "!", as the real one does
        write_clip_tokenizer(dest / f"tokenizer{suffix}", vocab, merges, pad_token=pad)
        ids = {"bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[pad]}
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        encoder = cls(CLIPTextConfig(**{**TINY_CLIP_TEXT, **overrides}, **ids))
        seeded_init_(encoder, spec.seed + 2 + i)
        # What save_pretrained writes, without transformers' progress bar on stderr.
        encoder.config.save_pretrained(dest / f"text_encoder{suffix}")
        save_file(encoder.state_dict(), dest / f"text_encoder{suffix}" / "model.safetensors", {"format": "pt"})
        index[f"text_encoder{suffix}"] = ["transformers", cls.__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]

    scheduler_cls = getattr(diffusers, spec.scheduler)
    accepted = inspect.signature(scheduler_cls.__init__).parameters
    settings = {**SD_SCHEDULE, "prediction_type": spec.prediction_type}
    scheduler_cls(**{k: v for k, v in settings.items() if k in accepted}).save_pretrained(dest / "scheduler")
    index |= {
        "scheduler": ["diffusers", spec.scheduler],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if spec.family == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    else:
        index |= {"feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False}
    (dest / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------------------------- shapes
_RGB = RGB  # builtin:shapes draws in the demo's colours
# (width, height) of the non-square images, to exercise aspect-ratio buckets.
_NON_SQUARE = {12: (128, 96), 13: (96, 128), 14: (128, 96), 15: (96, 128)}


def shapes_items() -> list[tuple[str, str, str, int, int]]:
    """The 16 (colour, shape, background, width, height) tuples of builtin:shapes, in file order."""
    items = []
    for i in range(16):
        colour, shape = COLOURS[i % 4], SHAPES[i % 3]
        background = "white" if i % 4 != 3 else ("black" if i % 8 == 3 else "gray")
        width, height = _NON_SQUARE.get(i, (64, 64))
        items.append((colour, shape, background, width, height))
    return items


def build_shapes(dest: Path) -> None:
    """Write builtin:shapes into `dest`: NNN_colour_shape.png with a matching .txt caption each."""
    from PIL import Image, ImageDraw

    rng = random.Random(SEED)
    for i, (colour, shape, background, width, height) in enumerate(shapes_items()):
        image = Image.new("RGB", (width, height), _RGB[background])
        draw = ImageDraw.Draw(image)
        size = rng.randint(min(width, height) // 2, min(width, height) * 3 // 4)
        x0, y0 = rng.randint(2, width - size - 2), rng.randint(2, height - size - 2)
        box = (x0, y0, x0 + size, y0 + size)
        if shape == "circle":
            draw.ellipse(box, fill=_RGB[colour])
        elif shape == "square":
            draw.rectangle(box, fill=_RGB[colour])
        else:
            draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=_RGB[colour])
        stem = f"{i:03d}_{colour}_{shape}"
        image.save(dest / f"{stem}.png", format="PNG")
        caption = f"a {colour} {shape} on a {background} background\n"
        (dest / f"{stem}.txt").write_text(caption, encoding="utf-8")


def build_stars(dest: Path) -> None:
    """Write builtin:stars into `dest`: 16 32-px blue stars (a shape the demo model has never seen) on white, black
    and gray, captioned "a sks blue star on a <background> background" (sks: the trigger word)."""
    from loha_train.models.demo import shape_image

    rng = random.Random(SEED + 1)
    for i in range(16):
        background = BACKGROUNDS[i % 3] if i % 4 else "white"
        shape_image("blue", "star", background, 32, rng).save(dest / f"{i:03d}_blue_star.png", format="PNG")
        caption = f"a sks blue star on a {background} background\n"
        (dest / f"{i:03d}_blue_star.txt").write_text(caption, encoding="utf-8")

"""The run configuration: one frozen dataclass per YAML section; defaults live here and nowhere else."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from loha_train.config.check import INVALID, Builder, Schema, to_plain
from loha_train.config.errors import ConfigError, ConfigProblem
from loha_train.config.fs import write_problem
from loha_train.config.rules import FIELD_RULES, rule_problems
from loha_train.config.yaml_io import dump_yaml, parse_yaml, read_config_text

# Every field's comment is its documentation: scripts/config_table.py turns these dataclasses into the
# README's config reference table, so keep each comment to one line a user can act on.

Preset = Literal["attn-only", "attn-mlp", "full", "full-lin", "none"]
# Optimizers that estimate their own step size and expect lr ~1.0 (D-Adaptation style, as kohya names them).
ADAPTIVE_OPTIMIZERS = ("prodigy",)


def default_lr(optimizer: str) -> float:
    """`train.lr` when unset: 1.0 for the adaptive optimizers (their step is their estimate times lr), else 1e-4."""
    return 1.0 if optimizer in ADAPTIVE_OPTIMIZERS else 1e-4


Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass(frozen=True)
class ModelConfig:
    """`model:` which base model to train against."""

    path: str  # diffusers folder, single-file .safetensors/.ckpt, or builtin:tiny-sd (see README)
    family: Literal["auto", "sd1", "sd2", "sdxl"] = "auto"  # detected from the files; set it only to assert
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"  # auto: read from scheduler config
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # precision of the frozen weights
    vae_path: str | None = None  # optional separate VAE (diffusers folder or single file)
    vae_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp32 if the VAE config says force_upcast
    tokenizer_path: str | None = None  # tokenizer folder (or diffusers model folder) for single-file checkpoints
    clip_skip: int = 1  # use the output of the N-th last text-encoder layer (2 for anime models)
    max_token_length: Literal[75, 150, 225] = 75  # caption tokens encoded (kohya's): 150/225 in 75-token chunks
    zero_terminal_snr: bool = False  # rescale the noise schedule to zero terminal SNR (use with v_prediction)


@dataclass(frozen=True)
class NetworkConfig:
    """`network:` where the LoHa adapters go and how big they are."""

    preset: Preset = "attn-mlp"  # which modules get LoHa; "none" to use only `targets`
    targets: tuple[str, ...] = ()  # extra regexes searched in qualified module names (unet.…, text_encoder.…)
    exclude: tuple[str, ...] = ()  # regexes; matching modules are left without an adapter
    rank: int = 8  # rank of each Hadamard factor for linear layers (and 1x1 convs)
    alpha: float = 4.0  # scale = alpha / rank
    conv_rank: int | None = None  # rank for k x k convs; default: `rank`
    conv_alpha: float | None = None  # alpha for k x k convs; default: `alpha`
    use_cp: bool = True  # CP-decompose k x k convs (LyCORIS use_tucker, PEFT use_effective_conv2d)
    rank_dropout: float = 0.0  # probability of dropping an output row of the delta, training only
    rank_dropout_scale: bool = False  # LyCORIS's: divide kept rows by the kept fraction (off, its default: no rescale)
    module_dropout: float = 0.0  # probability of skipping a module's adapter for a step, training only
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex -> rank, first match wins
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex -> alpha, first match wins
    train_unet: bool = True  # put LoHa on the UNet
    train_text_encoder: bool = False  # put LoHa on the text encoder(s)
    init_from: str | None = None  # start from an existing LoHa .safetensors instead of zero

    @property
    def effective_conv_rank(self) -> int:
        return self.rank if self.conv_rank is None else self.conv_rank

    @property
    def effective_conv_alpha(self) -> float:
        return self.alpha if self.conv_alpha is None else self.conv_alpha


@dataclass(frozen=True)
class DataConfig:
    """`data:` the training images, captions and caches."""

    path: str  # folder of images + .txt captions, kohya N_name subfolders, metadata.jsonl, or builtin:shapes
    repeats: int = 1  # times each image is seen per epoch (N_name subfolders override it)
    caption_extension: str = ".txt"  # caption file next to each image
    default_caption: str | None = None  # caption for images without one
    trigger_word: str | None = None  # prepended to every caption (kept first when shuffling)
    shuffle_captions: bool = False  # shuffle comma-separated tags each step
    keep_tokens: int = 0  # leading tags that shuffling and tag dropout leave in place
    caption_separator: str = ","  # tag separator for shuffling and tag dropout
    caption_dropout: float = 0.0  # probability of an empty caption for a sample
    tag_dropout: float = 0.0  # probability of dropping each (non-kept) tag
    resolution: int = 512  # training side length in pixels (multiple of 8); buckets hold about resolution^2
    bucketing: bool = True  # aspect-ratio buckets; off: resize and center-crop to a square
    bucket_min_side: int = 256  # smallest bucket side
    bucket_max_side: int = 1024  # largest bucket side
    bucket_step: int = 64  # bucket sides are multiples of this
    bucket_no_upscale: bool = True  # never upscale an image to reach a bucket
    random_crop: bool = False  # random instead of center crop (incompatible with latent caching)
    flip: bool = False  # random horizontal flip (incompatible with latent caching)
    max_aspect_ratio: float = 8.0  # refuse images whose long side is over this times the short side
    reg_path: str | None = None  # regularization (class) images, DreamBooth style
    reg_repeats: int = 1  # repeats for regularization images
    prior_loss_weight: float = 1.0  # loss weight of regularization images
    cache_latents: Literal["memory", "disk", "none"] = "disk"  # disk caches live in <data>/.loha-cache
    cache_text_embeddings: bool = True  # cache text-encoder outputs when possible (frozen encoder, fixed captions)
    num_workers: int = 0  # dataloader workers
    validation_path: str | None = None  # held-out images for a validation loss
    validation_split: float = 0.0  # or hold out this fraction of the training images
    skip_bad_images: bool = False  # warn and skip unreadable images instead of stopping


@dataclass(frozen=True)
class TrainConfig:
    """`train:` the optimisation."""

    max_steps: int | None = None  # optimizer steps; give this or `epochs`
    epochs: int | None = None  # passes over the (repeated) dataset
    batch_size: int = 1  # images per step per process
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # learning rate for all adapters; default 1e-4, or 1.0 for prodigy (it scales its own step)
    unet_lr: float | None = None  # default: `lr`
    text_encoder_lr: float | None = None  # default: `lr`
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"  # adamw8bit needs bitsandbytes, prodigy prodigyopt
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # extra optimizer arguments (prodigy: d_coef, …)
    weight_decay: float = 0.01  # decoupled weight decay
    adam_beta1: float = 0.9  # first-moment decay
    adam_beta2: float = 0.999  # second-moment decay
    adam_eps: float = 1e-8  # denominator epsilon
    scheduler: Scheduler = "constant"  # learning-rate schedule
    warmup_steps: int = 0  # linear warm-up steps
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts: hard restarts over the run (kohya's name)
    lr_scheduler_power: float = 1.0  # polynomial: the decay's power (1 = linear; kohya's name)
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast precision (GPU)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    compile: bool = False  # torch.compile the UNet with its LoHa layers; GPU only (first step compiles: minutes)
    seed: int = 42  # seeds data order, noise, dropouts and init
    noise_offset: float = 0.0  # offset noise strength (0.05-0.1 for darker/brighter images)
    min_snr_gamma: float | None = None  # min-SNR loss weighting (5 is common)
    save_every_steps: int | None = None  # resumable checkpoint interval
    keep_last_checkpoints: int = 3  # older checkpoints are deleted
    nan_policy: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss: stop, or skip that step
    validation_every_steps: int | None = None  # validation loss interval (needs a validation set)

    @property
    def effective_lr(self) -> float:
        """`lr`, or its default: 1.0 for the adaptive optimizers (their step is their estimate times lr)."""
        return default_lr(self.optimizer) if self.lr is None else self.lr

    @property
    def effective_unet_lr(self) -> float:
        return self.effective_lr if self.unet_lr is None else self.unet_lr

    @property
    def effective_text_encoder_lr(self) -> float:
        return self.effective_lr if self.text_encoder_lr is None else self.text_encoder_lr


@dataclass(frozen=True)
class SamplePrompt:
    """One entry of `sample.prompts` (a plain string is a prompt with defaults)."""

    prompt: str  # the text prompt
    negative_prompt: str = ""  # the negative prompt
    width: int | None = None  # default: data.resolution
    height: int | None = None  # default: data.resolution
    seed: int | None = None  # default: sample.seed
    steps: int | None = None  # default: sample.steps
    guidance: float | None = None  # default: sample.guidance


@dataclass(frozen=True)
class SampleConfig:
    """`sample:` images generated during training."""

    prompts: tuple[SamplePrompt, ...] = ()  # no prompts: no samples
    sampler: Literal["euler", "euler_a", "ddim", "dpmpp_2m", "pndm"] = "euler_a"  # diffusers scheduler
    steps: int = 20  # denoising steps
    guidance: float = 7.0  # classifier-free guidance scale
    seed: int = 0  # base seed for prompts without one
    every_n_steps: int | None = None  # sample every N optimizer steps
    every_n_epochs: int | None = None  # sample at the end of every N epochs
    at_start: bool = True  # sample before the first step (the untrained baseline)
    concept: str | None = None  # "<colour> <shape>" (e.g. "purple star"): score the samples for it (README: quickstart)


@dataclass(frozen=True)
class OutputConfig:
    """`output:` where results go."""

    dir: str  # output folder (the layout is in the README)
    name: str = "loha"  # file name stem and ss_output_name
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"  # dtype of exported adapters
    save_adapter_every_steps: int | None = None  # also export <name>-step-NNNNNN.safetensors every N steps
    title: str | None = None  # modelspec.title; default: `name`
    trigger_words: tuple[str, ...] = ()  # recorded in metadata for users of the file

    @property
    def effective_title(self) -> str:
        return self.name if self.title is None else self.title


@dataclass(frozen=True)
class Config:
    """The whole run."""

    model: ModelConfig
    network: NetworkConfig
    data: DataConfig
    train: TrainConfig
    output: OutputConfig
    sample: SampleConfig = field(default_factory=SampleConfig)


def resolved_prompts(cfg: Config) -> tuple[SamplePrompt, ...]:
    """`sample.prompts` with every unset field filled in from `sample` and `data.resolution`."""
    sample, side = cfg.sample, cfg.data.resolution
    return tuple(
        replace(
            p,
            width=side if p.width is None else p.width,
            height=side if p.height is None else p.height,
            seed=sample.seed if p.seed is None else p.seed,
            steps=sample.steps if p.steps is None else p.steps,
            guidance=sample.guidance if p.guidance is None else p.guidance,
        )
        for p in sample.prompts
    )


SCHEMA = Schema(root=Config, field_rules=FIELD_RULES, shorthands={SamplePrompt: "prompt"})


# ---------------------------------------------------------------------------------------------------------
# Paths. Relative paths are relative to the current directory, as for any command-line tool (not to the
# config file), and are stored absolute, so the copy of the config saved with a run works from anywhere.

BUILTIN_PREFIX = "builtin:"
_INPUT_PATHS = (
    "model.path",
    "model.vae_path",
    "model.tokenizer_path",
    "network.init_from",
    "data.path",
    "data.reg_path",
    "data.validation_path",
)
_OUTPUT_PATHS = ("output.dir",)


def _absolute_paths(sections: dict[str, Any]) -> dict[str, Any]:
    out = dict(sections)
    for key in _INPUT_PATHS + _OUTPUT_PATHS:
        section, name = key.split(".")
        value = getattr(out[section], name, None) if out[section] is not INVALID else None
        if value is not None and not value.startswith(BUILTIN_PREFIX):
            out[section] = replace(out[section], **{name: os.path.abspath(os.path.expanduser(value))})
    return out


def _path_problems(sections: Mapping[str, Any], raw: Mapping[str, Any]) -> Iterator[ConfigProblem]:
    for key in _INPUT_PATHS + _OUTPUT_PATHS:
        section, name = key.split(".")
        value = _path_value(sections[section], raw.get(section), name)
        if value is None or value.startswith(BUILTIN_PREFIX):
            continue
        if key in _INPUT_PATHS and not os.path.exists(value):
            yield ConfigProblem(key, f"does not exist: {value}")
        elif key in _OUTPUT_PATHS and (problem := write_problem(value)):
            yield ConfigProblem(key, f"{problem}: {value}; choose a folder you can write to")


def _path_value(section: Any, raw_section: Any, name: str) -> str | None:
    """The path `name` of a built section; of an invalid one (another field is wrong), the path as written, so
    that a wrong path is reported together with the section's other mistakes."""
    if section is not INVALID:
        return getattr(section, name, None)
    value = raw_section.get(name) if isinstance(raw_section, Mapping) else None
    if not isinstance(value, str) or value.startswith(BUILTIN_PREFIX):
        return None
    return os.path.abspath(os.path.expanduser(value))


# ---------------------------------------------------------------------------------------------------------
# Loading and saving.


def load_config(path: str | Path, overrides: Sequence[str] = (), *, check_paths: bool = True) -> Config:
    """Read a YAML config, apply `--set dotted.key=value` overrides, check everything; raise ConfigError."""
    source = str(path)
    return config_from_dict(
        parse_yaml(read_config_text(Path(path)), source), overrides, check_paths=check_paths, source=source
    )


def config_from_dict(
    raw: Mapping[str, Any] | None,
    overrides: Sequence[str] = (),
    *,
    check_paths: bool = True,
    source: str | None = None,
) -> Config:
    """Like load_config() for data already parsed (tests, programmatic runs)."""
    raw = {} if raw is None else raw  # an empty file: report what is required
    if not isinstance(raw, Mapping):
        sections = ", ".join(f.name for f in fields(Config))
        raise ConfigError([ConfigProblem("", f"the top level must be a mapping of sections ({sections})")], source)
    builder = Builder(SCHEMA)
    raw = builder.apply_overrides(raw, overrides)
    sections = _absolute_paths(builder.build_fields(Config, raw))
    problems = builder.problems
    if check_paths:
        problems.extend(_path_problems(sections, raw))
    problems.extend(rule_problems(sections))
    if problems:
        raise ConfigError(problems, source)
    return Config(**sections)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each `dotted.key=value` set (value read as YAML); unknown keys raise ConfigError.

    Types are not checked here: load_config() checks the result like any config.
    """
    builder = Builder(SCHEMA)
    out = builder.apply_overrides(raw, overrides)
    if builder.problems:
        raise ConfigError(builder.problems)
    return out


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Every field, defaults included, as plain YAML/JSON data."""
    return to_plain(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; load_config() reads it back to an equal Config."""
    return dump_yaml(config_to_dict(cfg))

"""What makes a config wrong beyond its types: value ranges and contradictions between values."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from inspect import signature
from typing import Any

from loha_train.config.check import INVALID, FieldRule, show
from loha_train.config.errors import ConfigProblem

# ---------------------------------------------------------------------------------------------------------
# Part 1: one rule per value, keyed by dotted key (`[]`: any list item or mapping value, `{}`: mapping key).


def _must(ok: Callable[[Any], bool], requirement: str, why: str = "") -> FieldRule:
    def rule(value: Any) -> str | None:
        return None if ok(value) else f"must be {requirement}, got {show(value)}" + (f"; {why}" if why else "")

    return rule


def _regex_error(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as err:
        return f"{pattern!r} is not a valid regular expression: {err}"
    return None


def _values(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


_NON_NEGATIVE = _must(lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = _must(lambda v: v >= 1, ">= 1")
_POSITIVE = _must(lambda v: v > 0, "> 0")
_FRACTION = _must(lambda v: 0 <= v < 1, "in [0, 1)")
_SIDE = _must(lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8")
_ALPHA = _must(lambda v: v > 0, "> 0", "alpha 0 scales the adapter to nothing, and WebUI would load a no-op")
_EXTENSION = _must(lambda v: len(v) > 1 and v.startswith("."), "an extension starting with '.', like .txt")
_FILE_STEM = _must(lambda v: v not in ("", ".", "..") and not set(v) & set("/\\"), "a file name without / or \\")

# The words sample.concept understands (the measure in models/demo.py knows these colours and shapes).
CONCEPT_COLOURS = ("red", "green", "blue", "yellow", "purple")
CONCEPT_SHAPES = ("circle", "square", "triangle", "star")


def _concept_error(value: str) -> str | None:
    words = value.split()
    if len(words) == 2 and words[0] in CONCEPT_COLOURS and words[1] in CONCEPT_SHAPES:
        return None
    return (
        f"must be '<colour> <shape>' with a colour from {', '.join(CONCEPT_COLOURS)} and a shape from "
        f"{', '.join(CONCEPT_SHAPES)}, got {show(value)}"
    )


FIELD_RULES: dict[str, FieldRule] = {
    "sample.concept": _concept_error,
    "model.clip_skip": _AT_LEAST_1,
    "network.targets[]": _regex_error,
    "network.exclude[]": _regex_error,
    "network.rank": _AT_LEAST_1,
    "network.alpha": _ALPHA,
    "network.conv_rank": _AT_LEAST_1,
    "network.conv_alpha": _ALPHA,
    "network.rank_dropout": _FRACTION,
    "network.module_dropout": _FRACTION,
    "network.rank_pattern{}": _regex_error,
    "network.rank_pattern[]": _AT_LEAST_1,
    "network.alpha_pattern{}": _regex_error,
    "network.alpha_pattern[]": _ALPHA,
    "data.repeats": _AT_LEAST_1,
    "data.caption_extension": _EXTENSION,
    "data.keep_tokens": _NON_NEGATIVE,
    "data.caption_separator": _must(bool, "a non-empty string"),
    "data.caption_dropout": _FRACTION,
    "data.tag_dropout": _FRACTION,
    "data.resolution": _SIDE,
    "data.bucket_min_side": _SIDE,
    "data.bucket_max_side": _SIDE,
    "data.bucket_step": _SIDE,
    "data.max_aspect_ratio": _AT_LEAST_1,
    "data.reg_repeats": _AT_LEAST_1,
    "data.prior_loss_weight": _NON_NEGATIVE,
    "data.num_workers": _NON_NEGATIVE,
    "data.validation_split": _FRACTION,
    "data.stream_buffer": _AT_LEAST_1,
    "data.subsets[].repeats": _AT_LEAST_1,
    "data.subsets[].caption_extension": _EXTENSION,
    "data.subsets[].keep_tokens": _NON_NEGATIVE,
    "data.subsets[].caption_dropout": _FRACTION,
    "data.subsets[].tag_dropout": _FRACTION,
    "data.subsets[].prior_loss_weight": _NON_NEGATIVE,
    "train.max_steps": _AT_LEAST_1,
    "train.epochs": _AT_LEAST_1,
    "train.batch_size": _AT_LEAST_1,
    "train.gradient_accumulation": _AT_LEAST_1,
    "train.lr": _POSITIVE,
    "train.unet_lr": _POSITIVE,
    "train.text_encoder_lr": _must(
        lambda v: 1 <= len(_values(v)) <= 2 and min(_values(v)) > 0,
        "> 0, or a list of one or two values > 0 (SDXL's encoders 1 and 2)",
    ),
    "train.lr_pattern{}": _regex_error,
    "train.lr_pattern[]": _NON_NEGATIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.adam_beta1": _FRACTION,
    "train.adam_beta2": _FRACTION,
    "train.adam_eps": _POSITIVE,
    "train.warmup_steps": _NON_NEGATIVE,
    "train.lr_scheduler_num_cycles": _AT_LEAST_1,
    "train.lr_scheduler_power": _POSITIVE,
    "train.max_grad_norm": _NON_NEGATIVE,
    "train.seed": _NON_NEGATIVE,
    "train.noise_offset": _NON_NEGATIVE,
    "train.min_snr_gamma": _POSITIVE,
    "train.multires_noise_iterations": _NON_NEGATIVE,
    "train.multires_noise_discount": _POSITIVE,
    "train.ip_noise_gamma": _NON_NEGATIVE,
    "train.min_timestep": _must(lambda v: 0 <= v <= 999, "in [0, 999]", "SD schedulers have timesteps 0-999"),
    "train.max_timestep": _must(lambda v: 1 <= v <= 1000, "in [1, 1000]", "SD schedulers have timesteps 0-999"),
    "train.huber_c": _must(lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.huber_scale": _POSITIVE,
    "network.scale_weight_norms": _POSITIVE,
    "train.save_every_steps": _AT_LEAST_1,
    "train.keep_last_checkpoints": _AT_LEAST_1,
    "train.validation_every_steps": _AT_LEAST_1,
    "train.ema.decay": _must(lambda v: 0 < v <= 1, "in (0, 1]", "0.999-0.9999 is usual"),
    "train.ema.update_after_step": _NON_NEGATIVE,
    "train.ema.inv_gamma": _POSITIVE,
    "train.ema.power": _POSITIVE,
    "train.ema.min_decay": _must(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "sample.prompts[].width": _SIDE,
    "sample.prompts[].height": _SIDE,
    "sample.prompts[].seed": _NON_NEGATIVE,
    "sample.prompts[].steps": _AT_LEAST_1,
    "sample.prompts[].guidance": _NON_NEGATIVE,
    "sample.steps": _AT_LEAST_1,
    "sample.guidance": _NON_NEGATIVE,
    "sample.seed": _NON_NEGATIVE,
    "sample.every_n_steps": _AT_LEAST_1,
    "sample.guidance_rescale": _must(lambda v: 0 <= v <= 1, "in [0, 1]", "diffusers blends the rescaled CFG by it"),
    "logging.wandb.project": _must(lambda v: bool(v.strip()), "a non-empty project name"),
    "sample.every_n_epochs": _AT_LEAST_1,
    "output.name": _FILE_STEM,
    "output.save_adapter_every_steps": _AT_LEAST_1,
}

# ---------------------------------------------------------------------------------------------------------
# Part 2: contradictions between values. A rule runs only when every section it reads passed part 1,
# so one mistake is never reported twice.


@dataclass(frozen=True)
class _Rule:
    key: str  # where the problem is reported
    broken: Callable[..., bool]  # its parameter names are the sections it reads
    message: str  # str.format()ed with those sections


_NO_LATENT_CACHE = (
    "latents are cached once per image, so the random crop would be frozen; set data.cache_latents: none "
    "(data.flip works with cached latents: both orientations are cached)"
)

RULES: tuple[_Rule, ...] = (
    _Rule(
        "train.max_steps",
        lambda train: train.max_steps is None and train.epochs is None,
        "give train.max_steps or train.epochs",
    ),
    _Rule(
        "train.epochs",
        lambda train: None not in (train.max_steps, train.epochs),
        "give train.max_steps or train.epochs, not both",
    ),
    _Rule(
        "train.warmup_steps",
        lambda train: train.max_steps is not None and train.warmup_steps >= train.max_steps,
        "must be < train.max_steps ({train.max_steps}), got {train.warmup_steps}",
    ),
    _Rule(
        "train.warmup_steps",
        lambda train: train.scheduler == "constant" and train.warmup_steps > 0,
        "the constant scheduler has no warm-up; use train.scheduler: constant_with_warmup (or set warmup_steps: 0)",
    ),
    _Rule(
        "train.adaptive_noise_scale",
        lambda train: train.adaptive_noise_scale is not None and train.noise_offset == 0,
        "adds to train.noise_offset, which is 0: set train.noise_offset > 0 too (as kohya requires)",
    ),
    _Rule(
        "train.max_timestep",
        lambda train: train.max_timestep is not None and train.max_timestep < train.min_timestep,
        "must be >= train.min_timestep ({train.min_timestep}), got {train.max_timestep}",
    ),
    _Rule(
        "train.scale_v_pred_loss_like_noise_pred",
        lambda model, train: train.scale_v_pred_loss_like_noise_pred and model.prediction_type == "epsilon",
        "needs a v-prediction model (model.prediction_type: v_prediction), as in kohya",
    ),
    _Rule(
        "network.train_unet",
        lambda network: not (network.train_unet or network.train_text_encoder),
        "nothing to train: set network.train_unet and/or network.train_text_encoder to true",
    ),
    _Rule(
        "network.targets",
        lambda network: network.preset == "none" and not network.targets,
        "with network.preset: none, list at least one module regex in network.targets",
    ),
    _Rule(
        "data.path",
        lambda data: data.path is None and not data.subsets,
        "required: give data.path (a folder, a parquet/arrow/jsonl/csv file or folder of shards, a save_to_disk "
        "folder or hf:OWNER/NAME) or a list of data.subsets",
    ),
    _Rule(
        "data.subsets",
        lambda data: data.cache_latents != "none" and any(bool(s.random_crop) for s in data.subsets),
        "a subset sets random_crop; " + _NO_LATENT_CACHE,
    ),
    _Rule(
        "data.streaming",
        lambda data: data.streaming and (data.validation_split > 0 or data.cache_latents != "none"),
        "a stream is read once per epoch and never materialised: set data.cache_latents: none (latents are "
        "encoded on the fly) and use data.validation_path instead of data.validation_split",
    ),
    _Rule(
        "data.streaming",
        lambda data, train: data.streaming and train.max_steps is None,
        "a stream's length is unknown until it ends: give train.max_steps (not train.epochs)",
    ),
    _Rule("data.random_crop", lambda data: data.random_crop and data.cache_latents != "none", _NO_LATENT_CACHE),
    _Rule(
        "data.mask_path",
        lambda data: data.mask_path is not None and data.alpha_mask,
        "give data.mask_path or data.alpha_mask, not both (each image's mask comes from one of them)",
    ),
    _Rule(
        "model.dtype",
        lambda model, train: model.dtype != "fp32" and train.mixed_precision != model.dtype,
        "{model.dtype} frozen weights need train.mixed_precision: {model.dtype} (autocast), got "
        "{train.mixed_precision}",
    ),
    _Rule(
        "data.bucket_min_side",
        lambda data: data.bucketing and data.bucket_min_side > data.resolution,
        "must be <= data.resolution ({data.resolution}) when bucketing, got {data.bucket_min_side}",
    ),
    _Rule(
        "data.bucket_max_side",
        lambda data: data.bucketing and data.bucket_max_side < data.resolution,
        "must be >= data.resolution ({data.resolution}) when bucketing, got {data.bucket_max_side}",
    ),
    _Rule(
        "data.bucket_min_side",
        lambda data: data.bucketing and data.bucket_min_side % data.bucket_step != 0,
        "must be a multiple of data.bucket_step ({data.bucket_step}), got {data.bucket_min_side}",
    ),
    _Rule(
        "data.bucket_max_side",
        lambda data: data.bucketing and data.bucket_max_side % data.bucket_step != 0,
        "must be a multiple of data.bucket_step ({data.bucket_step}), got {data.bucket_max_side}",
    ),
    _Rule(
        "data.validation_split",
        lambda data: data.validation_path is not None and data.validation_split > 0,
        "give data.validation_path or data.validation_split, not both",
    ),
    _Rule(
        "train.validation_every_steps",
        lambda data, train: (
            train.validation_every_steps is not None and data.validation_path is None and data.validation_split == 0
        ),
        "needs a validation set: set data.validation_path or data.validation_split",
    ),
    _Rule(
        "sample.concept",
        lambda sample: sample.concept is not None and not sample.prompts,
        "needs sample.prompts that name the concept, to score their images",
    ),
    _Rule(
        "sample.concept",
        lambda sample: (
            sample.concept is not None
            and sample.prompts
            and not any(all(w in p.prompt.split() for w in sample.concept.split()) for p in sample.prompts)
        ),
        "no prompt in sample.prompts names both of its words ({sample.concept}), so there is nothing to score",
    ),
    _Rule(
        "sample.prompts",
        lambda sample: not sample.prompts and (sample.every_n_steps or sample.every_n_epochs) is not None,
        "sample.every_n_steps/every_n_epochs is set but there are no prompts to sample",
    ),
    _Rule(
        "train.ema.min_decay",
        lambda train: train.ema is not None and train.ema.min_decay > train.ema.decay,
        "must be <= train.ema.decay ({train.ema.decay}), got {train.ema.min_decay}",
    ),
    _Rule(
        "sample.use_ema",
        lambda sample, train: sample.use_ema and train.ema is None,
        "needs EMA weights: set train.ema (e.g. train.ema: {{decay: 0.999}}) or sample.use_ema: false",
    ),
    _Rule(
        "output.export_ema",
        lambda output, train: output.export_ema and train.ema is None,
        "needs EMA weights: set train.ema (e.g. train.ema: {{decay: 0.999}}) or output.export_ema: false",
    ),
    # With zero terminal SNR the last timestep is pure noise: an epsilon target there is the input itself
    # and x0 = (x_t - sigma * eps) / 0 is undefined; the paper that introduced it requires v-prediction.
    _Rule(
        "model.zero_terminal_snr",
        lambda model: model.zero_terminal_snr and model.prediction_type == "epsilon",
        "needs model.prediction_type: v_prediction (with epsilon the last timestep predicts nothing)",
    ),
    # Samples from a zero-terminal-SNR model need the rescaled schedule, which diffusers' PNDM does not offer.
    _Rule(
        "sample.sampler",
        lambda model, sample: model.zero_terminal_snr and sample.sampler == "pndm",
        "pndm cannot sample with model.zero_terminal_snr (no rescaled schedule); use euler, euler_a, ddim or dpmpp_2m",
    ),
)


def rule_problems(sections: Mapping[str, Any]) -> Iterator[ConfigProblem]:
    for rule in RULES:
        names = signature(rule.broken).parameters
        if all(sections.get(name, INVALID) is not INVALID for name in names):
            reads = {name: sections[name] for name in names}
            if rule.broken(**reads):
                yield ConfigProblem(rule.key, rule.message.format(**reads))

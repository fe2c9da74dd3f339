"""Config loading: types, unknown keys, ranges, contradictions, paths, --set, round trip, docs table."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from loha_train.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    NetworkConfig,
    OutputConfig,
    SampleConfig,
    SamplePrompt,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    resolved_prompts,
)
from loha_train.config.check import schema_keys, type_hints
from loha_train.config.doc import END, START, field_comments, render_config_table, replace_table
from loha_train.config.rules import FIELD_RULES, RULES

REPO = Path(__file__).resolve().parents[1]

MINIMAL: dict[str, Any] = {
    "model": {"path": "builtin:tiny-sd"},
    "data": {"path": "builtin:shapes"},
    "train": {"epochs": 1},
    "output": {"dir": "out"},
}


def raw_with(changes: dict[str, Any], base: dict[str, Any] = MINIMAL) -> dict[str, Any]:
    """A deep copy of `base` with each dotted key set (sections created as needed)."""
    raw = copy.deepcopy(base)
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return raw


def problems_of(raw: Any, overrides: tuple[str, ...] = ()) -> dict[str, str]:
    """Dotted key -> message (joined when a key has several) of the ConfigError that `raw` must raise."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, overrides, check_paths=False)
    found: dict[str, str] = {}
    for problem in info.value.problems:
        found[problem.key] = f"{found[problem.key]} | {problem.message}" if problem.key in found else problem.message
    return found


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# Defaults and successful loads


def test_minimal_config_gets_the_dataclass_defaults() -> None:
    cfg = config_from_dict(MINIMAL, check_paths=False)
    assert cfg.model == ModelConfig(path="builtin:tiny-sd")
    assert cfg.network == NetworkConfig()
    assert cfg.data == DataConfig(path="builtin:shapes")
    assert cfg.train == TrainConfig(epochs=1)
    assert cfg.output == OutputConfig(dir=os.path.abspath("out"))
    assert cfg.sample == SampleConfig()


def test_empty_sections_are_sections_of_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "model: {path: builtin:tiny-sd}\nnetwork:\nsample:\ndata: {path: builtin:shapes}\n")
    cfg = load_config(path, ["train.max_steps=10", f"output.dir={tmp_path / 'out'}"])
    assert cfg.network == NetworkConfig()
    assert cfg.sample == SampleConfig()


def test_yaml_file_loads_with_yaml_1_2_scalars(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
model: {path: builtin:tiny-sd, prediction_type: v_prediction, zero_terminal_snr: true}
network: {targets: [to_q, to_k], rank_pattern: {"down_blocks\\\\.0": 4}, alpha_pattern: {mid: 1}}
data:
  path: builtin:shapes
  caption_separator: =
  trigger_word: 2024-01-01
  cache_latents: none
  flip: true
train:
  lr: 1e-4            # YAML 1.1 would read this as a string
  unet_lr: "5e-5"     # a quoted number is still a number
  mixed_precision: no # YAML 1.1 would read this as false
  seed: 010           # YAML 1.1 would read this as octal 8
  max_steps: 100
output: {dir: out, trigger_words: [sks]}
sample:
  prompts:
    - a photo of sks
    - {prompt: sks at night, width: 256, seed: 3}
""",
    )
    cfg = load_config(path)
    assert cfg.train.effective_lr == 1e-4 and cfg.train.unet_lr == 5e-5
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.seed == 10
    assert cfg.data.caption_separator == "=" and cfg.data.trigger_word == "2024-01-01"
    assert cfg.network.targets == ("to_q", "to_k")
    assert cfg.network.rank_pattern == {"down_blocks\\.0": 4}
    assert cfg.network.alpha_pattern == {"mid": 1.0} and isinstance(cfg.network.alpha_pattern["mid"], float)
    assert cfg.sample.prompts == (
        SamplePrompt(prompt="a photo of sks"),
        SamplePrompt(prompt="sks at night", width=256, seed=3),
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"data.random_crop": True, "data.flip": True, "data.cache_latents": "none"},
        {"data.caption_dropout": 0.1},  # an empty caption's embedding can be cached too
        {"data.shuffle_captions": True, "data.tag_dropout": 0.1, "data.cache_text_embeddings": False},
        {"network.train_text_encoder": True, "data.cache_text_embeddings": False},
        {"network.train_unet": False, "network.train_text_encoder": True, "data.cache_text_embeddings": False},
        {"network.preset": "none", "network.targets": ["attn1"]},
        {"data.bucketing": False, "data.resolution": 2048},
        {"data.resolution": 256, "data.bucket_min_side": 256},
        {"train.epochs": None, "train.max_steps": 10, "train.scheduler": "cosine", "train.warmup_steps": 9},
        {"model.zero_terminal_snr": True, "model.prediction_type": "v_prediction"},
        {"model.zero_terminal_snr": True},  # auto: checked against the scheduler once it is loaded
        {"data.validation_split": 0.1, "train.validation_every_steps": 50},
        {"sample.prompts": ["a cat"], "sample.every_n_steps": 100, "sample.every_n_epochs": 1},
        {"train.max_grad_norm": 0, "train.noise_offset": 0, "data.num_workers": 0, "train.warmup_steps": 0},
        {"network.alpha": 1, "train.lr": 1},  # ints are fine where floats are expected
    ],
)
def test_valid_configs_load(changes: dict[str, Any]) -> None:
    config_from_dict(raw_with(changes), check_paths=False)


# ---------------------------------------------------------------------------------------------------------
# One table per kind of problem: (changes to MINIMAL, dotted key of the problem, fragment of its message)

TYPE_ERRORS = [
    ({"network.rank": "eight"}, "network.rank", "must be an integer, got 'eight'"),
    ({"network.rank": 8.5}, "network.rank", "must be an integer"),
    ({"network.rank": 8.0}, "network.rank", "write 8"),
    ({"network.rank": True}, "network.rank", "must be an integer, got true"),
    ({"train.lr": True}, "train.lr", "must be a number"),
    ({"train.lr": "fast"}, "train.lr", "must be a number or null, got 'fast'"),
    ({"train.lr": float("inf")}, "train.lr", "finite"),
    ({"train.lr": "nan"}, "train.lr", "finite"),
    ({"data.flip": "yes"}, "data.flip", "must be true or false, got 'yes'"),
    ({"data.flip": 1}, "data.flip", "must be true or false"),
    ({"output.name": 123}, "output.name", "quote it"),
    ({"model.path": None}, "model.path", "must be a string, got null"),
    ({"network.targets": "to_q"}, "network.targets", "must be a list of strings"),
    ({"network.targets": ["to_q", 1]}, "network.targets[1]", "must be a string"),
    ({"network.rank_pattern": ["down"]}, "network.rank_pattern", "mapping from strings to integers"),
    ({"network.rank_pattern": {"down": "big"}}, "network.rank_pattern['down']", "must be an integer"),
    ({"train.optimizer": "adam"}, "train.optimizer", "one of 'adamw', 'adamw8bit', 'prodigy'"),
    ({"train.optimizer": "adam"}, "train.optimizer", "did you mean 'adamw'?"),
    ({"train.mixed_precision": False}, "train.mixed_precision", "one of 'no', 'fp16', 'bf16'"),
    ({"model": "builtin:tiny-sd"}, "model", "must be a mapping"),
    ({"sample.prompts": [{"prompt": "a", "width": "wide"}]}, "sample.prompts[0].width", "integer or null"),
    ({"sample.prompts": ["a", {"negative_prompt": "x"}]}, "sample.prompts[1].prompt", "required"),
    ({"sample.prompts": [3]}, "sample.prompts[0]", "must be a mapping"),
]

UNKNOWN_KEYS = [
    ({"netwrk": {"rank": 4}}, "netwrk", "did you mean network?"),
    ({"rank": 4}, "rank", "did you mean network.rank?"),
    ({"misc": 1}, "misc", "valid keys here: model, network, data, train, output, sample"),
    ({"network.rnak": 4}, "network.rnak", "did you mean network.rank?"),
    ({"train.resolution": 512}, "train.resolution", "did you mean data.resolution?"),
    ({"train.learning_rat": 1}, "train.learning_rat", "unknown key"),
    ({"sample.prompts": [{"prompt": "a", "widht": 64}]}, "sample.prompts[0].widht", "sample.prompts[0].width?"),
]

RANGE_ERRORS = [
    ({"model.clip_skip": 0}, "model.clip_skip", "must be >= 1, got 0"),
    ({"network.targets": ["to_q", "("]}, "network.targets[1]", "'(' is not a valid regular expression"),
    ({"network.exclude": ["[a"]}, "network.exclude[0]", "not a valid regular expression"),
    ({"network.rank": 0}, "network.rank", "must be >= 1, got 0"),
    ({"network.alpha": 0}, "network.alpha", "must be > 0, got 0.0; alpha 0"),
    ({"network.conv_rank": 0}, "network.conv_rank", "must be >= 1"),
    ({"network.conv_alpha": -1}, "network.conv_alpha", "must be > 0"),
    ({"network.rank_dropout": 1.0}, "network.rank_dropout", "must be in [0, 1), got 1.0"),
    ({"network.module_dropout": -0.1}, "network.module_dropout", "must be in [0, 1)"),
    ({"network.rank_pattern": {"(": 4}}, "network.rank_pattern['(']", "not a valid regular expression"),
    ({"network.rank_pattern": {"down": 0}}, "network.rank_pattern['down']", "must be >= 1"),
    ({"network.alpha_pattern": {"*": 1.0}}, "network.alpha_pattern['*']", "not a valid regular expression"),
    ({"network.alpha_pattern": {"up": 0}}, "network.alpha_pattern['up']", "must be > 0"),
    ({"data.repeats": 0}, "data.repeats", "must be >= 1"),
    ({"data.caption_extension": "txt"}, "data.caption_extension", "starting with '.'"),
    ({"data.keep_tokens": -1}, "data.keep_tokens", "must be >= 0"),
    ({"data.caption_separator": ""}, "data.caption_separator", "non-empty"),
    ({"data.caption_dropout": 1}, "data.caption_dropout", "must be in [0, 1)"),
    ({"data.tag_dropout": 1.5}, "data.tag_dropout", "must be in [0, 1)"),
    ({"data.resolution": 500}, "data.resolution", "multiple of 8, got 500"),
    ({"data.resolution": 0}, "data.resolution", "positive multiple of 8"),
    ({"data.bucket_min_side": 100}, "data.bucket_min_side", "multiple of 8"),
    ({"data.bucket_max_side": -8}, "data.bucket_max_side", "positive multiple of 8"),
    ({"data.bucket_step": 60}, "data.bucket_step", "multiple of 8"),
    ({"data.max_aspect_ratio": 0.5}, "data.max_aspect_ratio", "must be >= 1, got 0.5"),
    ({"data.reg_repeats": 0}, "data.reg_repeats", "must be >= 1"),
    ({"data.prior_loss_weight": -1}, "data.prior_loss_weight", "must be >= 0"),
    ({"data.num_workers": -1}, "data.num_workers", "must be >= 0"),
    ({"data.validation_split": 1.0}, "data.validation_split", "must be in [0, 1)"),
    ({"data.stream_buffer": 0}, "data.stream_buffer", "must be >= 1"),
    ({"data.subsets": [{"path": "a", "repeats": 0}]}, "data.subsets[0].repeats", "must be >= 1"),
    ({"data.subsets": [{"path": "a", "caption_extension": "txt"}]}, "data.subsets[0].caption_extension", "'.'"),
    ({"data.subsets": [{"path": "a", "keep_tokens": -1}]}, "data.subsets[0].keep_tokens", "must be >= 0"),
    ({"data.subsets": [{"path": "a", "caption_dropout": 1}]}, "data.subsets[0].caption_dropout", "in [0, 1)"),
    ({"data.subsets": [{"path": "a", "tag_dropout": -1}]}, "data.subsets[0].tag_dropout", "in [0, 1)"),
    ({"data.subsets": [{"path": "a", "prior_loss_weight": -1}]}, "data.subsets[0].prior_loss_weight", ">= 0"),
    ({"train.epochs": None, "train.max_steps": 0}, "train.max_steps", "must be >= 1"),
    ({"train.epochs": 0}, "train.epochs", "must be >= 1"),
    ({"train.batch_size": 0}, "train.batch_size", "must be >= 1"),
    ({"train.gradient_accumulation": 0}, "train.gradient_accumulation", "must be >= 1"),
    ({"train.lr": 0}, "train.lr", "must be > 0"),
    ({"train.unet_lr": -1e-4}, "train.unet_lr", "must be > 0"),
    ({"train.text_encoder_lr": 0}, "train.text_encoder_lr", "must be > 0"),
    ({"train.weight_decay": -0.1}, "train.weight_decay", "must be >= 0"),
    ({"train.adam_beta1": 1}, "train.adam_beta1", "must be in [0, 1)"),
    ({"train.adam_beta2": 1.5}, "train.adam_beta2", "must be in [0, 1)"),
    ({"train.adam_eps": 0}, "train.adam_eps", "must be > 0"),
    ({"train.warmup_steps": -1}, "train.warmup_steps", "must be >= 0"),
    ({"train.lr_scheduler_num_cycles": 0}, "train.lr_scheduler_num_cycles", "must be >= 1"),
    ({"train.lr_scheduler_power": 0}, "train.lr_scheduler_power", "must be > 0"),
    ({"train.max_grad_norm": -1}, "train.max_grad_norm", "must be >= 0"),
    ({"train.seed": -1}, "train.seed", "must be >= 0"),
    ({"train.noise_offset": -0.1}, "train.noise_offset", "must be >= 0"),
    ({"train.min_snr_gamma": 0}, "train.min_snr_gamma", "must be > 0"),
    ({"train.save_every_steps": 0}, "train.save_every_steps", "must be >= 1"),
    ({"train.keep_last_checkpoints": 0}, "train.keep_last_checkpoints", "must be >= 1"),
    ({"train.validation_every_steps": 0}, "train.validation_every_steps", "must be >= 1"),
    ({"train.ema.decay": 0}, "train.ema.decay", "must be in (0, 1]"),
    ({"train.ema.update_after_step": -1}, "train.ema.update_after_step", "must be >= 0"),
    ({"train.ema.inv_gamma": 0}, "train.ema.inv_gamma", "must be > 0"),
    ({"train.ema.power": 0}, "train.ema.power", "must be > 0"),
    ({"train.ema.min_decay": 1.5}, "train.ema.min_decay", "must be in [0, 1]"),
    ({"sample.prompts": [{"prompt": "a", "width": 100}]}, "sample.prompts[0].width", "multiple of 8"),
    ({"sample.prompts": [{"prompt": "a", "height": 0}]}, "sample.prompts[0].height", "multiple of 8"),
    ({"sample.prompts": [{"prompt": "a", "seed": -1}]}, "sample.prompts[0].seed", "must be >= 0"),
    ({"sample.prompts": [{"prompt": "a", "steps": 0}]}, "sample.prompts[0].steps", "must be >= 1"),
    ({"sample.prompts": [{"prompt": "a", "guidance": -1}]}, "sample.prompts[0].guidance", "must be >= 0"),
    ({"sample.steps": 0}, "sample.steps", "must be >= 1"),
    ({"sample.guidance": -1}, "sample.guidance", "must be >= 0"),
    ({"sample.seed": -5}, "sample.seed", "must be >= 0"),
    ({"sample.every_n_steps": 0, "sample.prompts": ["a"]}, "sample.every_n_steps", "must be >= 1"),
    (
        {"sample.concept": "pink star", "sample.prompts": ["a pink star"]},
        "sample.concept",
        "must be '<colour> <shape>'",
    ),
    ({"sample.every_n_epochs": 0, "sample.prompts": ["a"]}, "sample.every_n_epochs", "must be >= 1"),
    ({"network.scale_weight_norms": 0}, "network.scale_weight_norms", "must be > 0"),
    ({"train.text_encoder_lr": [1e-4, 1e-4, 1e-4]}, "train.text_encoder_lr", "or a list of one or two values"),
    ({"train.lr_pattern": {"(": 1e-3}}, "train.lr_pattern['(']", "not a valid regular expression"),
    ({"train.lr_pattern": {"down": -1}}, "train.lr_pattern['down']", "must be >= 0"),
    ({"train.multires_noise_iterations": -1}, "train.multires_noise_iterations", "must be >= 0"),
    ({"train.multires_noise_discount": 0}, "train.multires_noise_discount", "must be > 0"),
    ({"train.ip_noise_gamma": -0.1}, "train.ip_noise_gamma", "must be >= 0"),
    ({"train.min_timestep": 1000}, "train.min_timestep", "must be in [0, 999]"),
    ({"train.max_timestep": 0}, "train.max_timestep", "must be in [1, 1000]"),
    ({"train.huber_c": 0}, "train.huber_c", "must be in (0, 1]"),
    ({"train.huber_scale": 0}, "train.huber_scale", "must be > 0"),
    ({"sample.guidance_rescale": 1.5}, "sample.guidance_rescale", "must be in [0, 1], got 1.5"),
    ({"logging.wandb": {"project": " "}}, "logging.wandb.project", "a non-empty project name"),
    ({"output.name": "runs/loha"}, "output.name", "without /"),
    ({"output.save_adapter_every_steps": 0}, "output.save_adapter_every_steps", "must be >= 1"),
]

CONTRADICTIONS = [
    ({"data.path": None}, "data.path", "or a list of data.subsets"),
    ({"data.subsets": [{"path": "b", "random_crop": True}]}, "data.subsets", "a subset sets random_crop"),
    ({"data.streaming": True}, "data.streaming", "set data.cache_latents: none"),
    (
        {"data.streaming": True, "data.cache_latents": "none", "train.max_steps": None, "train.epochs": 2},
        "data.streaming",
        "give train.max_steps (not train.epochs)",
    ),
    ({"train.epochs": None}, "train.max_steps", "give train.max_steps or train.epochs"),
    ({"train.max_steps": 100}, "train.epochs", "not both"),
    (
        {"train.epochs": None, "train.max_steps": 10, "train.scheduler": "linear", "train.warmup_steps": 10},
        "train.warmup_steps",
        "must be < train.max_steps (10), got 10",
    ),
    ({"train.warmup_steps": 100}, "train.warmup_steps", "constant_with_warmup"),
    ({"network.train_unet": False}, "network.train_unet", "nothing to train"),
    ({"network.preset": "none"}, "network.targets", "at least one"),
    ({"data.random_crop": True}, "data.random_crop", "set data.cache_latents: none"),
    ({"data.random_crop": True, "data.cache_latents": "memory"}, "data.random_crop", "random crop would be frozen"),
    ({"data.alpha_mask": True, "data.mask_path": "masks"}, "data.mask_path", "not both"),
    ({"model.dtype": "fp16"}, "model.dtype", "need train.mixed_precision: fp16"),
    ({"data.resolution": 2048}, "data.bucket_max_side", "must be >= data.resolution (2048) when bucketing, got 1024"),
    ({"data.resolution": 128}, "data.bucket_min_side", "must be <= data.resolution (128) when bucketing, got 256"),
    ({"data.bucket_min_side": 200}, "data.bucket_min_side", "multiple of data.bucket_step (64)"),
    ({"data.bucket_max_side": 1000}, "data.bucket_max_side", "multiple of data.bucket_step (64)"),
    ({"data.validation_path": "val", "data.validation_split": 0.1}, "data.validation_split", "not both"),
    ({"train.validation_every_steps": 10}, "train.validation_every_steps", "needs a validation set"),
    ({"sample.concept": "purple star"}, "sample.concept", "needs sample.prompts that name the concept"),
    (
        {"sample.concept": "purple star", "sample.prompts": ["a purple circle", "a red star"]},
        "sample.concept",
        "no prompt in sample.prompts names both of its words",
    ),
    ({"sample.every_n_epochs": 1}, "sample.prompts", "no prompts"),
    ({"model.zero_terminal_snr": True, "model.prediction_type": "epsilon"}, "model.zero_terminal_snr", "v_prediction"),
    ({"model.zero_terminal_snr": True, "sample.sampler": "pndm"}, "sample.sampler", "pndm cannot sample"),
    ({"train.adaptive_noise_scale": 0.1}, "train.adaptive_noise_scale", "set train.noise_offset > 0"),
    (
        {"train.min_timestep": 500, "train.max_timestep": 400},
        "train.max_timestep",
        "must be >= train.min_timestep (500)",
    ),
    (
        {"train.scale_v_pred_loss_like_noise_pred": True, "model.prediction_type": "epsilon"},
        "train.scale_v_pred_loss_like_noise_pred",
        "needs a v-prediction model",
    ),
    ({"train.ema.decay": 0.9, "train.ema.min_decay": 0.95}, "train.ema.min_decay", "must be <= train.ema.decay"),
    ({"sample.use_ema": True}, "sample.use_ema", "needs EMA weights: set train.ema"),
    ({"output.export_ema": True}, "output.export_ema", "needs EMA weights: set train.ema"),
]


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    TYPE_ERRORS + UNKNOWN_KEYS + RANGE_ERRORS + CONTRADICTIONS,
    ids=lambda v: None if isinstance(v, dict) else str(v),
)
def test_bad_config_names_the_key(changes: dict[str, Any], key: str, fragment: str) -> None:
    found = problems_of(raw_with(changes))
    assert key in found, f"expected a problem at {key}, got {found}"
    assert fragment in found[key]
    assert len(found) == 1, f"one mistake should be one problem, got {found}"


def _schema_key(dotted: str) -> str:
    """sample.prompts[0].width -> sample.prompts[].width; network.rank_pattern['x'] -> network.rank_pattern[]"""
    out, depth = [], 0
    for char in dotted:
        depth += char == "["
        if depth == 0:
            out.append(char)
        depth -= char == "]"
        if char == "]" and depth == 0:
            out.append("[]")
    return "".join(out)


def test_every_field_rule_is_tested_and_names_a_real_key() -> None:
    keys = set(schema_keys(Config))
    tested = {_schema_key(key) for _, key, _ in RANGE_ERRORS}
    for rule_key in FIELD_RULES:
        plain = rule_key.removesuffix("[]").removesuffix("{}")
        assert plain in keys, f"FIELD_RULES key {rule_key} is not in the schema"
        assert rule_key.replace("{}", "[]") in tested, f"no test in RANGE_ERRORS for {rule_key}"


def test_every_contradiction_rule_is_tested_and_names_a_real_key() -> None:
    keys = set(schema_keys(Config))
    tested = {(key, fragment) for _, key, fragment in CONTRADICTIONS}
    for rule in RULES:
        assert rule.key in keys
        assert any(key == rule.key for key, _ in tested), f"no test in CONTRADICTIONS for {rule.key}"
    assert len(CONTRADICTIONS) >= len(RULES)


def test_missing_required_fields_are_each_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "# nothing yet\n"))
    keys = {p.key for p in info.value.problems}
    assert keys == {"model.path", "data.path", "output.dir", "train.max_steps"}


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
model: {path: builtin:tiny-sd, clip_skip: 0}
network: {rank: 0, alpah: 2}
data: {path: builtin:shapes, random_crop: true}
train: {lr: fast, epochs: 1}
output: {dir: out}
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["sample.every_n_steps=abc"])
    keys = [p.key for p in info.value.problems]
    assert set(keys) == {
        "model.clip_skip",
        "network.alpah",
        "network.rank",
        "data.random_crop",
        "train.lr",
        "sample.every_n_steps",
    }
    text = str(info.value)
    assert str(path) in text and "(6 problems)" in text
    assert "  - network.rank: must be >= 1, got 0" in text.splitlines()
    assert "network.alpah: unknown key; did you mean network.alpha?" in text


# ---------------------------------------------------------------------------------------------------------
# The file itself


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("model:\n  path: a\n  dtype: [fp16\ndata: {}\n", "line 4, column 5"),
        ("model:\n  path: a\n bad: 1\n", "line 3, column 2"),
        ("model: {path: a}\nmodel: {path: b}\n", "line 2, column 1"),  # duplicate key
        ("train:\n\tlr: 1\n", "line 2, column 1"),  # tab indentation
    ],
)
def test_yaml_errors_give_file_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.key == ""
    assert where in problem.message, problem.message
    assert str(path) in str(info.value)


def test_duplicate_key_is_an_error_not_last_wins(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate key 'lr' \\(first at line 2\\)"):
        load_config(write(tmp_path, "train:\n  lr: 1e-4\n  lr: 2e-4\n"))


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping of sections"):
        load_config(write(tmp_path, "- model\n- data\n"))


# ---------------------------------------------------------------------------------------------------------
# Paths


def test_relative_paths_are_resolved_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "vae.safetensors").touch()
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    raw = raw_with({"data.path": "images", "model.vae_path": "./vae.safetensors", "output.dir": "runs/a"})
    path = write(config_dir, json.dumps(raw))  # JSON is YAML
    cfg = load_config(path)
    assert cfg.data.path == str(tmp_path / "images")
    assert cfg.model.vae_path == str(tmp_path / "vae.safetensors")
    assert cfg.output.dir == str(tmp_path / "runs" / "a")
    assert cfg.model.path == "builtin:tiny-sd"
    assert not (tmp_path / "runs").exists(), "loading must never create folders"


@pytest.mark.parametrize(
    "key", ["model.path", "model.vae_path", "network.init_from", "data.path", "data.reg_path", "data.validation_path"]
)
def test_missing_input_path_names_key_and_path(tmp_path: Path, key: str) -> None:
    missing = tmp_path / "nope"
    raw = raw_with({key: str(missing)})
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert [(p.key, p.message) for p in info.value.problems] == [(key, f"does not exist: {missing}")]
    config_from_dict(raw, check_paths=False)  # the check can be skipped (tests, dry runs)


def test_output_dir_must_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    with pytest.raises(ConfigError, match=r"output\.dir: is a file"):
        config_from_dict(raw_with({"output.dir": str(tmp_path / "file")}))


# ---------------------------------------------------------------------------------------------------------
# --set overrides


def test_overrides_parse_values_as_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(MINIMAL))
    cfg = load_config(
        path,
        [
            "train.lr=2e-4",
            "network.targets=[to_q, to_k]",
            "train.epochs=",  # empty is null
            "train.max_steps=50",
            "sample.prompts=[a cat]",
            "data.default_caption=a photo, of things",
            "network.rank_pattern={down: 4}",
        ],
        check_paths=False,
    )
    assert cfg.train.lr == 2e-4
    assert cfg.network.targets == ("to_q", "to_k")
    assert (cfg.train.epochs, cfg.train.max_steps) == (None, 50)
    assert cfg.sample.prompts == (SamplePrompt("a cat"),)
    assert cfg.data.default_caption == "a photo, of things"
    assert cfg.network.rank_pattern == {"down": 4}


def test_overrides_are_type_checked_by_key() -> None:
    found = problems_of(MINIMAL, ("network.rank=abc", "data.flip=yes"))
    assert set(found) == {"network.rank", "data.flip"}
    assert "must be an integer, got 'abc'" in found["network.rank"]


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("network.rnk=3", "network.rnk", "did you mean network.rank?"),
        ("netwrk.rank=3", "netwrk", "did you mean network?"),
        ("lr=1", "lr", "did you mean train.lr?"),
        ("network.rank_pattern.down=4", "network.rank_pattern.down", "set it whole: --set network.rank_pattern="),
        ("network.rank", "", "expected dotted.key=value"),
        ("data.trigger_word=[unclosed", "data.trigger_word", "not valid YAML"),
    ],
)
def test_bad_overrides(override: str, key: str, fragment: str) -> None:
    found = problems_of(MINIMAL, (override,))
    assert key in found and fragment in found[key], found


def test_apply_overrides_copies_and_creates_sections() -> None:
    raw = copy.deepcopy(MINIMAL)
    out = apply_overrides(raw, ["sample.steps=5", "train.lr=1e-3"])
    assert out["sample"] == {"steps": 5} and out["train"]["lr"] == 1e-3
    assert raw == MINIMAL, "the input must not change"
    with pytest.raises(ConfigError, match=r"did you mean train\.epochs"):
        apply_overrides(raw, ["train.epoch=3"])


def test_override_problems_and_file_problems_come_in_one_error() -> None:
    found = problems_of(raw_with({"network.rank": 0}), ("train.lrr=1",))
    assert set(found) == {"network.rank", "train.lrr"}


# ---------------------------------------------------------------------------------------------------------
# Saving: the resolved config round-trips


def test_dump_config_round_trips(tmp_path: Path) -> None:
    raw = raw_with(
        {
            "network.targets": ["attn1\\.to_(q|k)", "yes"],
            "network.rank_pattern": {"down.*": 4},
            "network.alpha_pattern": {"up": 0.5},
            "network.conv_rank": 2,
            "data.trigger_word": "1e5",  # a string that YAML 1.2 would read as a float
            "data.default_caption": "no",  # a string that YAML 1.1 would read as false
            "data.caption_separator": "=",
            "data.keep_tokens": 1,
            "train.adam_eps": 1e-8,
            "train.lr": 3e-5,
            "train.mixed_precision": "bf16",
            "output.trigger_words": ["sks", "on"],
            "output.title": "",
            "sample.prompts": ["plain", {"prompt": "full", "negative_prompt": "blurry", "width": 64, "guidance": 3}],
        }
    )
    cfg = config_from_dict(raw, check_paths=False)
    text = dump_config(cfg)
    assert load_config(write(tmp_path, text), check_paths=False) == cfg
    assert json.loads(json.dumps(config_to_dict(cfg))) == config_to_dict(cfg)
    assert list(config_to_dict(cfg)) == [f.name for f in fields(Config)]


def test_config_to_dict_includes_every_default() -> None:
    data = config_to_dict(config_from_dict(MINIMAL, check_paths=False))
    assert data["network"]["rank"] == NetworkConfig.rank
    assert data["train"]["scheduler"] == "constant"
    assert data["sample"]["prompts"] == []


# ---------------------------------------------------------------------------------------------------------
# Derived values


def test_effective_values_fall_back_to_their_defaults() -> None:
    cfg = config_from_dict(
        raw_with({"network.rank": 16, "train.lr": 1e-3, "train.text_encoder_lr": 1e-5, "output.name": "x"}),
        check_paths=False,
    )
    assert (cfg.network.effective_conv_rank, cfg.network.effective_conv_alpha) == (16, 4.0)
    assert (cfg.train.effective_unet_lr, cfg.train.effective_text_encoder_lr) == (1e-3, 1e-5)
    assert cfg.output.effective_title == "x"


def test_resolved_prompts_fill_in_sample_defaults() -> None:
    raw = raw_with({"data.resolution": 256, "sample.seed": 7, "sample.prompts": ["a", {"prompt": "b", "seed": 1}]})
    a, b = resolved_prompts(config_from_dict(raw, check_paths=False))
    assert a == SamplePrompt("a", width=256, height=256, seed=7, steps=20, guidance=7.0)
    assert b.seed == 1


# ---------------------------------------------------------------------------------------------------------
# Hygiene and docs


def test_config_modules_import_no_torch() -> None:
    code = (
        "import sys, loha_train.config, loha_train.config.doc\n"
        "heavy = {'torch', 'diffusers', 'transformers', 'accelerate', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_every_field_has_a_description() -> None:
    classes = [Config] + [type_hints(Config)[f.name] for f in fields(Config)] + [SamplePrompt]
    for cls in classes[1:]:
        comments = field_comments(cls)
        for f in fields(cls):
            assert comments.get(f.name), f"{cls.__name__}.{f.name} has no `# description` comment"


def test_config_table_lists_every_key() -> None:
    table = render_config_table()
    for key in schema_keys(Config):
        if key in {f.name for f in fields(Config)}:
            assert f"| **{key}** |" in table
        else:
            assert f"| `{key}` |" in table
    assert "| `model.path` | str | **required** |" in table
    assert "| `network.alpha` | float | `4.0` | scale = alpha / rank |" in table


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("config_table", REPO / "scripts" / "config_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_table_script_checks_and_writes(tmp_path: Path) -> None:
    script = _load_script()
    readme = write(tmp_path, f"# Title\n\n{START}\nstale\n{END}\n\nafter\n", "README.md")
    assert script.main(["--check", str(readme)]) == 1
    assert script.main(["--write", str(readme)]) == 0
    assert script.main(["--check", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\n") and text.endswith(f"{END}\n\nafter\n")
    assert replace_table(text, render_config_table()) == text
    no_markers = write(tmp_path, "# nothing\n", "OTHER.md")
    assert script.main(["--check", str(no_markers)]) == 1
    assert script.main(["--check", str(tmp_path / "missing.md")]) == 1


def test_readme_config_table_is_current() -> None:
    readme = REPO / "README.md"
    if not readme.exists() or START not in readme.read_text(encoding="utf-8"):
        pytest.skip(f"README.md has no {START} marker yet")
    text = readme.read_text(encoding="utf-8")
    assert replace_table(text, render_config_table()) == text, "run: python scripts/config_table.py --write README.md"

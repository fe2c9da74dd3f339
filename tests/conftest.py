"""Shared fixtures: tiny SD-architecture models with random weights, built from explicit configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from loha_train.fileformat.consumers import comfy_unet_config, comfy_unet_to_diffusers
from loha_train.models.builtin import TINY_CLIP_TEXT, TINY_SD_UNET

# The text-encoder module names both consumers map, after lora_te_/lora_te1_/lora_te2_text_model_encoder_layers_N_.
TE_SUFFIXES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def make_tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_SD_UNET).eval()


def make_tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)).eval()


def expected_sdxl_keys(unet: nn.Module, encoders: list[nn.Module]) -> set[str]:
    """SDXL's kohya names: the UNet's from ComfyUI's diffusers -> original-layout table (not from our converter),
    the text encoders' from the consumers' fixed names."""
    table = comfy_unet_to_diffusers(comfy_unet_config(unet.config))
    adaptable = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    keys = {
        "lora_unet_" + table[f"{n}.weight"].removesuffix(".weight").replace(".", "_")
        for n in adaptable
        if not n.startswith("add_embedding")  # never targeted (inject._UNMAPPED)
    }
    for i, te in enumerate(encoders, start=1):
        layers = te.config.num_hidden_layers
        keys |= {f"lora_te{i}_text_model_encoder_layers_{j}_{s}" for j in range(layers) for s in TE_SUFFIXES}
    return keys


@pytest.fixture
def tiny_unet() -> UNet2DConditionModel:
    return make_tiny_unet()


@pytest.fixture
def tiny_text_encoder() -> CLIPTextModel:
    return make_tiny_text_encoder()


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$LOHA_TRAIN_CACHE for the session: built-ins are built once, here, never into ~/.cache."""
    path = tmp_path_factory.mktemp("loha-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOHA_TRAIN_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_sd_dir(builtin_cache: Path) -> Path:
    """builtin:tiny-sd-random as a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from loha_train.models.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-sd-random")


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """accelerate keeps process-wide state; each in-process training run starts from a clean slate."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)

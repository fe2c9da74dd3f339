"""Shared fixtures: tiny SD-architecture models with random weights, built from explicit configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from loha_train.builtin import TINY_CLIP_TEXT, TINY_SD_UNET


def make_tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_SD_UNET).eval()


def make_tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)).eval()


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
    """builtin:tiny-sd as a diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from loha_train.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-sd")


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """accelerate keeps process-wide state; each in-process training run starts from a clean slate."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)

"""Shared fixtures: tiny SD-architecture models with random weights, built from explicit configs."""

from __future__ import annotations

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

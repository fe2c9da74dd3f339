"""What the base model is: the loaded bundle of frozen parts, what detection learns, the model error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    TextEncoder = CLIPTextModel | CLIPTextModelWithProjection

Family = Literal["sd1", "sd2", "sdxl"]
PredictionType = Literal["epsilon", "v_prediction"]
Kind = Literal["diffusers", "single_file"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelError(Exception):
    """A base model (or VAE, or tokenizer) that cannot be used, with the file and what was expected."""


@dataclass(frozen=True)
class ModelInfo:
    """What `detect_model` learned from configs or a file header, without loading weights."""

    path: Path
    kind: Kind
    family: Family
    prediction_type: PredictionType | None  # None: the files do not say (SD 2.x single files)
    evidence: tuple[str, ...] = ()  # the config entries or keys that decided family and prediction type
    metadata: dict[str, str] = field(default_factory=dict, repr=False)  # safetensors header metadata
    prediction_from: str | None = None  # the entry that states the prediction type; None: family default/unknown
    zero_terminal_snr: bool = False  # the files say the schedule is rescaled to zero terminal SNR


@dataclass
class ModelBundle:
    """The frozen base model, ready to train adapters against."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[TextEncoder]  # CLIPTextModel; SDXL's second is a CLIPTextModelWithProjection
    tokenizers: list[CLIPTokenizer]  # one per text encoder
    noise_scheduler: DDPMScheduler  # the model's training noise schedule
    scheduler_config: dict[str, Any]  # the model's own scheduler config, for building samplers
    family: Family
    prediction_type: PredictionType
    source: Path
    kind: Kind
    zero_terminal_snr: bool = False  # the noise schedule (training and samplers) is rescaled to zero terminal SNR
    evidence: tuple[str, ...] = ()  # where family, prediction type and zero terminal SNR came from

    def describe(self) -> list[str]:
        """For the run plan: the model and its kind, then where family and prediction type came from."""
        return [f"{self.source} ({self.family}, {self.prediction_type}, {self.kind.replace('_', ' ')})", *self.evidence]

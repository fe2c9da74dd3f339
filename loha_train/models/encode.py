"""What the frozen encoders make of inputs: captions -> conditioning (SD 1.x/2.x one CLIP, SDXL two plus pooled),
pixels -> latents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from loha_train.models.bundle import ModelBundle


def tokenize(tokenizer: object, captions: Sequence[str]) -> Tensor:
    """Token ids (batch, model_max_length): padded and truncated as SD was trained."""
    return tokenizer(  # type: ignore[operator]
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,  # type: ignore[attr-defined]
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _final_norm(text_encoder: nn.Module) -> nn.Module:
    # transformers 5 has final_layer_norm on CLIPTextModel itself; transformers 4 under .text_model
    text_encoder = getattr(text_encoder, "module", text_encoder)  # a DistributedDataParallel wrapper's module
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def encode_sd(text_encoder: nn.Module, ids: Tensor, clip_skip: int = 1) -> Tensor:
    """SD 1.x/2.x: last hidden state, or with clip_skip N the N-th last layer through the final layer norm."""
    out = text_encoder(ids, output_hidden_states=clip_skip > 1)
    if clip_skip == 1:
        return out.last_hidden_state
    return _final_norm(text_encoder)(out.hidden_states[-clip_skip])


def encode_sdxl(text_encoders: Sequence[nn.Module], ids: Sequence[Tensor], clip_skip: int = 1) -> dict[str, Tensor]:
    """SDXL: the penultimate layers of both encoders side by side, and the second encoder's pooled projection.

    clip_skip counts from SDXL's usual penultimate layer (1 = penultimate, as kohya does).
    """
    hidden = []
    pooled = None
    for te, tok in zip(text_encoders, ids, strict=True):
        out = te(tok, output_hidden_states=True)
        hidden.append(out.hidden_states[-(clip_skip + 1)])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    assert pooled is not None
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}


def encode_captions(
    text_encoders: Sequence[nn.Module], tokenizers: Sequence[object], captions: Sequence[str], clip_skip: int = 1
) -> dict[str, Tensor]:
    """Captions -> the UNet's text conditioning: {"encoder_hidden_states"[, "text_embeds"]}."""
    device = next(text_encoders[0].parameters()).device
    ids = [tokenize(tok, captions).to(device) for tok in tokenizers]
    if len(text_encoders) == 1:
        return {"encoder_hidden_states": encode_sd(text_encoders[0], ids[0], clip_skip)}
    return encode_sdxl(text_encoders, ids, clip_skip)


def sdxl_time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """SDXL size/crop conditioning per sample: (batch, 6) = original (h, w), crop (top, left), target (h, w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(torch.float32)


def vae_encode(bundle: ModelBundle, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (the distribution's mode, so caching is deterministic)."""
    vae = bundle.vae
    device = next(vae.parameters()).device
    latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()
